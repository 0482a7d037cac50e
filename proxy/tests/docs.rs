//! The docs stay honest: what README.md and docs/*.md name exists in the
//! binaries, checked against the binaries themselves.
//!
//! # Metric names
//! Every `canary_proxy_<name>` in the docs (prose and code blocks alike) is a
//! family of the live `/metrics` of a real `canary-proxy run`, and every
//! `canary_proxy_*` family that proxy exports is named in docs/metrics.md.
//! Families with no series are not exported at all, so the proxy first serves
//! what makes each one appear: plain and HTTPS requests, a gRPC call to an h2c
//! version, a dead upstream (connect errors and retries), a client error (no
//! `Host`), and two automatic rollbacks under a policy with a latency
//! objective (`slower_than`). Handled explicitly:
//! - `_bucket`, `_sum` and `_count` are the series of a histogram family: a
//!   name with one of them is the family's name without it;
//! - `canary_proxy_(a|b)`, a `grep -E` alternation, names `canary_proxy_a` and
//!   `canary_proxy_b`; a name ending in `_` (`canary_proxy_tls_`) is a prefix
//!   and must start at least one family; the bare prefix `canary_proxy_` is
//!   not a name;
//! - recording rules (`canary_proxy:...`), log targets (`canary_proxy::tls`)
//!   and `process_*` do not start with `canary_proxy_`, so they are not names
//!   of the proxy's own families and are not checked.
//!
//! # Flags
//! A `--flag` is checked when it is written where it can only be the proxy's
//! or ping-backend's:
//! - on a command line that runs one of them: a line of a fenced block (any
//!   but `toml`), or an inline code span, whose command (after `$ `,
//!   `VAR=value` and `exec`, and after each `|`, `&&`, `||`, `;`, `$(`) is
//!   `canary-proxy`, `ping-backend` (or a path ending in either), or
//!   `cargo run ... -p canary-proxy -- ARGS`. Such a flag must be in the
//!   `--help` of that exact command: `canary-proxy run|check|demo|status --help`,
//!   `canary-proxy --help` with no subcommand, or `ping-backend --help`.
//!   Every other command (kubectl, curl, docker, cargo, bench/run, ...) is
//!   someone else's, and so are its flags;
//! - in an inline code span of prose that starts with `--` (`--threads N`,
//!   the flag tables of docs/tls.md and docs/security.md). Prose does not say
//!   which binary it means, so such a flag must be in at least one of those
//!   `--help`s, unless [`OTHER_TOOLS`] lists it with the tool it belongs to.
//!
//! Bare `--words` in running text (outside code) are not checked.
//! ping-backend's `--help` is rendered from `ping_backend::flags::Flags`, the
//! very parser its `main` runs: `cargo test -p canary-proxy` does not build
//! the ping-backend binary, and a stale one left in `target/` would lie.
//!
//! # Routes examples
//! Every ```` ```toml ```` block that holds a `[versions.` table is a routes
//! file, and `canary-proxy check` must accept it. A block with a `[rollback]`
//! table and no versions (a policy excerpt) is checked after two stub
//! versions, `stable` and `canary`, are put in front of it. A block meant to
//! be rejected says so on the nearest non-blank line before its fence, an
//! HTML comment that renders as nothing:
//!
//! ```text
//! <!-- check: rejected -->
//! ```
//!
//! and `check` must then exit 1.
//!
//! Each problem names the doc file, the line and the offending name; every
//! check collects all of its problems before failing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use clap::CommandFactory;
use common::grpc::{channel, grpc_upstream, unary, Behaviour};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Flags that prose writes in code spans of their own but that belong to
/// another tool, and that tool. A tool that is a script of this repository
/// must itself mention the flag, so an entry cannot outlive it.
const OTHER_TOOLS: &[(&str, &str)] = &[
    ("--quick", "bench/run"),
    ("--proxy-bin", "bench/run"),
    ("--backend-bin", "bench/run"),
    ("--latency-correction", "bench/bench.py"), // an oha flag the open-loop row passes
    ("--read-only", "docker run (scripts/check-docker-smoke)"),
    ("--cap-drop", "docker run (scripts/check-docker-smoke)"),
    ("--security-opt", "docker run (scripts/check-docker-smoke)"),
    ("--user", "docker run (scripts/check-docker-smoke)"),
];

/// The marker, on the nearest non-blank line before a fence, of a routes
/// example that `check` must reject.
const REJECTED: &str = "<!-- check: rejected -->";

/// Prose does not say which binary a flag is for.
const ANY_BINARY: &str = "any binary";

/// One Markdown file, named by its path from the workspace root.
struct Doc {
    name: String,
    text: String,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the proxy crate is in the workspace")
        .to_owned()
}

/// README.md and docs/*.md, in a stable order.
fn docs() -> Vec<Doc> {
    let root = root();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/ is readable")
        .map(|e| e.expect("a docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    paths.sort();
    paths.insert(0, root.join("README.md"));
    paths
        .into_iter()
        .map(|p| Doc {
            name: p.strip_prefix(&root).unwrap().display().to_string(),
            text: std::fs::read_to_string(&p)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display())),
        })
        .collect()
}

#[track_caller]
fn assert_no_problems(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{what}: {} problem(s):\n- {}",
        problems.len(),
        problems.join("\n- ")
    );
}

// ---------------------------------------------------------------------------
// Markdown: fenced blocks and inline code spans.

/// A fenced code block: the line of its opening fence (1-based), its info
/// string, its lines with their numbers, and the nearest non-blank line
/// before the fence.
struct Fence<'a> {
    line: usize,
    info: &'a str,
    body: Vec<(usize, &'a str)>,
    before: &'a str,
}

/// The fenced blocks of `text`, and the prose lines outside them.
fn split_markdown(text: &str) -> (Vec<Fence<'_>>, Vec<(usize, &str)>) {
    let mut fences = Vec::new();
    let mut prose = Vec::new();
    let mut open: Option<Fence> = None;
    let mut before = "";
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let fence = line.trim_start().starts_with("```");
        match open.as_mut() {
            Some(_) if fence => {
                fences.push(open.take().unwrap());
                before = line;
            }
            Some(f) => f.body.push((n, line)),
            None if fence => {
                open = Some(Fence {
                    line: n,
                    info: line.trim_start().trim_start_matches('`').trim(),
                    body: Vec::new(),
                    before,
                })
            }
            None => {
                prose.push((n, line));
                if !line.trim().is_empty() {
                    before = line;
                }
            }
        }
    }
    (fences, prose)
}

/// Inline code spans of prose lines, with the line each one starts on. A
/// span may run over a line break; a blank line ends a paragraph, and with
/// it any span left open.
fn code_spans(prose: &[(usize, &str)]) -> Vec<(usize, String)> {
    let mut spans = Vec::new();
    let mut paragraph: Vec<(usize, &str)> = Vec::new();
    for &(n, line) in prose.iter().chain(std::iter::once(&(0, ""))) {
        if !line.trim().is_empty() {
            paragraph.push((n, line));
            continue;
        }
        // Byte offsets in the joined paragraph, mapped back to lines.
        let mut joined = String::new();
        let mut starts = Vec::new();
        for (n, l) in paragraph.drain(..) {
            starts.push((joined.len(), n));
            joined.push_str(l);
            joined.push('\n');
        }
        let line_of = |at: usize| {
            starts
                .iter()
                .rev()
                .find(|(s, _)| *s <= at)
                .map(|(_, n)| *n)
                .unwrap_or(0)
        };
        let bytes = joined.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] != b'`' {
                i += 1;
                continue;
            }
            let run = bytes[i..].iter().take_while(|&&b| b == b'`').count();
            let open = i + run;
            let ticks = "`".repeat(run);
            // The span ends at the next run of exactly as many backticks.
            let mut j = open;
            let close = loop {
                match joined[j..].find(&ticks) {
                    None => break None,
                    Some(k) => {
                        let at = j + k;
                        let len = bytes[at..].iter().take_while(|&&b| b == b'`').count();
                        if len == run {
                            break Some(at);
                        }
                        j = at + len;
                    }
                }
            };
            match close {
                Some(end) => {
                    let content = joined[open..end].replace('\n', " ");
                    spans.push((line_of(i), content.trim().to_owned()));
                    i = end + run;
                }
                None => i = open,
            }
        }
    }
    spans
}

// ---------------------------------------------------------------------------
// Metric names.

/// Every `canary_proxy_*` name in `line` (see the module doc for the forms).
fn metric_names(line: &str) -> Vec<String> {
    const PREFIX: &str = "canary_proxy_";
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = Vec::new();
    for (at, _) in line.match_indices(PREFIX) {
        if line[..at].chars().next_back().is_some_and(is_name) {
            continue; // part of a longer word
        }
        let rest = &line[at + PREFIX.len()..];
        if let Some(group) = rest.strip_prefix('(') {
            let Some(end) = group.find(')') else { continue };
            let alternatives: Vec<&str> = group[..end].split('|').collect();
            if alternatives
                .iter()
                .all(|a| !a.is_empty() && a.chars().all(is_name))
            {
                out.extend(alternatives.iter().map(|a| format!("{PREFIX}{a}")));
            }
            continue;
        }
        let len = rest.find(|c: char| !is_name(c)).unwrap_or(rest.len());
        if len > 0 {
            out.push(format!("{PREFIX}{}", &rest[..len]));
        }
    }
    out
}

/// Families of a text exposition, with their types.
fn families(exposition: &str) -> BTreeMap<String, String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_owned(), kind.trim().to_owned()))
        .collect()
}

/// The family a documented `name` refers to, if the proxy exports it.
fn family_of(name: &str, exported: &BTreeMap<String, String>) -> Option<String> {
    if exported.contains_key(name) {
        return Some(name.to_owned());
    }
    if name.ends_with('_') {
        return exported.keys().find(|f| f.starts_with(name)).cloned();
    }
    for (suffix, kinds) in [
        ("_bucket", &["histogram"][..]),
        ("_sum", &["histogram", "summary"][..]),
        ("_count", &["histogram", "summary"][..]),
    ] {
        if let Some(base) = name.strip_suffix(suffix) {
            if exported
                .get(base)
                .is_some_and(|kind| kinds.contains(&kind.as_str()))
            {
                return Some(base.to_owned());
            }
        }
    }
    None
}

/// Documented names that are not exported, and exported `canary_proxy_*`
/// families that docs/metrics.md does not name.
fn metric_problems(docs: &[Doc], exported: &BTreeMap<String, String>) -> Vec<String> {
    let mut problems: Vec<String> = Vec::new();
    let mut in_metrics_md = BTreeSet::new();
    for doc in docs {
        for (i, line) in doc.text.lines().enumerate() {
            for name in metric_names(line) {
                match family_of(&name, exported) {
                    Some(family) if doc.name == "docs/metrics.md" => {
                        in_metrics_md.insert(family);
                    }
                    Some(_) => {}
                    None => problems.push(format!(
                        "{}:{}: `{name}` is not exported by a live proxy's /metrics",
                        doc.name,
                        i + 1
                    )),
                }
                // A name twice on one line is one problem.
                problems.dedup();
            }
        }
    }
    assert!(
        docs.iter().any(|d| d.name == "docs/metrics.md"),
        "docs/metrics.md, the reference of every metric, is missing"
    );
    for family in exported.keys() {
        if family.starts_with("canary_proxy_") && !in_metrics_md.contains(family) {
            problems.push(format!(
                "docs/metrics.md: `{family}` is exported by a live proxy but not documented there"
            ));
        }
    }
    problems
}

// ---------------------------------------------------------------------------
// Flags.

/// A documented flag and the `--help` that must list it: "canary-proxy run",
/// "ping-backend", ..., or [`ANY_BINARY`].
#[derive(Debug, PartialEq)]
struct FlagUse {
    line: usize,
    binary: String,
    flag: String,
}

/// `--name` from a token like `[--name`, `--name=value` or `"--name",`.
fn flag_of(token: &str) -> Option<String> {
    let t = token.trim_start_matches(['[', '(', '"', '\'']);
    let name = t.strip_prefix("--")?;
    let len = name
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .unwrap_or(name.len());
    let name = &name[..len];
    (!name.is_empty() && name.as_bytes()[0].is_ascii_alphabetic()).then(|| format!("--{name}"))
}

/// The flags of the proxy's or ping-backend's invocations in one command
/// line (see the module doc).
fn invocation_flags(command: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut segments = vec![command];
    for sep in ["&&", "||", "$(", "|", ";", ")"] {
        segments = segments.iter().flat_map(|s| s.split(sep)).collect();
    }
    for segment in segments {
        let mut tokens: Vec<&str> = segment
            .split_whitespace()
            .take_while(|t| !t.starts_with('#'))
            .collect();
        while let Some(first) = tokens.first() {
            let assignment = first
                .split_once('=')
                .is_some_and(|(var, _)| !var.is_empty() && !var.starts_with('-'));
            if *first == "$" || *first == "exec" || assignment {
                tokens.remove(0);
            } else {
                break;
            }
        }
        let Some(first) = tokens.first() else {
            continue;
        };
        let program = first.rsplit('/').next().unwrap_or(first);
        let (program, args): (&str, &[&str]) = if program == "cargo" {
            // `cargo run -p NAME -- ARGS`: only ARGS are NAME's.
            let named = tokens
                .windows(2)
                .find_map(|w| (["-p", "--package", "--bin"].contains(&w[0])).then_some(w[1]));
            let dashes = tokens.iter().position(|t| *t == "--");
            match (named, dashes) {
                (Some(name), Some(at)) => (name, &tokens[at + 1..]),
                _ => continue,
            }
        } else {
            (program, &tokens[1..])
        };
        let binary = match program {
            "ping-backend" => "ping-backend".to_owned(),
            "canary-proxy" => match args.first() {
                Some(&sub) if ["run", "check", "demo", "status"].contains(&sub) => {
                    format!("canary-proxy {sub}")
                }
                Some(&"help") => continue,
                _ => "canary-proxy".to_owned(),
            },
            _ => continue,
        };
        out.extend(
            args.iter()
                .filter_map(|t| flag_of(t))
                .map(|flag| (binary.clone(), flag)),
        );
    }
    out
}

/// Every checked flag of one doc.
fn flag_uses(text: &str) -> Vec<FlagUse> {
    let (fences, prose) = split_markdown(text);
    let mut out = Vec::new();
    for fence in fences.iter().filter(|f| !f.info.starts_with("toml")) {
        // A line ending in `\` goes on on the next one.
        let mut command = String::new();
        let mut first = 0;
        for &(n, line) in &fence.body {
            if command.is_empty() {
                first = n;
            }
            match line.trim_end().strip_suffix('\\') {
                Some(head) => {
                    command.push_str(head);
                    command.push(' ');
                }
                None => {
                    command.push_str(line);
                    for (binary, flag) in invocation_flags(&command) {
                        out.push(FlagUse {
                            line: first,
                            binary,
                            flag,
                        });
                    }
                    command.clear();
                }
            }
        }
    }
    for (n, span) in code_spans(&prose) {
        let invoked = invocation_flags(&span);
        if !invoked.is_empty() {
            out.extend(invoked.into_iter().map(|(binary, flag)| FlagUse {
                line: n,
                binary,
                flag,
            }));
        } else if span.starts_with("--") {
            out.extend(
                span.split_whitespace()
                    .filter_map(flag_of)
                    .filter(|f| !OTHER_TOOLS.iter().any(|(o, _)| o == f))
                    .map(|flag| FlagUse {
                        line: n,
                        binary: ANY_BINARY.to_owned(),
                        flag,
                    }),
            );
        }
    }
    out
}

/// The long flags a clap `--help` lists (its option lines, not its prose).
fn help_flags(help: &str) -> BTreeSet<String> {
    help.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .flat_map(|l| {
            l.split_whitespace()
                .take_while(|t| t.starts_with('-'))
                .filter_map(flag_of)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `--help` of every command the docs can invoke, as flag sets.
fn helps() -> BTreeMap<String, BTreeSet<String>> {
    let mut helps = BTreeMap::new();
    for sub in [
        None,
        Some("run"),
        Some("check"),
        Some("demo"),
        Some("status"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_canary-proxy"))
            .args(sub)
            .arg("--help")
            .env("NO_COLOR", "1")
            .output()
            .expect("canary-proxy runs");
        let name = match sub {
            Some(sub) => format!("canary-proxy {sub}"),
            None => "canary-proxy".to_owned(),
        };
        assert!(out.status.success(), "`{name} --help` fails: {out:?}");
        helps.insert(name, help_flags(&String::from_utf8_lossy(&out.stdout)));
    }
    let ping = ping_backend::flags::Flags::command()
        .render_long_help()
        .to_string();
    helps.insert("ping-backend".to_owned(), help_flags(&ping));
    for (name, flags) in &helps {
        assert!(
            flags.contains("--help"),
            "`{name} --help` was not parsed: {flags:?}"
        );
    }
    helps
}

fn flag_problems(docs: &[Doc], helps: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut problems = Vec::new();
    for doc in docs {
        for u in flag_uses(&doc.text) {
            let known = match helps.get(&u.binary) {
                Some(flags) => flags.contains(&u.flag),
                None => helps.values().any(|flags| flags.contains(&u.flag)),
            };
            if known {
                continue;
            }
            let whose = if u.binary == ANY_BINARY {
                format!(
                    "no --help of {} lists it; if it is another tool's, add it to OTHER_TOOLS in proxy/tests/docs.rs",
                    helps.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            } else {
                format!("`{} --help` does not list it", u.binary)
            };
            problems.push(format!("{}:{}: `{}`: {whose}", doc.name, u.line, u.flag));
        }
    }
    problems
}

// ---------------------------------------------------------------------------
// Routes examples.

/// A routes example: where it is, the file to check, and whether it is
/// meant to be rejected.
struct Example {
    line: usize,
    routes: String,
    rejected: bool,
}

const STUB_VERSIONS: &str = "[versions.stable]\nupstream = \"http://ping-stable:8080\"\nweight = 90\n\n[versions.canary]\nupstream = \"http://ping-canary:8080\"\nweight = 10\n\n";

fn routes_examples(text: &str) -> Vec<Example> {
    let (fences, _) = split_markdown(text);
    fences
        .into_iter()
        .filter(|f| f.info.split_whitespace().next() == Some("toml"))
        .filter_map(|f| {
            let mut body: String = f.body.iter().map(|(_, l)| format!("{l}\n")).collect();
            if !body.contains("[versions.") {
                if !body.lines().any(|l| l.trim() == "[rollback]") {
                    return None;
                }
                body.insert_str(0, STUB_VERSIONS);
            }
            Some(Example {
                line: f.line,
                routes: body,
                rejected: f.before.trim() == REJECTED,
            })
        })
        .collect()
}

fn check(routes: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.toml");
    std::fs::write(&path, routes).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_canary-proxy"))
        .arg("check")
        .arg(&path)
        .env("RUST_LOG", "off")
        .output()
        .expect("canary-proxy runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn example_problems(docs: &[Doc]) -> (usize, Vec<String>) {
    let mut checked = 0;
    let mut problems = Vec::new();
    for doc in docs {
        for ex in routes_examples(&doc.text) {
            checked += 1;
            let (code, stderr) = check(&ex.routes);
            let want = if ex.rejected { 1 } else { 0 };
            if code != Some(want) {
                let verdict = if ex.rejected {
                    format!("is marked `{REJECTED}` but `canary-proxy check` accepts it")
                } else {
                    format!("`canary-proxy check` rejects it:\n{}", stderr.trim_end())
                };
                problems.push(format!(
                    "{}:{}: routes example {verdict}",
                    doc.name, ex.line
                ));
            }
        }
    }
    (checked, problems)
}

// ---------------------------------------------------------------------------
// The checks of the real docs.

#[test]
fn every_flag_in_the_docs_is_in_the_help_of_its_binary() {
    let docs = docs();
    let helps = helps();
    let checked: usize = docs.iter().map(|d| flag_uses(&d.text).len()).sum();
    assert!(
        checked > 50,
        "only {checked} flags found: is the parser broken?"
    );
    let mut problems = flag_problems(&docs, &helps);
    for (flag, tool) in OTHER_TOOLS {
        let script = root().join(tool);
        if script.is_file() && !std::fs::read_to_string(&script).unwrap().contains(flag) {
            problems.push(format!(
                "OTHER_TOOLS in proxy/tests/docs.rs: `{flag}` is not in {tool}; remove the entry"
            ));
        }
    }
    assert_no_problems("flags in the docs that the binaries do not have", &problems);
}

#[test]
fn every_routes_example_in_the_docs_passes_check() {
    let (checked, problems) = example_problems(&docs());
    assert!(checked >= 5, "only {checked} routes examples found");
    assert_no_problems(
        "routes examples that `canary-proxy check` rejects",
        &problems,
    );
}

/// A self-signed certificate for `localhost`, as PEM files in `dir`, and
/// its DER for the client's trust store.
fn certificate(dir: &Path) -> rustls::pki_types::CertificateDer<'static> {
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.join("tls.crt"), key.cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), key.signing_key.serialize_pem()).unwrap();
    key.cert.der().clone()
}

/// One HTTP/1.1 exchange on a fresh connection (`Connection: close`): the
/// whole answer as text.
async fn exchange<S>(mut stream: S, request: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_in_the_docs_is_exported_and_every_exported_one_is_documented() {
    // stable: a gRPC upstream over h2c (it answers plain requests too);
    // canary: fails every answer; dead: nothing listens there.
    let stable = grpc_upstream("stable", Behaviour::default()).await;
    let canary = backend("v2", 1.0, Duration::ZERO).await;
    // Port 1 of a loopback address no test binds: refused, always (a port
    // bound and closed could be reused by a parallel test's listener).
    let dead = std::net::SocketAddr::from(([127, 0, 0, 254], 1));
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        format!(
            "[versions.stable]\nupstream = \"http://{}\"\nweight = 50\nprotocol = \"h2c\"\n\n\
             [versions.canary]\nupstream = \"http://{}\"\nweight = 25\n\n\
             [versions.dead]\nupstream = \"http://{dead}\"\nweight = 25\n\n\
             [rollback]\ntarget = \"stable\"\nslower_than = \"1s\"\n\n\
             [override]\nheader = \"x-canary-version\"\n\n\
             [mirror]\nversion = \"dead\"\nshare = 1.0\n\n\
             [progress]\nversion = \"canary\"\nsteps = [25, 100]\nstep_time = \"1h\"\n",
            stable.addr,
            canary.addr(),
        ),
    )
    .unwrap();
    let ca = certificate(dir.path());
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let proxy = spawn_proxy_binary(
        &routes,
        &[
            "--drain-delay",
            "0s",
            "--tls-listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let (addr, admin) = (proxy.addr(), proxy.admin());

    // Plain traffic until both failing versions are rolled back: the
    // canary on its 500s, the dead one on its connect errors (each retried
    // on stable).
    let http = client();
    eventually(
        Duration::from_secs(15),
        "canary and dead rolled back",
        || {
            let http = http.clone();
            async move {
                for _ in 0..20 {
                    get(&http, addr, "/ping").await.expect("an answer");
                }
                let text = metrics(admin).await;
                let latched = |v| by_version(&text, "canary_proxy_rollback_active", v) == Some(1.0);
                (latched("canary") && latched("dead")).then_some(())
            }
        },
    )
    .await;

    // One request the override header routes (to stable: the others are
    // rolled back); the copies to `dead` have failed on the way.
    let answer = get_with(&http, addr, "/ping", &[("x-canary-version", "canary")])
        .await
        .expect("an answer");
    assert_eq!(answer.status, 200, "{answer:?}");

    // Every request now goes to stable: one gRPC call.
    let answer = unary(&channel(addr).await, "docs")
        .await
        .expect("a gRPC call");
    assert_eq!(answer.get_ref().text, "stable:docs");

    // A client error: a request without Host.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let answer = exchange(tcp, "GET /ping HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    // One request over HTTPS.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(canary_proxy::tls_crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(proxy.https()).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("a TLS handshake with the proxy");
    let answer = exchange(
        stream,
        "GET /ping HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let exported = families(&metrics(admin).await);
    assert_no_problems(
        "metric names in the docs against a live /metrics",
        &metric_problems(&docs(), &exported),
    );
}

// ---------------------------------------------------------------------------
// The rules themselves, on made-up docs: each kind of mistake is caught and
// named with its file, and other tools' flags are left alone.

fn doc(name: &str, text: &str) -> Doc {
    Doc {
        name: name.to_owned(),
        text: text.to_owned(),
    }
}

#[test]
fn metric_names_come_in_every_documented_form() {
    assert_eq!(
        metric_names(
            "`canary_proxy_weight{version}` and rate(canary_proxy_request_duration_seconds_bucket[5m]) \
             grep -E '^canary_proxy_(weight|config_info)' canary_proxy::tls canary_proxy:ratio \
             not_canary_proxy_x, the prefix `canary_proxy_`"
        ),
        [
            "canary_proxy_weight",
            "canary_proxy_request_duration_seconds_bucket",
            "canary_proxy_weight",
            "canary_proxy_config_info",
        ]
    );
}

#[test]
fn an_unexported_or_undocumented_metric_is_named_with_its_file() {
    let exported: BTreeMap<String, String> = [
        ("canary_proxy_weight", "gauge"),
        ("canary_proxy_request_duration_seconds", "histogram"),
        ("canary_proxy_new_total", "counter"),
        ("process_open_fds", "gauge"),
    ]
    .into_iter()
    .map(|(n, k)| (n.to_owned(), k.to_owned()))
    .collect();
    let docs = [
        doc(
            "docs/metrics.md",
            "`canary_proxy_weight`, `canary_proxy_request_duration_seconds_count`",
        ),
        doc(
            "docs/ops.md",
            "x\n`canary_proxy_wieght` and canary_proxy_weight_sum",
        ),
    ];
    assert_eq!(
        metric_problems(&docs, &exported),
        [
            "docs/ops.md:2: `canary_proxy_wieght` is not exported by a live proxy's /metrics",
            "docs/ops.md:2: `canary_proxy_weight_sum` is not exported by a live proxy's /metrics",
            "docs/metrics.md: `canary_proxy_new_total` is exported by a live proxy but not documented there",
        ]
    );
}

#[test]
fn only_flags_of_the_proxy_and_ping_backend_are_checked() {
    let text = "\
Set `--threads N` or `--tls-listen ADDR`; the demo with `--canary-error-rate 0.3`.
Run `canary-proxy check routes.toml`, not `kubectl apply --record` or `--quick`,
with `--read-only --cap-drop ALL
--security-opt x`.

```sh
kubectl patch configmap canary-proxy-routes --type merge --patch-file x.yaml
URL=$(minikube service canary-proxy -n canary-proxy --url)
$ canary-proxy run --listen :8080 \\
    --admin-listen :9090   # --not-a-flag
canary-proxy demo [--traffic 20] | grep --color x
cargo run --release -p canary-proxy -- demo --duration 5s
PING_X=1 ./target/debug/ping-backend --error-rate=0.1
docker run --rm canary-proxy:v1 check /routes.toml
```
";
    let uses: Vec<(usize, String, String)> = flag_uses(text)
        .into_iter()
        .map(|u| (u.line, u.binary, u.flag))
        .collect();
    let want: Vec<(usize, String, String)> = [
        (9, "canary-proxy run", "--listen"),
        (9, "canary-proxy run", "--admin-listen"),
        (11, "canary-proxy demo", "--traffic"),
        (12, "canary-proxy demo", "--duration"),
        (13, "ping-backend", "--error-rate"),
        (1, ANY_BINARY, "--threads"),
        (1, ANY_BINARY, "--tls-listen"),
        (1, ANY_BINARY, "--canary-error-rate"),
    ]
    .into_iter()
    .map(|(l, b, f)| (l, b.to_owned(), f.to_owned()))
    .collect();
    assert_eq!(uses, want);
}

#[test]
fn a_flag_missing_from_its_help_is_named_with_its_file() {
    let helps: BTreeMap<String, BTreeSet<String>> = [
        ("canary-proxy run", &["--listen", "--help"][..]),
        (
            "canary-proxy demo",
            &["--listen", "--traffic", "--help"][..],
        ),
    ]
    .into_iter()
    .map(|(b, f)| (b.to_owned(), f.iter().map(|s| s.to_string()).collect()))
    .collect();
    let docs = [doc(
        "docs/ops.md",
        "`--traffic 5` and `--lisen`\n\n```sh\ncanary-proxy run --traffic 5\n```\n",
    )];
    let problems = flag_problems(&docs, &helps);
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(problems[0]
        .starts_with("docs/ops.md:4: `--traffic`: `canary-proxy run --help` does not list it"));
    assert!(problems[1].starts_with("docs/ops.md:1: `--lisen`: no --help of"));
}

#[test]
fn help_flags_are_read_from_option_lines_only() {
    let help = "Usage: x [OPTIONS]\n\nOptions:\n      --listen <LISTEN>\n          needs --tls-cert\n  -h, --help     Print help\n  -V, --version  Print version\n";
    let flags: Vec<String> = help_flags(help).into_iter().collect();
    assert_eq!(flags, ["--help", "--listen", "--version"]);
}

#[test]
fn routes_examples_are_found_and_a_rejected_one_must_fail() {
    let text = format!(
        "```toml\n[versions.a]\nupstream = \"http://a:1\"\nweight = 1\n```\n\n\
         {REJECTED}\n\n```toml\n[versions.a]\nupstream = \"http://a:1\"\nwieght = 1\n```\n\n\
         ```toml\n[rollback]\ntarget = \"stable\"\n```\n\n```toml\n[other]\n```\n"
    );
    let examples = routes_examples(&text);
    let found: Vec<(usize, bool)> = examples.iter().map(|e| (e.line, e.rejected)).collect();
    assert_eq!(found, [(1, false), (9, true), (15, false)]);
    assert!(examples[2].routes.starts_with(STUB_VERSIONS));

    let docs = [doc("docs/routes.md", &text.replace("wieght", "weight"))];
    let (checked, problems) = example_problems(&docs);
    assert_eq!(checked, 3);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0].starts_with("docs/routes.md:9: routes example is marked"),
        "{problems:#?}"
    );
    let docs = [doc(
        "docs/routes.md",
        &text.replace("target = \"stable\"", "target = \"nobody\""),
    )];
    let (_, problems) = example_problems(&docs);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0]
            .starts_with("docs/routes.md:15: routes example `canary-proxy check` rejects it"),
        "{problems:#?}"
    );
}
