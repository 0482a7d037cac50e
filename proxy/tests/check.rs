//! `canary-proxy check PATH`, the command an operator runs before
//! `kubectl apply`: one file per validation rule, run through the real
//! binary. A bad file exits 1 and stderr names the key and what is
//! accepted; a good one exits 0 and prints the split and the policy.
//!
//! Assertions look for the key and a fragment of the hint, not the whole
//! text, so the wording can improve without breaking them.

use std::path::Path;
use std::process::Command;

struct Checked {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn check_path(path: &Path) -> Checked {
    let out = Command::new(env!("CARGO_BIN_EXE_canary-proxy"))
        .arg("check")
        .arg(path)
        .env("RUST_LOG", "off")
        .output()
        .expect("canary-proxy runs");
    Checked {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn check(text: &str) -> Checked {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.toml");
    std::fs::write(&path, text).unwrap();
    check_path(&path)
}

/// `text` is rejected with exit code 1, and stderr contains every fragment.
#[track_caller]
fn rejects(text: &str, fragments: &[&str]) {
    let c = check(text);
    assert_eq!(
        c.code,
        Some(1),
        "exit code for:\n{text}\nstdout: {}\nstderr: {}",
        c.stdout,
        c.stderr
    );
    assert!(
        c.stdout.is_empty(),
        "nothing on stdout for a bad file: {}",
        c.stdout
    );
    for f in fragments {
        assert!(
            c.stderr.contains(f),
            "stderr lacks {f:?} for:\n{text}\nstderr: {}",
            c.stderr
        );
    }
}

const STABLE: &str = "[versions.stable]\nupstream = \"http://127.0.0.1:18081\"\nweight = 90\n";

fn with_rollback(rollback: &str) -> String {
    format!("{STABLE}\n[rollback]\ntarget = \"stable\"\n{rollback}\n")
}

fn one_version(upstream: &str, weight: &str) -> String {
    format!("[versions.canary]\nupstream = {upstream}\nweight = {weight}\n")
}

#[test]
fn unknown_keys_are_named_with_a_suggestion_when_close() {
    // Line 7 holds the typo.
    rejects(
        &format!(
            "{STABLE}\n[versions.canary]\nupstream = \"http://127.0.0.1:18082\"\nwieght = 10\n"
        ),
        &[
            "line 7",
            "versions.canary.wieght",
            "unknown key",
            "did you mean `weight`",
            "upstream, weight, rewrite_host",
        ],
    );
    rejects(
        &format!("{STABLE}\n[rolback]\ntarget = \"stable\"\n"),
        &["`rolback`", "did you mean `rollback`", "versions, rollback"],
    );
    rejects(
        &with_rollback("eror_rate = 0.1"),
        &["rollback.eror_rate", "did you mean `error_rate`"],
    );
    // Nothing close: no suggestion, but the accepted keys are listed.
    let c = check(&format!("{STABLE}colour = \"blue\"\n"));
    assert_eq!(c.code, Some(1));
    assert!(
        c.stderr.contains("versions.stable.colour")
            && c.stderr
                .contains("accepted keys here: upstream, weight, rewrite_host"),
        "{}",
        c.stderr
    );
    assert!(
        !c.stderr.contains("did you mean"),
        "no far-fetched suggestion: {}",
        c.stderr
    );
}

#[test]
fn versions_are_required_and_one_must_take_traffic() {
    rejects(
        "# a routes file\n[versions]\n",
        &["`versions`", "no versions", "[versions.stable]"],
    );
    rejects("[versions.a]\nupstream = \"http://a:1\"\nweight = 0\n\n[versions.b]\nupstream = \"http://b:1\"\nweight = 0\n", &["`versions`", "all weights are zero", "above 0"]);
}

#[test]
fn weights_must_be_non_negative_integers() {
    rejects(
        &one_version("\"http://a:1\"", "-5"),
        &[
            "line 3",
            "versions.canary.weight",
            "negative",
            "non-negative integers",
        ],
    );
    rejects(
        &one_version("\"http://a:1\"", "2.5"),
        &[
            "versions.canary.weight",
            "not an integer",
            "non-negative integers",
        ],
    );
    rejects(
        &one_version("\"http://a:1\"", "\"10\""),
        &["versions.canary.weight", "not an integer"],
    );
    rejects(
        &one_version("\"http://a:1\"", "10000000000"),
        &["versions.canary.weight", "too large", "1000000"],
    );
    rejects(
        "[versions.canary]\nupstream = \"http://a:1\"\n",
        &["versions.canary.weight", "missing", "weight = 10"],
    );
}

#[test]
fn upstreams_must_be_plain_http_base_urls() {
    rejects(
        &one_version("\"http://exa mple:80\"", "1"),
        &[
            "line 2",
            "versions.canary.upstream",
            "not a URL",
            "http://ping-canary:8080",
        ],
    );
    rejects(
        &one_version("\"ping-canary:8080\"", "1"),
        &[
            "versions.canary.upstream",
            "no scheme",
            "http://ping-canary:8080",
        ],
    );
    rejects(
        &one_version("\"ftp://files:21\"", "1"),
        &[
            "versions.canary.upstream",
            "`ftp` is not supported",
            "only http://",
        ],
    );
    rejects(
        &one_version("\"https://ping-canary:8443\"", "1"),
        &[
            "versions.canary.upstream",
            "https upstreams are not supported yet",
            "use http://",
        ],
    );
    rejects(
        &one_version("\"http://ping-canary:8080/api\"", "1"),
        &["versions.canary.upstream", "path", "base URL"],
    );
    rejects(
        &one_version("8080", "1"),
        &["versions.canary.upstream", "must be a string"],
    );
    rejects(
        "[versions.canary]\nweight = 1\n",
        &[
            "versions.canary.upstream",
            "missing",
            "upstream = \"http://",
        ],
    );
    rejects(
        &format!(
            "{}rewrite_host = \"yes\"\n",
            one_version("\"http://a:1\"", "1")
        ),
        &["versions.canary.rewrite_host", "true or false"],
    );
}

#[test]
fn upstream_ports_are_1_to_65535() {
    // Before issue 15, `:99999` printed "routes OK" and the proxy sent the
    // version's requests to port 80; `:0` and `:-1` were accepted too.
    rejects(
        &one_version("\"http://127.0.0.1:99999\"", "1"),
        &[
            "line 2",
            "versions.canary.upstream",
            "\"http://127.0.0.1:99999\"",
            "port 99999 is out of range",
            "1 to 65535",
        ],
    );
    rejects(
        &one_version("\"http://127.0.0.1:0\"", "1"),
        &[
            "versions.canary.upstream",
            "port 0 is out of range",
            "1 to 65535",
        ],
    );
    rejects(
        &one_version("\"http://127.0.0.1:-1\"", "1"),
        &[
            "versions.canary.upstream",
            "port `-1` is not a number",
            "1 to 65535",
        ],
    );
    // Without a port, the port is 80, as the docs say.
    let c = check(&one_version("\"http://ping-canary\"", "1"));
    assert_eq!(c.code, Some(0), "stderr: {}", c.stderr);
    assert!(c.stdout.contains("-> http://ping-canary\n"), "{}", c.stdout);
}

#[test]
fn a_file_over_1_mib_is_refused_on_its_size() {
    // Valid TOML, made too large by a comment: the size is checked first.
    let text = format!("{STABLE}# {}\n", "x".repeat(1 << 20));
    rejects(&text, &["larger than 1048576 bytes", "1 MiB", "ConfigMap"]);
}

// The file of issue 15 (230 KB: 2000 versions and a 100 KB rollback.target),
// through the binary. The old `check` spent 6 s of CPU on it in a release
// build and 2 minutes in a debug one, computing "did you mean" for the target
// against every version name. No wall-clock assertion (speed goals live in
// bench/): a regression shows up as a hang that the harness's timeout catches.
#[test]
fn the_issue_15_file_is_refused_on_the_version_limit() {
    let mut text = String::new();
    for i in 0..2000 {
        text.push_str(&format!(
            "[versions.canary-build-{i:05}]\nupstream = \"http://p:1\"\nweight = 1\n\n"
        ));
    }
    text.push_str(&format!(
        "[rollback]\ntarget = \"{}\"\n",
        "x".repeat(100_000)
    ));
    assert!((225_000..240_000).contains(&text.len()), "{}", text.len());
    rejects(
        &text,
        &[
            "line 1025",
            "`versions`",
            "2000 versions",
            "more than the 256 accepted",
        ],
    );
}

#[test]
fn version_names_are_unique_dns_labels() {
    rejects(
        &one_version("\"http://a:1\"", "1").replace("canary", "Canary_V2"),
        &[
            "line 1",
            "versions.Canary_V2",
            "lowercase letters, digits and '-'",
            "canary-v2",
        ],
    );
    rejects(
        &one_version("\"http://a:1\"", "1").replace("canary", "-canary"),
        &["versions.-canary", "start and end with a letter or digit"],
    );
}

#[test]
fn duplicate_version_name_is_named() {
    // The same [versions.NAME] table twice is a TOML duplicate. The message
    // must give the line of the second one AND the name, so the operator
    // knows which table to rename or merge.
    rejects(
        &format!(
            "{}\n{}",
            one_version("\"http://a:1\"", "1"),
            one_version("\"http://b:1\"", "2")
        ),
        &["line 5", "duplicate", "canary"],
    );
}

#[test]
fn rollback_target_must_be_a_version() {
    rejects(&format!("{STABLE}\n[versions.canary]\nupstream = \"http://a:1\"\nweight = 10\n\n[rollback]\ntarget = \"stabel\"\n"), &["line 10", "rollback.target", "`stabel` is not a version", "did you mean `stable`", "`stable`, `canary`"]);
    rejects(
        &format!("{STABLE}\n[rollback]\nerror_rate = 0.1\n"),
        &["rollback.target", "missing", "`stable`"],
    );
}

#[test]
fn rollback_numbers_must_be_in_range() {
    rejects(
        &with_rollback("error_rate = 0"),
        &["rollback.error_rate", "0 < x <= 1"],
    );
    rejects(
        &with_rollback("error_rate = 1.5"),
        &["rollback.error_rate", "1.5", "0 < x <= 1"],
    );
    rejects(
        &with_rollback("min_requests = 0"),
        &["rollback.min_requests", "integer >= 1"],
    );
    rejects(
        &with_rollback("window = \"forever\""),
        &["rollback.window", "\"1s\" to \"1h\""],
    );
    rejects(
        &with_rollback("window = \"2h\""),
        &["rollback.window", "\"1s\" to \"1h\""],
    );
    rejects(
        &with_rollback("window = 30"),
        &["rollback.window", "duration string"],
    );
    rejects(
        &with_rollback("error_codes = [\"6xx\"]"),
        &["rollback.error_codes", "\"5xx\""],
    );
    rejects(
        &with_rollback("error_codes = []"),
        &["rollback.error_codes", "empty"],
    );
    // Several problems at once are all reported, each with its line.
    rejects(
        &with_rollback("error_rate = 1.5\nmin_requests = 0\nwindow = \"0s\""),
        &[
            "line 7: `rollback.error_rate`",
            "line 8: `rollback.min_requests`",
            "line 9: `rollback.window`",
        ],
    );
}

#[test]
fn the_judgment_keys_are_validated() {
    rejects(
        &with_rollback("slower_than = \"fast\""),
        &["rollback.slower_than", "\"1ms\" to \"1h\"", "\"250ms\""],
    );
    rejects(
        &with_rollback("slower_than = \"0s\""),
        &["rollback.slower_than", "\"1ms\" to \"1h\""],
    );
    rejects(
        &with_rollback("slower_than = \"250ms\"\nslow_rate = 1.5"),
        &["rollback.slow_rate", "1.5", "0 < x < 1"],
    );
    rejects(
        &with_rollback("slow_rate = 0.01"),
        &["rollback.slow_rate", "without slower_than"],
    );
    rejects(
        &with_rollback("trip_odds = 5"),
        &["rollback.trip_odds", "100 to 1e12"],
    );
    rejects(
        &with_rollback("compare_target = \"yes\""),
        &["rollback.compare_target", "not a boolean"],
    );
    rejects(
        &with_rollback("slow_rat = 0.01"),
        &["rollback.slow_rat", "did you mean `slow_rate`"],
    );
}

#[test]
fn a_latency_objective_and_the_hold_are_described() {
    let c = check(&with_rollback(
        "slower_than = \"250ms\"\nslow_rate = 0.01\ntrip_odds = 1e6\ncompare_target = false",
    ));
    assert_eq!(c.code, Some(0), "stderr: {}", c.stderr);
    let line = |prefix: &str| {
        c.stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("a {prefix} line: {}", c.stdout))
            .to_owned()
    };
    let rollback = line("rollback:");
    assert!(rollback.contains("odds 1000000:1"), "{rollback}");
    let latency = line("latency:");
    assert!(
        latency.contains("0.01") && latency.contains("250ms"),
        "{latency}"
    );
    assert!(line("hold:").contains("off"), "{}", c.stdout);
    // Without slower_than there is no latency objective, and the hold is on.
    let c = check(&with_rollback("error_rate = 0.1"));
    assert!(!c.stdout.contains("latency:"), "{}", c.stdout);
    assert!(c.stdout.contains("hold: a decision waits"), "{}", c.stdout);
}

#[test]
fn unreadable_files_are_reported_with_where_to_look() {
    rejects(
        &format!("{STABLE}weight = = 3\n"),
        &["line 4", "not valid TOML"],
    );
    rejects("", &["empty", "[versions.NAME]"]);
    rejects("  \n\n", &["empty"]);
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-routes.toml");
    let c = check_path(&missing);
    assert_eq!(c.code, Some(1));
    assert!(
        c.stderr.contains("cannot read routes file")
            && c.stderr.contains(&missing.display().to_string()),
        "{}",
        c.stderr
    );
}

#[test]
fn valid_file_prints_the_split_and_the_policy() {
    let text = format!("{STABLE}\n[versions.canary]\nupstream = \"http://127.0.0.1:18082\"\nweight = 10\nrewrite_host = true\n\n[rollback]\ntarget = \"stable\"\nerror_rate = 0.1\nmin_requests = 20\nwindow = \"45s\"\nerror_codes = [\"5xx\", \"429\"]\n");
    let c = check(&text);
    assert_eq!(c.code, Some(0), "stderr: {}", c.stderr);
    let stable = c
        .stdout
        .lines()
        .find(|l| l.contains("stable") && l.contains("weight"))
        .unwrap_or_else(|| panic!("a line for stable: {}", c.stdout));
    assert!(
        stable.contains("90.000%") && stable.contains("http://127.0.0.1:18081"),
        "{stable}"
    );
    let canary = c
        .stdout
        .lines()
        .find(|l| l.contains("canary") && l.contains("weight"))
        .unwrap_or_else(|| panic!("a line for canary: {}", c.stdout));
    assert!(
        canary.contains("10.000%")
            && canary.contains("http://127.0.0.1:18082")
            && canary.contains("Host rewritten"),
        "{canary}"
    );
    let rollback = c
        .stdout
        .lines()
        .find(|l| l.starts_with("rollback:"))
        .unwrap_or_else(|| panic!("a rollback line: {}", c.stdout));
    for f in ["`stable`", ">= 20 requests", "45s", "0.1", "5xx, 429"] {
        assert!(
            rollback.contains(f),
            "rollback line lacks {f:?}: {rollback}"
        );
    }
    // The hash printed is the one /status and the metrics show.
    assert!(
        c.stdout
            .contains(&canary_proxy::content_hash(text.as_bytes())),
        "{}",
        c.stdout
    );

    // 9999/1 and no [rollback]: the small share is shown, and rollback is off.
    let c = check(&format!(
        "{}\n[versions.canary]\nupstream = \"http://127.0.0.1:18082\"\nweight = 1\n",
        STABLE.replace("= 90", "= 9999")
    ));
    assert_eq!(c.code, Some(0), "stderr: {}", c.stderr);
    assert!(
        c.stdout.contains("99.990%") && c.stdout.contains("0.010%"),
        "{}",
        c.stdout
    );
    assert!(c.stdout.contains("rollback: off"), "{}", c.stdout);
}

#[test]
fn the_demo_routes_file_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/demo/routes.toml");
    let c = check_path(&path);
    assert_eq!(c.code, Some(0), "stderr: {}", c.stderr);
    assert!(
        c.stdout.contains("90.000%") && c.stdout.contains("10.000%"),
        "{}",
        c.stdout
    );
}

#[test]
fn protocol_is_http1_or_h2c_and_shown() {
    rejects(
        &format!("{STABLE}protocol = \"h2\"\n"),
        &["versions.stable.protocol", "\"h2c\"", "\"http1\""],
    );
    rejects(
        &format!("{STABLE}protocol = 2\n"),
        &["versions.stable.protocol"],
    );
    let c = check(&format!(
        "{STABLE}protocol = \"h2c\"\n\n[versions.canary]\nupstream = \"http://127.0.0.1:18082\"\nweight = 10\nprotocol = \"http1\"\n"
    ));
    assert_eq!(c.code, Some(0), "{}", c.stderr);
    assert!(
        c.stdout.contains("127.0.0.1:18081 over h2c\n"),
        "{}",
        c.stdout
    );
    assert!(c.stdout.contains("127.0.0.1:18082\n"), "{}", c.stdout);
}

#[test]
fn grpc_error_codes_take_names_or_numbers_and_default_to_server_faults() {
    rejects(
        &with_rollback("grpc_error_codes = [\"INTERNAL\", \"NOPE\"]"),
        &["rollback.grpc_error_codes", "`NOPE`", "0 to 16"],
    );
    rejects(
        &with_rollback("grpc_error_codes = [17]"),
        &["rollback.grpc_error_codes", "`17`"],
    );
    rejects(
        &with_rollback("grpc_error_codes = \"INTERNAL\""),
        &["rollback.grpc_error_codes", "list"],
    );
    let c = check(&with_rollback(""));
    assert!(
        c.stdout.contains(
            "grpc-status UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, DATA_LOSS are errors"
        ),
        "{}",
        c.stdout
    );
    let c = check(&with_rollback("grpc_error_codes = [\"internal\", 5]"));
    assert_eq!(c.code, Some(0), "{}", c.stderr);
    assert!(
        c.stdout
            .contains("grpc-status NOT_FOUND, INTERNAL are errors"),
        "{}",
        c.stdout
    );
}

#[test]
fn a_broken_target_entry_is_reported_once_and_a_wrong_name_with_the_choices() {
    // The target's own entry is broken: that is the problem, not the name.
    let c = check("[versions.stable]\nupstream = \"ftp://x\"\nweight = 90\n\n[rollback]\ntarget = \"stable\"\n");
    assert_eq!(c.code, Some(1));
    assert!(
        c.stderr.contains("versions.stable.upstream"),
        "{}",
        c.stderr
    );
    assert!(!c.stderr.contains("is not a version"), "{}", c.stderr);
    // A name that is no version lists every version the file names.
    rejects(
        "[versions.stable]\nupstream = \"ftp://x\"\nweight = 90\n[versions.canary]\nupstream = \"http://127.0.0.1:1\"\nweight = 10\n\n[rollback]\ntarget = \"stabel\"\n",
        &["`stabel` is not a version", "did you mean `stable`", "use one of `stable`, `canary`"],
    );
}

#[test]
fn discovery_is_dns_or_left_out_and_shown() {
    rejects(
        &format!("{STABLE}discovery = \"k8s\"\n"),
        &["versions.stable.discovery", "\"dns\"", "headless Service"],
    );
    rejects(
        &format!("{STABLE}discovery = true\n"),
        &["versions.stable.discovery"],
    );
    let c = check(&format!("{STABLE}discovery = \"dns\"\n"));
    assert_eq!(c.code, Some(0), "{}", c.stderr);
    assert!(
        c.stdout
            .contains("-> http://127.0.0.1:18081 (every address from DNS)\n"),
        "{}",
        c.stdout
    );
    let c = check(&format!("{STABLE}discovery = \"none\"\n"));
    assert_eq!(c.code, Some(0), "{}", c.stderr);
    assert!(!c.stdout.contains("every address"), "{}", c.stdout);
}
