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
            debounce: Duration::from_millis(10),
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
    let watch = DirWatch::new(vec![parent_dir(&path).to_owned()], config, "routes");
    let state = State {
        path,
        last_seen: Some(initial),
        control,
        watch,
    };
    tokio::spawn(state.run(stop))
}

/// The directory holding `path`, as mounted (never canonicalized: see the
/// module docs).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The part shared by every hot-reloaded mount (the routes ConfigMap, the
/// TLS Secret): wakes its owner when something in the watched directories
/// may have changed, i.e. after any event (debounced) or the periodic
/// interval. The owner re-reads its files and decides; see the module docs
/// for why events are not interpreted.
pub(crate) struct DirWatch {
    dirs: Vec<PathBuf>,
    /// What is watched, for log messages ("routes", "TLS certificate").
    what: &'static str,
    rx: mpsc::UnboundedReceiver<()>,
    events_open: bool,
    watcher: Option<notify::RecommendedWatcher>,
    watched: bool,
    tick: tokio::time::Interval,
    debounce: Duration,
}

impl DirWatch {
    /// Watch `dirs` at once. Must be called inside the tokio runtime.
    pub(crate) fn new(dirs: Vec<PathBuf>, config: WatchConfig, what: &'static str) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let watcher = notify::recommended_watcher(move |_event: notify::Result<notify::Event>| {
            // The event's content does not matter (see module docs), only that
            // something happened; errors (e.g. queue overflow) count too.
            let _ = tx.send(());
        });
        let watcher = watcher
            .map_err(|e| tracing::error!(error = %e, watched = what, "cannot start the file watcher; relying on periodic re-reads"))
            .ok();
        // The first tick is one interval away: start-up already read the files.
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + config.interval,
            config.interval,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watch = DirWatch {
            dirs,
            what,
            rx,
            events_open: true,
            watcher,
            watched: false,
            tick,
            debounce: config.debounce,
        };
        watch.ensure();
        watch
    }

    /// Whether every directory is under an inotify watch right now.
    pub(crate) fn is_watching(&self) -> bool {
        self.watched
    }

    /// (Re-)establish the directory watches. A deleted directory kills an
    /// inotify watch, so after a failed read we watch again once it is back.
    pub(crate) fn ensure(&mut self) {
        let Some(w) = self.watcher.as_mut() else {
            return;
        };
        let mut all = true;
        for dir in &self.dirs {
            if self.watched {
                let _ = w.unwatch(dir);
            }
            if let Err(e) = w.watch(dir, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the {} directory; relying on periodic re-reads until it is back", self.what);
                all = false;
            }
        }
        self.watched = all;
    }

    /// Wait until the files may have changed. Returns false once `stop` is
    /// cancelled.
    pub(crate) async fn changed(&mut self, stop: &CancellationToken) -> bool {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return false,
                event = self.rx.recv(), if self.events_open => {
                    if event.is_none() {
                        // The watcher is gone; the periodic re-read goes on.
                        self.events_open = false;
                        continue;
                    }
                    tokio::time::sleep(self.debounce).await;
                    while self.rx.try_recv().is_ok() {}
                    return true;
                }
                _ = self.tick.tick() => return true,
            }
        }
    }
}

struct State {
    path: PathBuf,
    /// Bytes of the last read, good or bad; `None` after a failed read.
    last_seen: Option<Vec<u8>>,
    control: Arc<Control>,
    watch: DirWatch,
}

impl State {
    async fn run(mut self, stop: CancellationToken) {
        while self.watch.changed(&stop).await {
            self.check().await;
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
        if recovering || !self.watch.is_watching() {
            self.watch.ensure();
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
