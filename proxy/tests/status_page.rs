//! The status page on the admin port (`GET /`): its headers, and what a real
//! browser shows. The browser tests drive headless Chromium over the DevTools
//! protocol (a websocket on 127.0.0.1), read the rendered DOM while the page
//! stays open and updates itself, and keep a screenshot in
//! `target/status-page/` as an artifact.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_its_assets_are_served_read_only_with_a_strict_csp() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let proxy = TestProxy::start(&routes(&[("stable", stable.addr(), 100)], None)).await;
    let c = client();
    let page = get(&c, proxy.admin, "/").await.unwrap();
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} missing from {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(page.headers["x-content-type-options"], "nosniff");
    // Self-contained: every asset it names is relative, and served here.
    assert!(!page.body.contains("://"), "an absolute URL in the page");
    assert!(!page.body.contains("<script>"), "inline script in the page");
    for (path, content_type) in [
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/app.css", "text/css; charset=utf-8"),
    ] {
        assert!(
            page.body.contains(&path[1..]),
            "the page does not load {path}"
        );
        let asset = get(&c, proxy.admin, path).await.unwrap();
        assert_eq!(asset.status, StatusCode::OK, "{path}");
        assert_eq!(asset.headers["content-type"], content_type, "{path}");
        assert_eq!(asset.headers["x-content-type-options"], "nosniff");
    }
    // The script fetches nothing but the admin port's own endpoints: its
    // one absolute URL is the SVG namespace, a name, never fetched.
    let script = get(&c, proxy.admin, "/ui/app.js").await.unwrap().body;
    let script = script.replace("\"http://www.w3.org/2000/svg\"", "");
    assert!(!script.contains("://"), "an absolute URL in app.js");
    let style = get(&c, proxy.admin, "/ui/app.css").await.unwrap().body;
    assert!(!style.contains("url("), "the stylesheet loads nothing");
    // Read-only, like the rest of the admin port.
    let post = c
        .request(
            http::Request::post(format!("http://{}/", proxy.admin))
                .body(http_body_util::Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
    proxy.shutdown().await;
}

/// Headless Chromium with one page open, driven over the DevTools protocol.
struct Browser {
    child: Child,
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
    _profile: tempfile::TempDir,
}

fn chromium() -> String {
    let name = std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let found = Command::new(&name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{name}` not found: install the Debian package chromium (apt-get install chromium), \
         or set CHROMIUM to a Chromium binary; ./scripts/test installs it"
    );
    name
}

impl Browser {
    async fn open(url: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--disable-background-networking",
                "--hide-scrollbars",
                "--window-size=1280,900",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium starts");
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find("ws://") {
                    let _ = tx.send(line[at..].trim().to_string());
                }
            }
        });
        let browser_ws = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("chromium prints its DevTools address");
        let port: u16 = browser_ws["ws://127.0.0.1:".len()..]
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let page_ws = eventually(Duration::from_secs(20), "the page target", || async {
            let list = get(&client(), ([127, 0, 0, 1], port).into(), "/json/list")
                .await
                .ok()?;
            let targets: Value = serde_json::from_str(&list.body).ok()?;
            targets.as_array()?.iter().find(|t| t["type"] == "page")?["webSocketDebuggerUrl"]
                .as_str()
                .map(str::to_string)
        })
        .await;
        let (ws, _) = tokio_tungstenite::connect_async(page_ws.as_str())
            .await
            .expect("DevTools websocket");
        Browser {
            child,
            ws,
            next_id: 0,
            _profile: profile,
        }
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params});
        self.ws.send(Message::text(msg.to_string())).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = tokio::time::timeout(left, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .expect("DevTools websocket open")
                .unwrap();
            let Message::Text(text) = frame else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluate `expr` in the page; its value as JSON.
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true}),
            )
            .await;
        r["result"]["value"].clone()
    }

    /// Text of the first element matching `selector`, or null.
    async fn text(&mut self, selector: &str) -> Value {
        let sel = serde_json::to_string(selector).unwrap();
        self.eval(&format!(
            "(() => {{ const e = document.querySelector({sel}); return e ? e.textContent : null; }})()"
        ))
        .await
    }

    /// Poll `selector`'s text until `ok` accepts it (the page updates once a
    /// second); the last text seen either way.
    async fn wait_text(
        &mut self,
        selector: &str,
        within: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + within;
        loop {
            let t = self.text(selector).await.as_str().unwrap_or("").to_string();
            if ok(&t) || Instant::now() > deadline {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn screenshot(&mut self, name: &str) -> PathBuf {
        use base64::Engine as _;
        let r = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn number_in(text: &str) -> f64 {
    text.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .find(|s| !s.is_empty())
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium (Debian package chromium); ./scripts/test installs it and runs this"]
async fn the_page_shows_both_versions_live_then_the_rollback_then_a_lost_proxy() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let canary = backend("v2", 0.0, Duration::ZERO).await;
    let broken = backend("v3", 1.0, Duration::ZERO).await;
    let rollback = Some("target = \"stable\"");
    let mut proxy = TestProxy::start(&routes(
        &[("stable", stable.addr(), 70), ("canary", canary.addr(), 30)],
        rollback,
    ))
    .await;
    let mut browser = Browser::open(&format!("http://{}/", proxy.admin)).await;
    let link = browser
        .wait_text("#link", Duration::from_secs(20), |t| t.starts_with("live"))
        .await;
    assert!(
        link.starts_with("live"),
        "the page never went live: {link:?}"
    );

    // Both versions, their weights, and counts that follow the traffic.
    let stable_card = "[data-version=stable]";
    let canary_card = "[data-version=canary]";
    assert_eq!(
        browser.text(&format!("{stable_card} .weight")).await,
        "70 (70.0%)"
    );
    assert_eq!(
        browser.text(&format!("{canary_card} .weight")).await,
        "30 (30.0%)"
    );
    let (sent, failed, first) = Load::start(proxy.addr, 4, 400, Duration::from_secs(20))
        .finish_when_done()
        .await;
    assert_eq!((sent, failed), (400, 0), "{first:?}");
    let text = proxy.metrics().await;
    let answered = |v: &str| {
        text.lines()
            .filter(|l| {
                l.starts_with("canary_proxy_requests_total{")
                    && l.contains(&format!("version=\"{v}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum::<f64>()
    };
    for (card, version) in [(stable_card, "stable"), (canary_card, "canary")] {
        let want = answered(version);
        assert!(want > 0.0, "no traffic reached {version}");
        let shown = browser
            .wait_text(&format!("{card} .total"), Duration::from_secs(10), |t| {
                number_in(t) == want
            })
            .await;
        assert_eq!(
            number_in(&shown),
            want,
            "{version}'s answered count on the page"
        );
    }
    let rate = browser.text(&format!("{stable_card} .rate")).await;
    assert!(number_in(rate.as_str().unwrap()) >= 0.0, "{rate}");
    let shot = browser.screenshot("live.png").await;
    eprintln!("screenshot: {}", shot.display());

    // A bad canary: the page shows the rollback within a few seconds.
    proxy.set_routes(&routes(
        &[("stable", stable.addr(), 70), ("canary", broken.addr(), 30)],
        rollback,
    ));
    eventually(Duration::from_secs(10), "the new routes", || async {
        (proxy.status().await["versions"][1]["upstream"] == format!("http://{}", broken.addr()))
            .then_some(())
    })
    .await;
    let c = client();
    for _ in 0..400 {
        let _ = get(&c, proxy.addr, "/ping").await;
        if proxy.status().await["versions"][1]["rolled_back"] == true {
            break;
        }
    }
    assert_eq!(proxy.status().await["versions"][1]["rolled_back"], true);
    let banner = browser
        .wait_text(
            &format!("{canary_card} .rollback"),
            Duration::from_secs(5),
            |t| t.contains("Rolled back"),
        )
        .await;
    assert!(
        banner.contains("Rolled back") && banner.contains("errors"),
        "{banner:?}"
    );
    assert_eq!(
        browser.text(&format!("{canary_card} .badge")).await,
        "rolled back"
    );
    assert_eq!(
        browser
            .text(&format!("{canary_card} .effective-weight"))
            .await,
        "0 (0.0%)"
    );
    let shot = browser.screenshot("rolled-back.png").await;
    eprintln!("screenshot: {}", shot.display());

    // The proxy goes away: the page says so instead of freezing.
    proxy.shutdown().await;
    let link = browser
        .wait_text("#link", Duration::from_secs(10), |t| {
            t.contains("cannot reach")
        })
        .await;
    assert!(
        link.contains("cannot reach the proxy's /status"),
        "{link:?}"
    );
    assert_eq!(
        browser
            .eval("document.getElementById('link').dataset.state")
            .await,
        "error"
    );
    assert_eq!(
        browser
            .eval("document.body.classList.contains('stale')")
            .await,
        true
    );
    let shot = browser.screenshot("unreachable.png").await;
    eprintln!("screenshot: {}", shot.display());
}
