//! Hot reload: watch the directory holding the routes file and apply good
//! new content, keeping the last good snapshot when the new content is bad.
//!
//! Why the directory and not the file: a ConfigMap volume is updated by the
//! kubelet's atomic writer. It writes a new `..<timestamp>/` directory,
//! points a `..data_tmp` symlink at it, renames that over `..data`, and
//! deletes the old directory. `routes.toml` itself is a symlink to
//! `..data/routes.toml` that never changes, so a watch on the file (or a
//! filter on data-modify events) misses the update. We watch the directory,
//! treat ANY event in it as "maybe changed", debounce, and re-read the file
//! through its mounted path; identical bytes are ignored. The same handles
//! an editor that saves in place or by rename. A slow periodic re-read
//! covers lost events (inotify queue overflow, a directory re-created).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::control::{Applied, Control};
use crate::routes::{self, RoutesError};

#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// Quiet time after an event before re-reading: one kubelet update is a
    /// burst of several events and should cost one read.
    pub debounce: Duration,
    /// Re-read this often even without events.
    pub interval: Duration,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            debounce: Duration::from_millis(20),
            interval: Duration::from_secs(10),
        }
    }
}

/// Start watching. `initial` is the content the control plane was built
/// from, so the first event does not re-apply it.
pub fn spawn(
    path: PathBuf,
    initial: Vec<u8>,
    control: Arc<Control>,
    config: WatchConfig,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    let watcher = notify::recommended_watcher(move |_event: notify::Result<notify::Event>| {
        // The event's content does not matter (see module docs), only that
        // something happened; errors (e.g. queue overflow) count too.
        let _ = tx.send(());
    });
    let mut state = State { path, last_seen: Some(initial), control, dir_watched: false, watcher: watcher.map_err(|e| tracing::error!(error = %e, "cannot start the file watcher; relying on periodic re-reads")).ok() };
    state.ensure_watch();
    tokio::spawn(state.run(rx, config, stop))
}

struct State {
    path: PathBuf,
    /// Bytes of the last read, good or bad; `None` after a failed read.
    last_seen: Option<Vec<u8>>,
    control: Arc<Control>,
    watcher: Option<notify::RecommendedWatcher>,
    dir_watched: bool,
}

impl State {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<()>,
        config: WatchConfig,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; start-up already read the file
        let mut events_open = true;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                event = rx.recv(), if events_open => {
                    if event.is_none() {
                        // The watcher is gone; the periodic re-read goes on.
                        events_open = false;
                        continue;
                    }
                    tokio::time::sleep(config.debounce).await;
                    while rx.try_recv().is_ok() {}
                }
                _ = tick.tick() => {}
            }
            self.check().await;
        }
    }

    fn dir(&self) -> &Path {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        }
    }

    /// (Re-)establish the directory watch. A deleted directory kills an
    /// inotify watch, so after a failed read we watch again once it is back.
    fn ensure_watch(&mut self) {
        let dir = self.dir().to_owned();
        if let Some(w) = self.watcher.as_mut() {
            if self.dir_watched {
                let _ = w.unwatch(&dir);
            }
            self.dir_watched = match w.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the routes directory; relying on periodic re-reads until it is back");
                    false
                }
            };
        }
    }

    async fn check(&mut self) {
        let bytes = match tokio::fs::read(&self.path).await {
            Ok(b) => b,
            Err(source) => {
                if self.last_seen.take().is_some() {
                    let err = RoutesError::Read {
                        path: self.path.clone(),
                        source,
                    };
                    self.fail(err.to_string());
                }
                return;
            }
        };
        if self.last_seen.as_deref() == Some(bytes.as_slice()) {
            return;
        }
        let recovering = self.last_seen.is_none();
        if recovering || !self.dir_watched {
            self.ensure_watch();
        }
        let parsed = routes::parse(&bytes);
        self.last_seen = Some(bytes);
        match parsed {
            Ok(table) => {
                let hash = table.hash.clone();
                if self.control.apply(table) == Applied::Unchanged && recovering {
                    tracing::info!(%hash, "routes file is readable again with the active content");
                }
            }
            Err(problems) => self.fail(
                RoutesError::Invalid {
                    path: self.path.clone(),
                    problems,
                }
                .to_string(),
            ),
        }
    }

    fn fail(&self, error: String) {
        let active = self.control.load().table.hash.clone();
        tracing::error!(error = %error, active_hash = %active, "routes reload failed; still serving the last good routes");
        self.control.reload_failed(error);
    }
}
