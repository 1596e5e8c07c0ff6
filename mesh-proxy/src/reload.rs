//! Hot reload: the configuration files are checked for changes every interval; a change is
//! loaded, validated and compiled, then swapped in without dropping a request. A change that
//! fails is logged with its errors and counted (`/stats`), and the previous snapshot keeps
//! serving.
//!
//! Files are compared by modification time, size and identity after following symlinks, so
//! the atomic symlink swap of a Kubernetes ConfigMap volume (`..data`) is seen, as is a file
//! edited in place or added to or removed from a directory. Polling (rather than inotify)
//! keeps this correct across those swaps and on every filesystem.

use std::path::PathBuf;
use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use crate::routes::Routes;

type Fingerprint = Vec<(PathBuf, Option<SystemTime>, u64, u64)>;

fn fingerprint(paths: &[PathBuf]) -> Fingerprint {
    let files = crate::loader::expand(paths).unwrap_or_else(|_| paths.to_vec());
    files
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let mtime = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.as_ref().map_or(0, std::fs::Metadata::len);
            #[cfg(unix)]
            let ino = meta.as_ref().map_or(0, std::os::unix::fs::MetadataExt::ino);
            #[cfg(not(unix))]
            let ino = 0;
            (f, mtime, len, ino)
        })
        .collect()
}

/// The configuration files' fingerprint, and that of the files the snapshot read beside them
/// (a gateway's certificates: a renewed one reloads).
fn fingerprint_with(paths: &[PathBuf], routes: &Routes) -> Fingerprint {
    let mut all = fingerprint(paths);
    if let Some(gateway) = &routes.snapshot().gateway {
        all.extend(fingerprint(&gateway.files()));
    }
    all
}

pub(crate) async fn watch(paths: Vec<PathBuf>, every: Duration, routes: Weak<Routes>) {
    let mut seen = match routes.upgrade() {
        Some(routes) => fingerprint_with(&paths, &routes),
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(routes) = routes.upgrade() else { return };
        let now = fingerprint_with(&paths, &routes);
        if now == seen {
            continue;
        }
        seen = now;
        match crate::load_snapshot(&paths) {
            Ok((snapshot, warnings)) => {
                for w in &warnings {
                    tracing::debug!("{w}");
                }
                for note in &snapshot.notes {
                    tracing::info!("config: {note}");
                }
                routes.store(snapshot);
                tracing::info!(generation = routes.reloads.load(Ordering::Relaxed), "configuration reloaded");
            }
            Err(errors) => {
                routes.reload_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    errors = errors.len(),
                    "configuration change refused; the previous configuration keeps serving"
                );
                for e in &errors {
                    tracing::warn!("{e}");
                }
            }
        }
    }
}
