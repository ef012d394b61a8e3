//! Watches the policy file with inotify so an edit is picked up without a signal.
//!
//! The watch is on the file's directory, not the file: editors and config managers
//! replace files by renaming a new one over them, which a watch on the old inode misses.

use futures::StreamExt;
use inotify::{EventStream, Inotify, WatchMask};
use std::ffi::OsString;
use std::path::Path;

pub struct PolicyWatch {
    stream: Option<EventStream<Vec<u8>>>,
    file_name: OsString,
}

impl PolicyWatch {
    /// Watches `path`; without a path (embedded policy) or when inotify is unavailable
    /// (logged), [`PolicyWatch::changed`] never completes and SIGHUP still reloads.
    pub fn new(path: Option<&Path>) -> PolicyWatch {
        let file_name = path
            .and_then(Path::file_name)
            .map(OsString::from)
            .unwrap_or_default();
        let stream = path.and_then(|path| {
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            let watch = || -> std::io::Result<EventStream<Vec<u8>>> {
                let inotify = Inotify::init()?;
                inotify
                    .watches()
                    .add(dir, WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO)?;
                inotify.into_event_stream(vec![0u8; 4096])
            };
            watch()
                .map_err(|e| {
                    tracing::warn!(dir = %dir.display(), error = %e,
                        "cannot watch the policy file; reload with SIGHUP")
                })
                .ok()
        });
        PolicyWatch { stream, file_name }
    }

    /// Completes when the policy file was written or replaced.
    pub async fn changed(&mut self) {
        let Some(stream) = self.stream.as_mut() else {
            return std::future::pending().await;
        };
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) if event.name.as_deref() == Some(self.file_name.as_os_str()) => return,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "policy watch failed; reload with SIGHUP");
                    break;
                }
            }
        }
        self.stream = None;
        std::future::pending().await
    }
}
