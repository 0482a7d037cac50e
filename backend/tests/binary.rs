//! The real `ping-backend` binary: the SIGTERM sequence and the messages for bad
//! flags. Every process started here is killed when its `Process` is dropped,
//! also when a test fails.

mod common;

use std::process::{Command, ExitStatus};
use std::time::Duration;

use common::{eventually, fresh_client, get};
use http::StatusCode;
use ping_backend::testkit::Process;

const BIN: &str = env!("CARGO_BIN_EXE_ping-backend");
/// Generous: these deadlines only turn a hang into a failure.
const DEADLINE: Duration = Duration::from_secs(20);

/// The binary with a clean environment: PING_* or RUST_LOG from the shell that
/// runs the tests must not change what is tested.
fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env("RUST_LOG", "info");
    for var in [
        "PING_LISTEN",
        "PING_VERSION",
        "PING_ERROR_RATE",
        "PING_LATENCY",
        "PING_DRAIN_DELAY",
        "PING_SHUTDOWN_TIMEOUT",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// A running backend process and its address, from its ready line.
struct Running {
    process: Process,
    addr: std::net::SocketAddr,
}

fn start(args: &[&str]) -> Running {
    let mut process = Process::spawn(command(args).args(["--listen", "127.0.0.1:0"]));
    let addr = process.listening(DEADLINE).addr("addr");
    Running { process, addr }
}

/// Run the binary to its exit (it is expected to fail at start) and return the
/// exit status and stderr.
fn run_to_exit(cmd: &mut Command) -> (ExitStatus, String) {
    Process::run_to_exit(cmd, DEADLINE)
}

fn field(line: &str, name: &str) -> Option<u64> {
    let (_, rest) = line.split_once(&format!("{name}="))?;
    rest.split_whitespace().next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_finishes_in_flight_requests_and_exits_0() {
    // The latency is longer than the drain delay, so requests started before the
    // listener closes are still running when it does.
    let mut backend = start(&[
        "--latency",
        "3s",
        "--drain-delay",
        "1s",
        "--version",
        "v-term",
    ]);
    let addr = backend.addr;
    let client = fresh_client();
    assert_eq!(
        get(&client, addr, "/readyz").await.unwrap().status,
        StatusCode::OK
    );

    let slow = {
        let client = client.clone();
        tokio::spawn(async move { get(&client, addr, "/ping").await.unwrap() })
    };
    backend.process.signal("TERM");

    eventually("readyz to turn 503", DEADLINE, || async {
        let answer = get(&client, addr, "/readyz")
            .await
            .expect("the backend stopped accepting before readyz turned 503");
        (answer.status == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    // During the drain delay the process is alive and new connections are served.
    assert_eq!(
        get(&client, addr, "/healthz").await.unwrap().status,
        StatusCode::OK
    );
    let during_drain = {
        let client = client.clone();
        tokio::spawn(async move { get(&client, addr, "/ping").await.unwrap() })
    };

    for request in [slow, during_drain] {
        let answer = tokio::time::timeout(DEADLINE, request)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (StatusCode::OK, "pong")
        );
        assert_eq!(answer.headers["x-ping-version"], "v-term");
    }

    let status = eventually("the backend to exit", DEADLINE, || {
        let status = backend.process.try_wait();
        async move { status }
    })
    .await;
    assert_eq!(status.code(), Some(0), "exit status {status}");

    // One log line per phase, in order. The listener closed while requests were
    // still running (at least the one started during the drain, which takes 3 s
    // and was accepted before the close), and they all finished.
    // Returns at once (the exit is known) once stderr is read to its end.
    backend.process.wait_exit(DEADLINE);
    let log = backend.process.stderr_lines();
    let phases = [
        "listening on",
        "received SIGTERM",
        "draining: readyz now 503",
        "drain delay over: closing listener",
        "all connections finished",
    ];
    let mut at = 0;
    for phase in phases {
        let found = log[at..].iter().position(|line| line.contains(phase));
        let found = found.unwrap_or_else(|| panic!("no {phase:?} after line {at} in {log:#?}"));
        at += found;
    }
    let closing = log.iter().find(|l| l.contains("closing listener")).unwrap();
    let open = field(closing, "open_connections").expect("open_connections in the log line");
    assert!(
        open >= 1,
        "no request in flight when the listener closed: {closing}"
    );
}

#[test]
fn a_bad_error_rate_is_refused_naming_the_flag() {
    let (status, stderr) = run_to_exit(&mut command(&["--error-rate", "1.5"]));
    assert!(!status.success());
    assert_eq!(
        stderr.lines().next().unwrap(),
        "error: invalid value '1.5' for '--error-rate <F>': must be a fraction between 0.0 and 1.0 (e.g. 0.25)"
    );
}

#[test]
fn a_bad_env_var_is_refused_naming_the_flag() {
    let (status, stderr) = run_to_exit(command(&[]).env("PING_ERROR_RATE", "-1"));
    assert!(!status.success());
    let first = stderr.lines().next().unwrap();
    assert!(
        first.contains("'--error-rate <F>'") && first.contains("between 0.0 and 1.0"),
        "{stderr}"
    );
}

#[test]
fn a_bad_latency_is_refused_naming_the_flag() {
    let (status, stderr) = run_to_exit(&mut command(&["--latency", "abc"]));
    assert!(!status.success());
    let first = stderr.lines().next().unwrap();
    assert!(
        first.starts_with("error: invalid value 'abc' for '--latency <DURATION>'"),
        "{stderr}"
    );
    assert!(first.contains("like 250ms"), "{stderr}");
}

#[test]
fn an_unbindable_address_is_refused_in_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().map(|addr| addr.to_string()).unwrap();
    for listen in [taken.as_str(), "not-an-address"] {
        let (status, stderr) = run_to_exit(&mut command(&["--listen", listen]));
        assert!(!status.success(), "--listen {listen}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with(&format!("error: --listen {listen}: cannot bind: ")),
            "{stderr}"
        );
        assert!(
            stderr.contains("give an address like 0.0.0.0:8080"),
            "{stderr}"
        );
    }
}

#[test]
fn help_describes_every_flag_and_its_env_var() {
    let output = command(&["--help"]).output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for (flag, env) in [
        ("--listen <ADDR>", "PING_LISTEN"),
        ("--version <NAME>", "PING_VERSION"),
        ("--error-rate <F>", "PING_ERROR_RATE"),
        ("--latency <DURATION>", "PING_LATENCY"),
        ("--drain-delay <DURATION>", "PING_DRAIN_DELAY"),
        ("--shutdown-timeout <DURATION>", "PING_SHUTDOWN_TIMEOUT"),
    ] {
        let line = help
            .lines()
            .find(|line| line.contains(flag))
            .unwrap_or_else(|| panic!("{flag} missing from --help:\n{help}"));
        assert!(line.contains(env), "{flag} does not name {env}: {line}");
    }
}

#[test]
fn the_build_version_is_dash_capital_v_since_version_names_the_reported_one() {
    for flag in ["-V", "--build-version"] {
        let output = command(&[flag]).output().unwrap();
        assert!(output.status.success(), "{flag}");
        let out = String::from_utf8(output.stdout).unwrap();
        assert_eq!(
            out.trim(),
            format!("ping-backend {}", env!("CARGO_PKG_VERSION")),
            "{flag}"
        );
    }
}
