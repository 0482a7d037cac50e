//! Where client connections run.
//!
//! With one thread (`--threads 1`) they run on the runtime that started the
//! proxy. With N > 1, N threads each run a single-threaded tokio runtime
//! with an upstream pool of its own (a `Forwarder`), and the accept loops
//! hand each new connection to the next thread in turn; it stays there for
//! its whole life. A request then never crosses threads: no work stealing,
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

use crate::control::Control;
use crate::forward::{ForwardConfig, Forwarder};

/// One event loop and the request path that lives on it.
#[derive(Debug)]
pub struct Lane {
    /// `None`: the runtime that started the proxy.
    pub runtime: Option<Handle>,
    pub forwarder: Arc<Forwarder>,
}

#[derive(Debug)]
pub struct Workers {
    lanes: Vec<Lane>,
    next: AtomicUsize,
    stop: CancellationToken,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Workers {
    /// `threads` event loops (at least one); must be called inside a tokio
    /// runtime.
    pub fn start(
        threads: usize,
        control: &Arc<Control>,
        config: &ForwardConfig,
    ) -> std::io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut lanes = Vec::new();
        let mut joins = Vec::new();
        if threads <= 1 {
            let forwarder = Forwarder::new(control.clone(), config.clone());
            forwarder.upstreams().spawn_sweeper(&Handle::current());
            lanes.push(Lane {
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
                let forwarder = Forwarder::new(control.clone(), config.clone());
                forwarder.upstreams().spawn_sweeper(&handle);
                lanes.push(Lane {
                    runtime: Some(handle),
                    forwarder,
                });
            }
            stop_on_error.disarm();
        }
        Ok(Workers {
            lanes,
            next: AtomicUsize::new(0),
            stop,
            threads: Mutex::new(joins),
        })
    }

    /// The lane for the next new connection.
    pub fn next(&self) -> &Lane {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        &self.lanes[i]
    }

    pub fn lanes(&self) -> &[Lane] {
        &self.lanes
    }

    /// End the threads (and every task still on them). Called last in the
    /// shutdown sequence.
    pub async fn stop(&self) {
        self.stop.cancel();
        let joins = std::mem::take(&mut *self.threads.lock().expect("workers lock"));
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
