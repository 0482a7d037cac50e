//! Hot reload from a kubelet-style ConfigMap directory: changes apply on
//! their own, bad content keeps the last good table, nothing is dropped.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_swap_from_90_10_to_0_100_sends_everything_to_canary() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let canary = backend("v2", 0.0, Duration::ZERO).await;
    let mut proxy = TestProxy::start(&routes(
        &[("stable", stable.addr(), 90), ("canary", canary.addr(), 10)],
        None,
    ))
    .await;
    let c = client();
    let before = proxy.status().await["routes"]["hash"]
        .as_str()
        .unwrap()
        .to_owned();

    let new_routes = routes(
        &[("stable", stable.addr(), 0), ("canary", canary.addr(), 100)],
        None,
    );
    proxy.set_routes(&new_routes);
    let new_hash = canary_proxy::content_hash(new_routes.as_bytes());
    assert_ne!(before, new_hash);
    eventually(
        Duration::from_secs(5),
        "the proxy to report the new routes hash",
        || async { (proxy.status().await["routes"]["hash"] == new_hash.as_str()).then_some(()) },
    )
    .await;
    for _ in 0..200 {
        let a = get(&c, proxy.addr, "/ping").await.unwrap();
        assert_eq!(
            (a.status.as_u16(), a.version()),
            (200, "v2"),
            "every request after the swap goes to the canary"
        );
    }
    proxy.shutdown().await;
}

/// Routes sending everything to one of two backends.
fn all_to(stable: std::net::SocketAddr, canary: std::net::SocketAddr, to_canary: bool) -> String {
    let (s, c) = if to_canary { (0, 100) } else { (100, 0) };
    routes(&[("stable", stable, s), ("canary", canary, c)], None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_swaps_under_load_drop_nothing_and_never_route_by_a_stale_table() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let canary = backend("v2", 0.0, Duration::ZERO).await;
    let mut proxy = TestProxy::start(&all_to(stable.addr(), canary.addr(), false)).await;
    let load = Load::start(proxy.addr, 4, 200_000, Duration::from_secs(60));
    let c = client();
    for i in 1..=50 {
        let to_canary = i % 2 == 1;
        let want = if to_canary { "v2" } else { "v1" };
        proxy.set_routes(&all_to(stable.addr(), canary.addr(), to_canary));
        // The swap is "seen" by the first request the new table routes.
        eventually(Duration::from_secs(5), "the swap to be applied", || async {
            (get(&c, proxy.addr, "/ping").await.ok()?.version() == want).then_some(())
        })
        .await;
        // From then on, never the old table: every request goes to `want`.
        let after = versions_of(&c, proxy.addr, 20).await;
        assert!(
            after.iter().all(|v| v == want),
            "swap {i}: a request after the swap was routed by the old table: {after:?}"
        );
    }
    let (requests, failures, first) = load.finish().await;
    assert!(requests > 0);
    assert_eq!(
        failures, 0,
        "{failures} of {requests} concurrent requests failed during the swaps; first: {first:?}"
    );
    let status = proxy.status().await;
    assert_eq!(status["reload"]["successes"], 50);
    assert_eq!(status["reload"]["failures"], 0);
    proxy.shutdown().await;
}

/// Each way a ConfigMap update can be bad, with a fragment the reported
/// error must contain.
fn bad_contents(
    stable: std::net::SocketAddr,
    canary: std::net::SocketAddr,
) -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let good = all_to(stable, canary, false);
    vec![
        (
            "invalid TOML",
            b"[versions.stable\nupstream = ".to_vec(),
            "not valid TOML",
        ),
        ("empty file", Vec::new(), "empty"),
        (
            "unknown key",
            good.replacen("weight", "wieght", 1).into_bytes(),
            "did you mean `weight`",
        ),
        (
            "negative weight",
            good.replacen("weight = 100", "weight = -5", 1).into_bytes(),
            "negative",
        ),
        (
            "all weights zero",
            good.replacen("weight = 100", "weight = 0", 1).into_bytes(),
            "all weights are zero",
        ),
        (
            "bad URL",
            good.replacen("http://", "http//", 1).into_bytes(),
            "upstream",
        ),
        (
            "unsupported scheme",
            good.replacen("http://", "ftp://", 1).into_bytes(),
            "scheme",
        ),
        (
            "bad rollback target",
            format!("{good}[rollback]\ntarget = \"stabel\"\n").into_bytes(),
            "did you mean `stable`",
        ),
        (
            "out-of-range error rate",
            format!("{good}[rollback]\ntarget = \"stable\"\nerror_rate = 1.5\n").into_bytes(),
            "error_rate",
        ),
        ("not UTF-8", vec![0xff, 0xfe, 0x00, 0x5b], "UTF-8"),
        (
            "duplicate version",
            format!("{good}[versions.canary]\nupstream = \"http://{canary}\"\nweight = 1\n")
                .into_bytes(),
            "duplicate",
        ),
        (
            "version name not a DNS label",
            good.replacen("versions.canary", "versions.Canary_2", 1)
                .into_bytes(),
            "DNS label",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_content_keeps_the_last_good_table_and_the_next_good_swap_applies() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let canary = backend("v2", 0.0, Duration::ZERO).await;
    let mut proxy = TestProxy::start(&all_to(stable.addr(), canary.addr(), false)).await;
    let c = client();
    let mut serving_canary = false;
    let mut failures = 0u64;

    let mut cases: Vec<(&str, Option<Vec<u8>>, &str)> = bad_contents(stable.addr(), canary.addr())
        .into_iter()
        .map(|(n, b, f)| (n, Some(b), f))
        .collect();
    // Two that are not bad bytes but a bad volume: the key is gone from the
    // ConfigMap (file deleted), and `..data` points at nothing (directory gone).
    cases.push(("file deleted", None, "cannot read routes file"));
    cases.push(("directory gone", None, "cannot read routes file"));

    for (name, content, fragment) in cases {
        match (name, content) {
            (_, Some(bytes)) => {
                proxy.config_map.update(&[("routes.toml", &bytes)]);
            }
            ("file deleted", None) => {
                proxy.config_map.update(&[("other-key", b"x")]);
            }
            (_, None) => proxy.config_map.break_data_link(),
        }
        failures += 1;
        let status = eventually(
            Duration::from_secs(5),
            &format!("the {name} reload to be reported as failed"),
            || async {
                let s = proxy.status().await;
                (s["reload"]["failures"] == failures).then_some(s)
            },
        )
        .await;
        let error = status["reload"]["last_error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            error.contains(fragment),
            "{name}: the error should mention {fragment:?}; got: {error}"
        );
        let want = if serving_canary { "v2" } else { "v1" };
        let seen = versions_of(&c, proxy.addr, 30).await;
        assert!(
            seen.iter().all(|v| v == want),
            "{name}: the last good table must stay; saw {seen:?}"
        );

        // The next good update is applied.
        serving_canary = !serving_canary;
        let want = if serving_canary { "v2" } else { "v1" };
        proxy.set_routes(&all_to(stable.addr(), canary.addr(), serving_canary));
        eventually(
            Duration::from_secs(5),
            &format!("recovery after {name}"),
            || async { (get(&c, proxy.addr, "/ping").await.ok()?.version() == want).then_some(()) },
        )
        .await;
        let status = proxy.status().await;
        assert!(
            status["reload"]["last_error"].is_null(),
            "{name}: a good reload clears the error: {status}"
        );
    }
    let text = proxy.metrics().await;
    assert_eq!(
        sample(
            &text,
            "canary_proxy_config_reloads_total",
            &[("result", "failure")]
        ),
        Some(failures as f64)
    );
    proxy.shutdown().await;
}

/// `canary_proxy_config_last_reload_successful` as scraped now.
async fn last_reload_ok(proxy: &TestProxy) -> Option<f64> {
    sample(
        &proxy.metrics().await,
        "canary_proxy_config_last_reload_successful",
        &[],
    )
}

/// The operator's usual sequence: a typo is applied, then the file is put
/// back as it was. Putting it back publishes nothing and counts no
/// successful reload (the content is the active one), so only the gauge
/// can tell an alert that the failure is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixing_the_typo_sets_last_reload_successful_back_to_1() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let canary = backend("v2", 0.0, Duration::ZERO).await;
    let good = all_to(stable.addr(), canary.addr(), false);
    let mut proxy = TestProxy::start(&good).await;
    assert_eq!(
        last_reload_ok(&proxy).await,
        Some(1.0),
        "nothing failed yet"
    );

    for (round, (name, bad, _)) in bad_contents(stable.addr(), canary.addr())
        .into_iter()
        .take(3)
        .enumerate()
    {
        let failures = round as u64 + 1;
        proxy.config_map.update(&[("routes.toml", &bad)]);
        eventually(
            Duration::from_secs(5),
            &format!("the {name} reload to fail"),
            || async { (proxy.status().await["reload"]["failures"] == failures).then_some(()) },
        )
        .await;
        assert_eq!(last_reload_ok(&proxy).await, Some(0.0), "{name}");

        // The fix: the last good content, byte for byte.
        proxy.set_routes(&good);
        eventually(
            Duration::from_secs(5),
            &format!("the fix of {name} to clear the error"),
            || async {
                proxy.status().await["reload"]["last_error"]
                    .is_null()
                    .then_some(())
            },
        )
        .await;
        assert_eq!(last_reload_ok(&proxy).await, Some(1.0), "{name}");
    }
    let text = proxy.metrics().await;
    assert_eq!(
        sample(
            &text,
            "canary_proxy_config_reloads_total",
            &[("result", "success")]
        ),
        Some(0.0),
        "restoring the active content counts no successful reload"
    );

    // A missing file (the key dropped from the ConfigMap) and its return.
    proxy.config_map.update(&[("other-key", b"x")]);
    eventually(
        Duration::from_secs(5),
        "the missing file to set the gauge to 0",
        || async { (last_reload_ok(&proxy).await == Some(0.0)).then_some(()) },
    )
    .await;
    proxy.set_routes(&good);
    eventually(
        Duration::from_secs(5),
        "the file's return to set the gauge to 1",
        || async { (last_reload_ok(&proxy).await == Some(1.0)).then_some(()) },
    )
    .await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_file_edited_in_place_or_saved_by_rename_is_applied() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let canary = backend("v2", 0.0, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.toml");
    std::fs::write(&path, all_to(stable.addr(), canary.addr(), false)).unwrap();
    // The ConfigMap directory is unused here; the file is a plain one.
    let proxy = TestProxy::start_at(ConfigMapDir::new(&[]), &path, |_| {}).await;
    let addr = proxy.addr;
    let c = client();

    // In place, as `echo > routes.toml` or an editor without backup does.
    std::fs::write(&path, all_to(stable.addr(), canary.addr(), true)).unwrap();
    eventually(
        Duration::from_secs(5),
        "the in-place edit to apply",
        || async { (get(&c, addr, "/ping").await.ok()?.version() == "v2").then_some(()) },
    )
    .await;

    // Through a rename, as vim and most editors save.
    let swap = dir.path().join(".routes.toml.swp");
    std::fs::write(&swap, all_to(stable.addr(), canary.addr(), false)).unwrap();
    std::fs::rename(&swap, &path).unwrap();
    eventually(
        Duration::from_secs(5),
        "the editor-style rename to apply",
        || async { (get(&c, addr, "/ping").await.ok()?.version() == "v1").then_some(()) },
    )
    .await;
    assert!(versions_of(&c, addr, 20).await.iter().all(|v| v == "v1"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn identical_content_is_not_reapplied() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let canary = backend("v2", 0.0, Duration::ZERO).await;
    let text = all_to(stable.addr(), canary.addr(), false);
    let mut proxy = TestProxy::start(&text).await;
    let generation = proxy.status().await["routes"]["generation"].clone();
    // Same bytes, new kubelet directory: events fire, nothing changes.
    proxy.set_routes(&text);
    // Then a real change, to know the watcher has looked at the first one.
    proxy.set_routes(&all_to(stable.addr(), canary.addr(), true));
    let status = eventually(
        Duration::from_secs(5),
        "the real change to apply",
        || async {
            let s = proxy.status().await;
            (s["reload"]["successes"] == 1).then_some(s)
        },
    )
    .await;
    assert_eq!(
        status["routes"]["generation"],
        generation.as_u64().unwrap() + 1,
        "only the real change published a snapshot"
    );
    proxy.shutdown().await;
}

fn run_with_routes(routes: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_canary-proxy"))
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--routes",
        ])
        .arg(routes)
        .output()
        .unwrap()
}

#[test]
fn start_up_with_a_missing_or_invalid_routes_file_is_fatal_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let out = run_with_routes(&missing);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nope.toml")
            && err.contains("cannot read routes file")
            && err.contains("no last good routes"),
        "{err}"
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[versions.stable]\nupstream = \"http://127.0.0.1:1\"\nweight = -1\n",
    )
    .unwrap();
    let out = run_with_routes(&bad);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("versions.stable.weight") && err.contains("line 3"),
        "{err}"
    );
}
