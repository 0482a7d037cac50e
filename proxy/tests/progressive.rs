//! `[progress]` against real backends with 1 s steps: a healthy canary
//! walks every step to `complete` with the split following each step, a bad
//! one is rolled back and its weight never rises again, pause holds, an
//! edit restarts the run, and two processes given the same `start` are on
//! the same step at the same moment.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

const POLICY: &str = "target = \"stable\"\nerror_rate = 0.05\nmin_requests = 10\nwindow = \"60s\"";

fn progress_routes(stable: SocketAddr, canary: SocketAddr, progress: &str) -> String {
    routes(
        &[("stable", stable, 100), ("canary", canary, 0)],
        Some(POLICY),
    ) + "\n[progress]\n"
        + progress
}

fn step_of(s: &serde_json::Value) -> (u64, String) {
    (
        s["progress"]["step"].as_u64().unwrap(),
        s["progress"]["state"].as_str().unwrap().to_owned(),
    )
}

/// Versions of `n` sequential requests.
async fn canary_share(c: &TestClient, addr: SocketAddr, n: usize) -> f64 {
    let v = versions_of(c, addr, n).await;
    v.iter().filter(|v| *v == "v2").count() as f64 / n as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_walks_every_step_and_the_split_follows() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let canary = backend("v2", 0.0, Duration::ZERO).await;
    let proxy = TestProxy::start(&progress_routes(
        stable.addr(),
        canary.addr(),
        "version = \"canary\"\nsteps = [10, 50, 100]\nstep_time = \"1s\"\nmin_requests = 20\n",
    ))
    .await;
    let c = client();
    let steps: [f64; 3] = [10.0, 50.0, 100.0];
    let mut checked = [false; 3];
    let started = Instant::now();
    // Bounded: at most 60 s of batches of 300 requests.
    while started.elapsed() < Duration::from_secs(60) {
        let before = step_of(&proxy.status().await);
        let share = canary_share(&c, proxy.addr, 300).await;
        let after = step_of(&proxy.status().await);
        if before.0 == after.0 && before.0 >= 1 {
            let p = steps[before.0 as usize - 1] / 100.0;
            let sigma = (p * (1.0 - p) / 300.0).sqrt().max(0.01);
            assert!(
                (share - p).abs() <= 5.0 * sigma,
                "on step {} ({}%), the canary got {:.1}% of 300 requests",
                before.0,
                p * 100.0,
                share * 100.0
            );
            checked[before.0 as usize - 1] = true;
        }
        if after.1 == "complete" && checked.iter().all(|c| *c) {
            break;
        }
    }
    let s = proxy.status().await;
    assert_eq!(step_of(&s), (3, "complete".to_owned()), "{s:#}");
    assert_eq!(checked, [true; 3], "each step's split was observed");
    assert_eq!(s["progress"]["weight_percent"], 100);
    assert_eq!(s["progress"]["next_step_at"], serde_json::Value::Null);
    let m = proxy.metrics().await;
    assert_eq!(
        sample(&m, "canary_proxy_progress_step", &[("version", "canary")]),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &m,
            "canary_proxy_progress_state",
            &[("version", "canary"), ("state", "complete")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &m,
            "canary_proxy_progress_state",
            &[("version", "canary"), ("state", "progressing")]
        ),
        Some(0.0)
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_traffic_the_step_waits_for_evidence() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let canary = backend("v2", 0.0, Duration::ZERO).await;
    let proxy = TestProxy::start(&progress_routes(
        stable.addr(),
        canary.addr(),
        "version = \"canary\"\nsteps = [10, 100]\nstep_time = \"1s\"\nmin_requests = 50\n",
    ))
    .await;
    // No requests at all: the time is up, the evidence is not there.
    let s = eventually(Duration::from_secs(10), "waiting_for_evidence", || async {
        let s = proxy.status().await;
        (step_of(&s).1 == "waiting_for_evidence").then_some(s)
    })
    .await;
    assert_eq!(step_of(&s).0, 1);
    assert!(
        s["progress"]["reason"]
            .as_str()
            .unwrap()
            .contains("0 of 50"),
        "{s:#}"
    );
    // Too few answers still hold it.
    let c = client();
    versions_of(&c, proxy.addr, 100).await;
    // /status brings the run up to the moment it is read: no wait needed.
    assert_eq!(
        step_of(&proxy.status().await),
        (1, "waiting_for_evidence".to_owned())
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_canary_is_rolled_back_mid_way_and_its_weight_never_rises_again() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let canary = backend("v2", 0.3, Duration::ZERO).await;
    let proxy = TestProxy::start(&progress_routes(
        stable.addr(),
        canary.addr(),
        "version = \"canary\"\nsteps = [20, 50, 100]\nstep_time = \"1s\"\nmin_requests = 5\n",
    ))
    .await;
    let c = client();
    let s = eventually(Duration::from_secs(30), "the canary rolled back", || {
        let c = c.clone();
        let proxy = &proxy;
        async move {
            for _ in 0..50 {
                let _ = get(&c, proxy.addr, "/ping").await;
            }
            let s = proxy.status().await;
            (step_of(&s).1 == "rolled_back").then_some(s)
        }
    })
    .await;
    let step = step_of(&s).0;
    assert!(step < 3, "rolled back only at the last step: {s:#}");
    // For 3 s of traffic: no canary answer, and the step never moves.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert!(versions_of(&c, proxy.addr, 50)
            .await
            .iter()
            .all(|v| v == "v1"));
        let s = proxy.status().await;
        assert_eq!(step_of(&s), (step, "rolled_back".to_owned()));
        assert_eq!(s["versions"][1]["effective_weight"], 0);
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_the_step_and_an_edit_restarts_the_run() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let canary = backend("v2", 0.0, Duration::ZERO).await;
    let other = backend("v2", 0.0, Duration::ZERO).await;
    let progress =
        "version = \"canary\"\nsteps = [10, 30, 60, 100]\nstep_time = \"1s\"\nmin_requests = 10\n";
    let mut proxy =
        TestProxy::start(&progress_routes(stable.addr(), canary.addr(), progress)).await;
    let c = client();
    let load = Load::start(proxy.addr, 2, 200_000, Duration::from_secs(40));
    eventually(Duration::from_secs(15), "step 2", || async {
        (step_of(&proxy.status().await).0 >= 2).then_some(())
    })
    .await;
    proxy.set_routes(&progress_routes(
        stable.addr(),
        canary.addr(),
        &format!("{progress}paused = true\n"),
    ));
    let held = eventually(Duration::from_secs(10), "paused", || async {
        let s = proxy.status().await;
        (step_of(&s).1 == "paused").then(|| step_of(&s).0)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        step_of(&proxy.status().await),
        (held, "paused".to_owned()),
        "the step moved while paused"
    );

    // Resume: the run continues from the held step.
    proxy.set_routes(&progress_routes(stable.addr(), canary.addr(), progress));
    eventually(Duration::from_secs(15), "past the held step", || async {
        (step_of(&proxy.status().await).0 > held).then_some(())
    })
    .await;

    // A changed entry (a new canary build) starts over at step 1.
    proxy.set_routes(&progress_routes(stable.addr(), other.addr(), progress));
    eventually(Duration::from_secs(10), "back to step 1", || async {
        let s = proxy.status().await;
        (s["versions"][1]["upstream"] == format!("http://{}", other.addr()) && step_of(&s).0 == 1)
            .then_some(())
    })
    .await;
    let (_, failed, first) = load.finish().await;
    assert_eq!(failed, 0, "{first:?}");
    drop(c);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_with_the_same_start_are_on_the_same_step_at_the_same_moment() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let canary = backend("v2", 0.0, Duration::ZERO).await;
    // A start 3 s from now, to the second, as an operator would write it.
    let start = std::time::SystemTime::now() + Duration::from_secs(3);
    let start = humantime::format_rfc3339_seconds(start).to_string();
    let text = progress_routes(
        stable.addr(),
        canary.addr(),
        &format!("version = \"canary\"\nsteps = [10, 25, 50, 75, 100]\nstep_time = \"2s\"\nmin_requests = 10\nstart = \"{start}\"\n"),
    );
    let cm = ConfigMapDir::new(&[("routes.toml", text.as_bytes())]);
    let a = spawn_proxy_binary(&cm.path("routes.toml"), &[]);
    // The second replica comes up a second later, as a rollout would.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = spawn_proxy_binary(&cm.path("routes.toml"), &[]);
    let loads = [
        Load::start(a.addr(), 2, 200_000, Duration::from_secs(30)),
        Load::start(b.addr(), 2, 200_000, Duration::from_secs(30)),
    ];
    let mut compared = 0;
    let mut seen_steps = std::collections::BTreeSet::new();
    let until = Instant::now() + Duration::from_secs(25);
    while Instant::now() < until {
        let (a1, b1, a2) = (
            status(a.admin()).await,
            status(b.admin()).await,
            status(a.admin()).await,
        );
        let (sa1, sb, sa2) = (step_of(&a1), step_of(&b1), step_of(&a2));
        // Away from a step change (a the same before and after b was read),
        // both must be on the same step.
        if sa1 == sa2 {
            assert_eq!(
                sa1.0, sb.0,
                "replicas on different steps: a {sa1:?}, b {sb:?}"
            );
            compared += 1;
            seen_steps.insert(sa1.0);
        }
        if sa1.1 == "complete" && sb.1 == "complete" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for load in loads {
        let (_, failed, first) = load.finish().await;
        assert_eq!(failed, 0, "{first:?}");
    }
    assert!(compared > 50, "only {compared} comparisons");
    assert_eq!(
        seen_steps.into_iter().collect::<Vec<_>>(),
        [0, 1, 2, 3, 4, 5],
        "both walked every step"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_blue_green_switches_only_after_the_copies_are_judged() {
    let blue = backend("v1", 0.0, Duration::ZERO).await;
    let green = backend("v2", 0.0, Duration::ZERO).await;
    let text = routes(&[("stable", blue.addr(), 100), ("canary", green.addr(), 0)], Some(POLICY))
        + "\n[mirror]\nversion = \"canary\"\nshare = 0.5\n\n[progress]\nversion = \"canary\"\nsteps = [0, 100]\nstep_time = \"1s\"\nmin_requests = 100\n";
    let proxy = TestProxy::start(&text).await;
    let c = client();
    // Time alone does not switch: past the step's time, no copy yet.
    let s = eventually(
        Duration::from_secs(10),
        "waiting_for_evidence at 0%",
        || async {
            let s = proxy.status().await;
            (step_of(&s).1 == "waiting_for_evidence").then_some(s)
        },
    )
    .await;
    assert_eq!(
        (step_of(&s).0, s["progress"]["weight_percent"].as_u64()),
        (1, Some(0))
    );
    // Blue serves; half its GETs are copied to green and judged. Until
    // 100 copies are judged, no user reaches green.
    let green_before_switch = std::sync::atomic::AtomicUsize::new(0);
    let switched = eventually(Duration::from_secs(30), "the switch to green", || {
        let c = c.clone();
        let (proxy, counter) = (&proxy, &green_before_switch);
        async move {
            let v = versions_of(&c, proxy.addr, 20).await;
            let s = proxy.status().await;
            if step_of(&s).1 == "complete" {
                // The switch may have come during this batch: its answers
                // say nothing about before it.
                return Some(s);
            }
            // Still not switched after the batch: all of it came before.
            let green = v.iter().filter(|v| *v == "v2").count();
            counter.fetch_add(green, std::sync::atomic::Ordering::Relaxed);
            None
        }
    })
    .await;
    assert_eq!(
        green_before_switch.into_inner(),
        0,
        "a user reached green before the switch"
    );
    assert_eq!(switched["progress"]["weight_percent"], 100);
    let m = proxy.metrics().await;
    let copies = sample(
        &m,
        "canary_proxy_mirror_requests_total",
        &[("version", "canary"), ("code", "200")],
    )
    .unwrap_or(0.0);
    assert!(copies >= 100.0, "switched after {copies} copies");
    // After the switch, green serves everyone.
    assert!(versions_of(&c, proxy.addr, 50)
        .await
        .iter()
        .all(|v| v == "v2"));
    proxy.shutdown().await;
}
