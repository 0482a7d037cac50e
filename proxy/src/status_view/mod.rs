//! `canary-proxy status`: a running proxy's `/status` in the terminal, once
//! or redrawn in place (`--watch`), with an exit code scripts can use.
//!
//! `fetch` gets the document (one bounded GET), `render` turns it into the
//! view (a pure function); this file only sequences them and prints.

mod fetch;
mod render;

use std::io::Write as _;
use std::time::{Duration, SystemTime};

pub use fetch::{AdminUrl, AdminUrlError};
use render::Health;

/// Clear the screen and put the cursor home: a redraw in place.
const CLEAR: &str = "\x1b[H\x1b[2J";

/// What `canary-proxy status` was asked to do.
#[derive(Debug, Clone)]
pub struct StatusOptions {
    pub admin: AdminUrl,
    pub output: StatusOutput,
    /// Redraw at this interval until Ctrl-C; `None`: show it once.
    pub watch: Option<Duration>,
    /// For one fetch, connect and answer together.
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusOutput {
    /// The view for a person.
    Text,
    /// The document exactly as the proxy sent it (pretty-printed JSON).
    Json,
}

/// The outcome, as the process's exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 0: no version is rolled back (a healthy or complete release), or
    /// `--watch` stopped by Ctrl-C.
    Healthy,
    /// 1: a version is rolled back.
    RolledBack,
    /// 2: no valid /status document from that address.
    Unreachable,
}

impl Verdict {
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Healthy => 0,
            Verdict::RolledBack => 1,
            Verdict::Unreachable => 2,
        }
    }
}

/// Run `canary-proxy status`: print what `options` ask for, and return the
/// verdict for the exit code.
pub async fn show_status(options: &StatusOptions) -> Verdict {
    match options.watch {
        None => once(options).await,
        Some(interval) => {
            watch(options, interval).await;
            Verdict::Healthy
        }
    }
}

async fn once(o: &StatusOptions) -> Verdict {
    let doc = match fetch::status(&o.admin, o.timeout).await {
        Ok(doc) => doc,
        Err(e) => {
            eprintln!("error: {e}\n{}", e.fix());
            return Verdict::Unreachable;
        }
    };
    // A reader that went away (`| head`) does not change what the proxy
    // said, so a failed write does not change the exit code.
    let _ = match o.output {
        StatusOutput::Json => write_stdout(&doc.raw),
        StatusOutput::Text => write_stdout(render::render(&doc.value).as_bytes()),
    };
    match render::health(&doc.value) {
        Health::Healthy => Verdict::Healthy,
        Health::RolledBack => Verdict::RolledBack,
    }
}

/// Fetch and print every `interval` until Ctrl-C, or until stdout is gone.
/// Each fetch is bounded by the timeout; a failed one is shown, not fatal.
async fn watch(o: &StatusOptions, interval: Duration) {
    let interrupted = async {
        // Without a handler Ctrl-C still ends the process, by default.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(interrupted);
    // The last good view and when it was fetched, shown under an error.
    let mut last_good: Option<(String, String)> = None;
    loop {
        let fetched = tokio::select! {
            fetched = fetch::status(&o.admin, o.timeout) => fetched,
            () = &mut interrupted => return,
        };
        let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        let frame = match (o.output, fetched) {
            // A stream of documents: `jq` reads them one after another.
            (StatusOutput::Json, Ok(doc)) => doc.raw.to_vec(),
            (StatusOutput::Json, Err(e)) => {
                eprintln!("{now} error: {e}\n{}", e.fix());
                Vec::new()
            }
            (StatusOutput::Text, fetched) => {
                let title = format!(
                    "{}/status every {}  {now}  (Ctrl-C to stop)\n\n",
                    o.admin,
                    humantime::format_duration(interval)
                );
                let body = match fetched {
                    Ok(doc) => {
                        let view = render::render(&doc.value);
                        last_good = Some((now, view.clone()));
                        view
                    }
                    Err(e) => {
                        let mut body = format!("error: {e}\n{}\nretrying\n", e.fix());
                        if let Some((at, view)) = &last_good {
                            body.push_str(&format!("\nthe last view, from {at}:\n\n{view}"));
                        }
                        body
                    }
                };
                format!("{CLEAR}{title}{body}").into_bytes()
            }
        };
        if write_stdout(&frame).is_err() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = &mut interrupted => return,
        }
    }
}

fn write_stdout(bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    if !bytes.ends_with(b"\n") && !bytes.is_empty() {
        out.write_all(b"\n")?;
    }
    out.flush()
}
