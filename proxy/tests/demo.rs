//! `canary-proxy demo` from the workspace root, as the README tells a user
//! to run it: it starts, serves pong on 127.0.0.1:8080 and prints its live
//! view. This is the only test that uses the demo's fixed ports (8080, 9090,
//! 18081, 18082).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_pong_on_8080_and_prints_live_lines() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut demo = Process::spawn(
        Command::new(env!("CARGO_BIN_EXE_canary-proxy"))
            .args(["demo", "--duration", "8s", "--traffic", "0"])
            .current_dir(&root)
            .env("RUST_LOG", "warn"),
    );

    let addr = "127.0.0.1:8080".parse().unwrap();
    let c = client();
    let pong = eventually(
        Duration::from_secs(20),
        "the demo to answer GET /ping on 127.0.0.1:8080",
        || {
            if let Some(status) = demo.try_wait() {
                panic!(
                    "demo exited early with {status}; stdout: {:?}; stderr: {:?}",
                    demo.stdout_lines(),
                    demo.stderr_lines()
                );
            }
            let c = &c;
            async move { get(c, addr, "/ping").await.ok().filter(|a| a.status == 200) }
        },
    )
    .await;
    assert_eq!(pong.body, "pong");
    assert!(
        matches!(pong.version(), "v1" | "v2"),
        "answered by a demo backend: {:?}",
        pong.version()
    );

    // The banner, then one live line per version per second; the request
    // above shows up in the counts.
    eventually(
        Duration::from_secs(10),
        "live lines for stable and canary on stdout",
        || async {
            let lines = demo.stdout_lines();
            let live = |name: &str| {
                lines.iter().any(|l| {
                    l.starts_with('[')
                        && l.contains(name)
                        && l.contains("share")
                        && l.contains("requests")
                })
            };
            (live("stable") && live("canary")).then_some(())
        },
    )
    .await;
    let lines = demo.stdout_lines();
    assert!(
        lines.iter().any(|l| l.contains("http://127.0.0.1:8080")),
        "the banner names the proxy address: {lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("config/demo/routes.toml")),
        "the banner names the routes file to edit: {lines:?}"
    );

    // Stop it now rather than wait out --duration.
    drop(demo);

    // `--sticky`: the same ports, one demo at a time. Its traffic is eight
    // users, and the live view says where each one is.
    let mut demo = Process::spawn(
        Command::new(env!("CARGO_BIN_EXE_canary-proxy"))
            .args(["demo", "--sticky", "--duration", "20s", "--traffic", "40"])
            .current_dir(&root)
            .env("RUST_LOG", "warn"),
    );
    let users = eventually(
        Duration::from_secs(20),
        "a users line with a version for each of the 8 users",
        || {
            if let Some(status) = demo.try_wait() {
                panic!(
                    "demo --sticky exited early with {status}; stdout: {:?}; stderr: {:?}",
                    demo.stdout_lines(),
                    demo.stderr_lines()
                );
            }
            let line = demo
                .stdout_lines()
                .into_iter()
                .rev()
                .find(|l| l.starts_with('[') && l.contains("users: "));
            async move { line.filter(|l| !l.contains(" -,") && !l.contains(" -  ")) }
        },
    )
    .await;
    // Two more seconds of traffic, then nobody has moved: the weights stayed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let last = demo
        .stdout_lines()
        .into_iter()
        .rev()
        .find(|l| l.contains("users: "))
        .unwrap();
    assert!(
        last.contains("(moves so far: 0)"),
        "a user changed version: {last}"
    );
    for user in ["ada", "hal"] {
        assert!(
            users.contains(&format!("{user} stable")) || users.contains(&format!("{user} canary")),
            "{users}"
        );
    }
    drop(demo);

    // `--progressive`: the canary steps up to complete on its own.
    let mut demo = Process::spawn(
        Command::new(env!("CARGO_BIN_EXE_canary-proxy"))
            .args([
                "demo",
                "--progressive",
                "--duration",
                "60s",
                "--traffic",
                "60",
            ])
            .current_dir(&root)
            .env("RUST_LOG", "warn"),
    );
    eventually(
        Duration::from_secs(50),
        "a progress line that says complete",
        || {
            if let Some(status) = demo.try_wait() {
                panic!(
                    "demo --progressive exited early with {status}; stdout: {:?}; stderr: {:?}",
                    demo.stdout_lines(),
                    demo.stderr_lines()
                );
            }
            let done = demo
                .stdout_lines()
                .iter()
                .any(|l| l.contains("progress: canary step 4/4 (100%)  complete"));
            async move { done.then_some(()) }
        },
    )
    .await;
    let lines = demo.stdout_lines();
    for step in ["step 1/4 (10%)", "step 2/4 (25%)", "step 3/4 (50%)"] {
        assert!(
            lines.iter().any(|l| l.contains(step)),
            "no line shows {step}: {lines:?}"
        );
    }
    drop(demo);
}
