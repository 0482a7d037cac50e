//! Where client connections run: one event loop per thread (`--threads`).
//!
//! With one thread (`--threads 1`) the one event loop is the runtime that
//! started the proxy. With N > 1, N threads each run an event loop of their
//! own (a single-threaded tokio runtime) with an upstream pool of its own
//! (a `Forwarder`), and the accept loops hand each new connection to the
//! next event loop in turn; it stays there for its whole life. A request then never crosses threads: no work stealing,
//! no cross-thread wake-ups, no shared pool lock. Measured against tokio's
//! work-stealing runtime on two cores in docs/performance.md.
//!
//! Handing out connections in turn (rather than letting every thread accept
//! from the same socket) keeps the threads evenly loaded when a load
//! balancer opens its keep-alive connections in one burst.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::forward::{ForwardConfig, Forwarder};
use crate::guard::Verdicts;
use crate::metrics::Metrics;
use crate::snapshot::Store;

/// One event loop and the request path that lives on it.
#[derive(Debug)]
pub(crate) struct EventLoop {
    /// `None`: the runtime that started the proxy.
    pub(crate) runtime: Option<Handle>,
    pub(crate) forwarder: Arc<Forwarder>,
}

/// The event loops, each on a thread of its own, and the threads' handles.
#[derive(Debug)]
pub(crate) struct EventLoops {
    loops: Vec<EventLoop>,
    next: AtomicUsize,
    stop: CancellationToken,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl EventLoops {
    /// `threads` event loops (at least one); must be called inside a tokio
    /// runtime. Each event loop's request path reads `store` and sends its
    /// verdicts to `verdicts`.
    pub(crate) fn start(
        threads: usize,
        store: &Arc<Store>,
        verdicts: &Arc<dyn Verdicts>,
        metrics: &Arc<Metrics>,
        config: &ForwardConfig,
    ) -> std::io::Result<EventLoops> {
        let stop = CancellationToken::new();
        let mut loops = Vec::new();
        let forwarder = || {
            Forwarder::new(
                store.clone(),
                verdicts.clone(),
                metrics.clone(),
                config.clone(),
            )
        };
        let mut joins = Vec::new();
        if threads <= 1 {
            let forwarder = forwarder();
            forwarder.upstreams().spawn_sweeper(&Handle::current());
            loops.push(EventLoop {
                runtime: None,
                forwarder,
            });
        } else {
            // If one thread cannot start, the ones already running must end.
            let stop_on_error = stop.clone().drop_guard();
            for i in 0..threads {
                let (tx, rx) = std::sync::mpsc::channel();
                let stop = stop.clone();
                let join = std::thread::Builder::new()
                    .name(format!("canary-proxy-{i}"))
                    .spawn(move || {
                        let runtime = match tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                        {
                            Ok(rt) => rt,
                            Err(e) => {
                                let _ = tx.send(Err(e));
                                return;
                            }
                        };
                        let _ = tx.send(Ok(runtime.handle().clone()));
                        // Run the connections handed to this thread until
                        // the proxy has shut down.
                        runtime.block_on(stop.cancelled());
                    })?;
                joins.push(join);
                let handle = rx.recv().map_err(std::io::Error::other)??;
                let forwarder = forwarder();
                forwarder.upstreams().spawn_sweeper(&handle);
                loops.push(EventLoop {
                    runtime: Some(handle),
                    forwarder,
                });
            }
            stop_on_error.disarm();
        }
        Ok(EventLoops {
            loops,
            next: AtomicUsize::new(0),
            stop,
            threads: Mutex::new(joins),
        })
    }

    /// The event loop for the next new connection.
    pub(crate) fn next(&self) -> &EventLoop {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.loops.len();
        &self.loops[i]
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &EventLoop> {
        self.loops.iter()
    }

    /// End the threads (and every task still on them). Called last in the
    /// shutdown sequence.
    pub(crate) async fn stop(&self) {
        self.stop.cancel();
        let joins = std::mem::take(&mut *self.threads.lock().expect("event loops lock"));
        if joins.is_empty() {
            return;
        }
        let _ = tokio::task::spawn_blocking(move || {
            for j in joins {
                let _ = j.join();
            }
        })
        .await;
    }
}
