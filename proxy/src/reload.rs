//! The routes file's hot reload: what [`crate::watch::reload_loop`] runs for
//! the ConfigMap. Good new content goes to the control plane; bad content
//! is logged, counted and shown in `/status`, and the last good routes stay.

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::control::{Applied, Control};
use crate::routes::{self, RoutesError};
use crate::watch::{self, DirWatch, Reload, WatchConfig};

struct RoutesReload {
    path: PathBuf,
    control: Arc<Control>,
}

/// Watch the routes file's directory until `stop`. `active` is the content
/// the control plane was built from.
pub(crate) fn spawn(
    path: PathBuf,
    active: Vec<u8>,
    control: Arc<Control>,
    config: &WatchConfig,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let watch = DirWatch::new(vec![watch::parent_dir(&path).to_owned()], config, "routes");
    tokio::spawn(watch::reload_loop(
        RoutesReload { path, control },
        watch,
        active,
        stop,
    ))
}

impl Reload for RoutesReload {
    type Content = Vec<u8>;
    type Error = RoutesError;

    async fn read(&self) -> Result<Vec<u8>, RoutesError> {
        let path = self.path.clone();
        blocking(move || routes::read(&path)).await
    }

    async fn apply(&mut self, content: &Vec<u8>, recovering: bool) -> Result<(), RoutesError> {
        // Validation is CPU work on input of any size: off the threads that
        // serve connections.
        let (path, bytes) = (self.path.clone(), content.clone());
        let table = blocking(move || routes::parse_at(&path, &bytes)).await?;
        let hash = table.hash.clone();
        if self.control.apply(table) == Applied::Unchanged && recovering {
            tracing::info!(%hash, "routes file is readable again with the active content");
        }
        Ok(())
    }

    fn failed(&mut self, error: RoutesError) {
        let active = self.control.store().load().table.hash.clone();
        tracing::error!(error = %error, active_hash = %active, "routes reload failed; still serving the last good routes");
        self.control.reload_failed(error.to_string());
    }
}

/// Run `f` on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RoutesError> + Send + 'static,
) -> Result<T, RoutesError> {
    tokio::task::spawn_blocking(f)
        .await
        .expect("routes reading and validation do not panic")
}
