//! Hot reload of mounted files, for any content: the routes ConfigMap and
//! the TLS Secret both run [`reload_loop`] with a [`Reload`] of their own.
//!
//! Why the directory and not the file: a ConfigMap or Secret volume is
//! updated by the kubelet's atomic writer. It writes a new `..<timestamp>/`
//! directory, points a `..data_tmp` symlink at it, renames that over
//! `..data`, and deletes the old directory. `routes.toml` itself is a
//! symlink to `..data/routes.toml` that never changes, so a watch on the
//! file (or a filter on data-modify events) misses the update. We watch the
//! directory, treat ANY event in it as "maybe changed", debounce, and
//! re-read the file through its mounted path; identical bytes are ignored.
//! The same handles an editor that saves in place or by rename. A slow
//! periodic re-read covers lost events (inotify queue overflow, a directory
//! re-created).

use std::fmt::Display;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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

/// One hot-reloaded content: how to read it, and what to do with it.
pub(crate) trait Reload: Send + 'static {
    /// What is compared with the last read, to skip unchanged content.
    type Content: PartialEq + Send + Sync;
    type Error: Display + Send;

    fn read(&self) -> impl Future<Output = Result<Self::Content, Self::Error>> + Send;

    /// Validate and apply changed content. `recovering` is true when the
    /// previous read failed, so the content may be what is already active.
    /// An error keeps whatever is active.
    fn apply(
        &mut self,
        content: &Self::Content,
        recovering: bool,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Report a failed read or apply (log it, count it).
    fn failed(&mut self, error: Self::Error);
}

/// Reload `source` each time something in `watch`'s directories may have
/// changed, until `stop`. `active` is the content in force at start-up, so
/// the first event does not apply it again.
///
/// A failed read is reported once per outage, not on every periodic
/// re-read; bad content is reported once per distinct content.
pub(crate) async fn reload_loop<R: Reload>(
    mut source: R,
    mut watch: DirWatch,
    active: R::Content,
    stop: CancellationToken,
) {
    // The last content read, good or bad; `None` after a failed read.
    let mut last_seen = Some(active);
    while watch.changed(&stop).await {
        let content = match source.read().await {
            Ok(c) => c,
            Err(e) => {
                if last_seen.take().is_some() {
                    source.failed(e);
                }
                continue;
            }
        };
        if last_seen.as_ref() == Some(&content) {
            continue;
        }
        let recovering = last_seen.is_none();
        if recovering || !watch.is_watching() {
            // A deleted directory kills an inotify watch: watch again now
            // that it is back.
            watch.ensure();
        }
        let applied = source.apply(&content, recovering).await;
        last_seen = Some(content);
        if let Err(e) = applied {
            source.failed(e);
        }
    }
}

/// The directory holding `path`, as mounted (never canonicalized: see the
/// module docs).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Wakes its owner when something in the watched directories may have
/// changed: after any event (debounced) or the periodic interval. See the
/// module docs for why events are not interpreted.
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
    pub(crate) fn new(dirs: Vec<PathBuf>, config: &WatchConfig, what: &'static str) -> Self {
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
    fn is_watching(&self) -> bool {
        self.watched
    }

    /// (Re-)establish the directory watches.
    fn ensure(&mut self) {
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
    async fn changed(&mut self, stop: &CancellationToken) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A file whose content must parse as a number; records what happened.
    struct Numbers {
        path: PathBuf,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Reload for Numbers {
        type Content = String;
        type Error = String;

        async fn read(&self) -> Result<String, String> {
            tokio::fs::read_to_string(&self.path)
                .await
                .map_err(|e| format!("read: {:?}", e.kind()))
        }

        async fn apply(&mut self, content: &String, recovering: bool) -> Result<(), String> {
            let n: u32 = content
                .trim()
                .parse()
                .map_err(|_| format!("bad: {content}"))?;
            self.log.lock().unwrap().push(format!(
                "apply {n}{}",
                if recovering { " (recovering)" } else { "" }
            ));
            Ok(())
        }

        fn failed(&mut self, error: String) {
            self.log.lock().unwrap().push(error);
        }
    }

    async fn wait_for(log: &Arc<Mutex<Vec<String>>>, n: usize) -> Vec<String> {
        for _ in 0..500 {
            if log.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        log.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn changes_apply_once_and_failures_are_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.txt");
        std::fs::write(&path, "1").unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let config = WatchConfig {
            debounce: Duration::from_millis(5),
            interval: Duration::from_millis(50),
        };
        let watch = DirWatch::new(vec![dir.path().to_owned()], &config, "test");
        let stop = CancellationToken::new();
        let source = Numbers {
            path: path.clone(),
            log: log.clone(),
        };
        let task = tokio::spawn(reload_loop(source, watch, "1".to_string(), stop.clone()));

        // The active content is not applied again, however often it is read.
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(log.lock().unwrap().is_empty(), "{:?}", log.lock().unwrap());

        std::fs::write(&path, "2").unwrap();
        assert_eq!(wait_for(&log, 1).await, ["apply 2"]);
        // Bad content: reported once, even across several periodic re-reads.
        std::fs::write(&path, "x").unwrap();
        assert_eq!(wait_for(&log, 2).await[1], "bad: x");
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(log.lock().unwrap().len(), 2);
        // A missing file: reported once per outage.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(wait_for(&log, 3).await[2], "read: NotFound");
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(log.lock().unwrap().len(), 3);
        // Back: applied, and marked as a recovery.
        std::fs::write(&path, "2").unwrap();
        assert_eq!(wait_for(&log, 4).await[3], "apply 2 (recovering)");

        stop.cancel();
        task.await.unwrap();
    }
}
