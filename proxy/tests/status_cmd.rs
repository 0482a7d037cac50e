//! `canary-proxy status`, the real binary, against a live proxy in this
//! process (real ping backends on 127.0.0.1:0): the view, the JSON, the exit
//! codes scripts rely on, and `--watch`.

mod common;

use std::process::{Command, ExitStatus};
use std::time::Duration;

use common::*;

/// Generous: only turns a command that hangs into a failure. A fetch gives
/// up after --timeout (5 s by default).
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// `canary-proxy status ARGS`, none of the shell's `CANARY_PROXY_*`
/// variables passed on (`CANARY_PROXY_ADMIN` would change the address).
fn status_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_canary-proxy"));
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("CANARY_PROXY_") {
            command.env_remove(var);
        }
    }
    command.arg("status").args(args).env("NO_COLOR", "1");
    command
}

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Run the command to its exit, off the async runtime that serves the proxy.
async fn run(args: &[&str]) -> Run {
    let mut command = status_command(args);
    tokio::task::spawn_blocking(move || {
        let mut child = Process::spawn(&mut command);
        let status = child.wait_exit(EXIT_TIMEOUT);
        Run {
            status,
            stdout: child.stdout_lines().join("\n"),
            stderr: child.stderr_text(),
        }
    })
    .await
    .unwrap()
}

fn admin_url(proxy: &TestProxy) -> String {
    format!("http://{}", proxy.admin)
}

/// Stable and canary at 90/10, and `n` requests through them.
async fn healthy_proxy(n: usize) -> (TestProxy, [ping_backend::Handle; 2]) {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let canary = backend("v2", 0.0, Duration::ZERO).await;
    let proxy = TestProxy::start(&routes(
        &[("stable", stable.addr(), 90), ("canary", canary.addr(), 10)],
        None,
    ))
    .await;
    versions_of(&client(), proxy.addr, n).await;
    (proxy, [stable, canary])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_of_a_healthy_split_names_versions_weights_and_counts() {
    let (proxy, _backends) = healthy_proxy(100).await;
    let out = run(&["--admin", &admin_url(&proxy)]).await;
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
    let view = out.stdout;
    let hash = proxy.status().await["routes"]["hash"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(view.contains(&format!("hash {hash}")), "{view}");
    assert!(view.contains("rollback  off"), "{view}");
    assert!(view.contains("progress  -"), "{view}");
    assert!(
        view.contains("  weight    90 (90%)  effective 90 (90%)"),
        "{view}"
    );
    assert!(
        view.contains("  weight    10 (10%)  effective 10 (10%)"),
        "{view}"
    );
    // Every answer was a 200: the window counts all 100 requests, split
    // between the two versions, and no errors.
    let counts: Vec<u64> = view
        .lines()
        .filter_map(|l| l.strip_prefix("  window    "))
        .map(|l| {
            assert!(l.contains(" 0 errors (0%)"), "{l}");
            l.split(' ').next().unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(counts.len(), 2, "{view}");
    assert_eq!(counts.iter().sum::<u64>(), 100, "{view}");
    for name in ["stable", "canary"] {
        assert!(
            view.lines()
                .any(|l| l.starts_with(&format!("{name}  http://"))),
            "{view}"
        );
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_output_is_the_status_document() {
    let (proxy, _backends) = healthy_proxy(20).await;
    let out = run(&["--admin", &admin_url(&proxy), "--output", "json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
    let printed: serde_json::Value = serde_json::from_str(&out.stdout).expect("stdout is JSON");
    let served = proxy.status().await;
    // Counts and uptime move between the two reads; the routes do not.
    assert_eq!(printed["routes"], served["routes"]);
    assert_eq!(printed["reload"], served["reload"]);
    let names = |doc: &serde_json::Value| -> Vec<serde_json::Value> {
        doc["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].clone())
            .collect()
    };
    assert_eq!(names(&printed), ["stable", "canary"]);
    assert_eq!(names(&printed), names(&served));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_canary_exits_1_and_says_why() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let canary = backend("v2", 1.0, Duration::ZERO).await;
    let proxy = TestProxy::start(&routes(
        &[("stable", stable.addr(), 50), ("canary", canary.addr(), 50)],
        Some("target = \"stable\"\nerror_rate = 0.1\nmin_requests = 20\nwindow = \"60s\""),
    ))
    .await;
    let c = client();
    // Bounded: at 100% errors the canary trips after about 20 of its answers.
    for _ in 0..500 {
        get(&c, proxy.addr, "/ping").await.unwrap();
        if proxy.status().await["versions"][1]["rolled_back"] == true {
            break;
        }
    }
    assert_eq!(proxy.status().await["versions"][1]["rolled_back"], true);

    let out = run(&["--admin", &admin_url(&proxy)]).await;
    assert_eq!(out.status.code(), Some(1), "{}{}", out.stdout, out.stderr);
    let reason = proxy.status().await["versions"][1]["rollback"]["reason"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(out.stdout.contains("ROLLED BACK"), "{}", out.stdout);
    assert!(out.stdout.contains(&reason), "{}", out.stdout);
    assert!(
        out.stdout.contains("its traffic goes to stable"),
        "{}",
        out.stdout
    );
    // The JSON output exits the same way.
    let json = run(&["--admin", &admin_url(&proxy), "--output", "json"]).await;
    assert_eq!(json.status.code(), Some(1), "{}", json.stderr);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_exits_2_and_says_what_to_check() {
    for output in ["text", "json"] {
        let out = run(&["--admin", "http://127.0.0.254:1", "--output", output]).await;
        assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
        assert_eq!(out.stdout, "", "nothing on stdout for a script to mistake");
        for expected in [
            "http://127.0.0.254:1",
            "Is the proxy running",
            "kubectl -n canary-proxy port-forward deploy/canary-proxy 9090:9090",
            "--admin",
        ] {
            assert!(out.stderr.contains(expected), "{expected}: {}", out.stderr);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_traffic_port_is_not_a_status_document() {
    let (proxy, _backends) = healthy_proxy(1).await;
    // The ping backend answers 404 for /status, through the proxy.
    let out = run(&["--admin", &format!("http://{}", proxy.addr)]).await;
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("not its traffic port"),
        "{}",
        out.stderr
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_redraws_until_stopped_and_survives_an_outage() {
    let (proxy, _backends) = healthy_proxy(10).await;
    let mut command = status_command(&[
        "--admin",
        &admin_url(&proxy),
        "--watch",
        "--interval",
        "200ms",
    ]);
    let (redraws, exit) = tokio::task::spawn_blocking(move || {
        let mut child = Process::spawn(&mut command);
        // Bounded: 3 s at 200 ms is about 15 redraws; two are enough.
        std::thread::sleep(Duration::from_secs(3));
        let running = child.try_wait().is_none();
        child.signal("INT");
        let exit = child.wait_exit(EXIT_TIMEOUT);
        let out = child.stdout_lines().join("\n");
        assert!(running, "--watch exited by itself: {out}");
        (out.matches("\x1b[H\x1b[2J").count(), exit)
    })
    .await
    .unwrap();
    assert!(redraws >= 2, "{redraws} redraws in 3 s");
    assert_eq!(exit.code(), Some(0), "Ctrl-C ends --watch with 0");

    // An address nothing listens on: the view shows the error and goes on.
    let mut command = status_command(&[
        "--admin",
        "http://127.0.0.254:1",
        "--watch",
        "--interval",
        "100ms",
    ]);
    let (running, out) = tokio::task::spawn_blocking(move || {
        let mut child = Process::spawn(&mut command);
        std::thread::sleep(Duration::from_secs(1));
        let running = child.try_wait().is_none();
        child.signal("INT");
        child.wait_exit(EXIT_TIMEOUT);
        (running, child.stdout_lines().join("\n"))
    })
    .await
    .unwrap();
    assert!(
        running,
        "--watch keeps trying an unreachable address: {out}"
    );
    assert!(out.matches("\x1b[H\x1b[2J").count() >= 2, "{out}");
    assert!(
        out.contains("cannot connect to http://127.0.0.254:1") && out.contains("retrying"),
        "{out}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_progress_run_is_shown_with_its_step_and_state() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let canary = backend("v2", 0.0, Duration::ZERO).await;
    let proxy = TestProxy::start(
        &(routes(
            &[("stable", stable.addr(), 100), ("canary", canary.addr(), 0)],
            Some("target = \"stable\""),
        ) + "\n[progress]\nversion = \"canary\"\nsteps = [10, 100]\nstep_time = \"1h\"\nmin_requests = 5\n"),
    )
    .await;
    let run = run(&["--admin", &admin_url(&proxy)]).await;
    assert_eq!(run.status.code(), Some(0), "{}{}", run.stdout, run.stderr);
    let line = run
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("progress"))
        .unwrap_or_else(|| panic!("no progress line:\n{}", run.stdout));
    for part in ["canary", "1/2", "10%", "progressing"] {
        assert!(line.contains(part), "{part:?} missing from {line:?}");
    }
    proxy.shutdown().await;
}
