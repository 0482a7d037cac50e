//! The gRPC status codes (grpc/doc/statuscodes.md): their names, and the
//! sets of them a routes file names (`grpc_error_codes`). The vocabulary
//! that the routes (config) and the request path (`forward::grpc`) share.

use std::fmt;

/// The gRPC status codes, by number (grpc/doc/statuscodes.md).
pub(crate) const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

pub(crate) const DEADLINE_EXCEEDED: u8 = 4;
pub(crate) const UNAVAILABLE: u8 = 14;

/// A `grpc-status` value, 0 to 16, or anything else as "other".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Code(pub(crate) u8);

impl Code {
    /// The `grpc_status` label: the code's name, or `other` for a value
    /// outside the 17 codes (so the label stays bounded).
    pub(crate) fn label(self) -> &'static str {
        CODE_NAMES.get(self.0 as usize).copied().unwrap_or("other")
    }

    /// Index of its counter: the 17 codes, then "other".
    pub(crate) fn slot(self) -> usize {
        (self.0 as usize).min(CODE_NAMES.len())
    }

    pub(crate) const OTHER: Code = Code(u8::MAX);
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A set of gRPC status codes: the ones that count as a version's errors.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct GrpcCodes {
    bits: u32,
}

impl GrpcCodes {
    /// Server-side faults: UNKNOWN, DEADLINE_EXCEEDED, INTERNAL,
    /// UNAVAILABLE, DATA_LOSS. The others say the client asked for
    /// something wrong or not allowed (INVALID_ARGUMENT, NOT_FOUND, …) and
    /// are no evidence against the version.
    pub(crate) const DEFAULT: [&'static str; 5] = [
        "UNKNOWN",
        "DEADLINE_EXCEEDED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
    ];

    pub(crate) fn contains(&self, code: Code) -> bool {
        (code.0 as usize) < CODE_NAMES.len() && self.bits & (1 << code.0) != 0
    }

    /// From names (`"INTERNAL"`, any case) or numbers (`"13"`).
    pub(crate) fn parse(items: &[String]) -> Result<Self, String> {
        let mut set = GrpcCodes { bits: 0 };
        for item in items {
            let code = match item.parse::<u8>() {
                Ok(n) if (n as usize) < CODE_NAMES.len() => n,
                _ => match CODE_NAMES
                    .iter()
                    .position(|name| name.eq_ignore_ascii_case(item))
                {
                    Some(n) => n as u8,
                    None => {
                        return Err(format!(
                            "`{item}` is not a gRPC status code: use a name like \"INTERNAL\" or a number from 0 to 16"
                        ))
                    }
                },
            };
            set.bits |= 1 << code;
        }
        Ok(set)
    }
}

impl Default for GrpcCodes {
    fn default() -> Self {
        let names: Vec<String> = Self::DEFAULT.iter().map(|s| s.to_string()).collect();
        GrpcCodes::parse(&names).expect("the default codes are valid")
    }
}

impl GrpcCodes {
    /// The codes in the set, by name, in code order.
    fn names(&self) -> Vec<&'static str> {
        (0..CODE_NAMES.len() as u8)
            .map(Code)
            .filter(|c| self.contains(*c))
            .map(Code::label)
            .collect()
    }
}

impl fmt::Debug for GrpcCodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.names())
    }
}

/// Names, whatever the file used (names in any case, or numbers): what
/// `check` prints is what the judgment will use.
impl fmt::Display for GrpcCodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.names() {
            names if names.is_empty() => f.write_str("(none)"),
            names => f.write_str(&names.join(", ")),
        }
    }
}
