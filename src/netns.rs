//! Network namespaces: run code inside one, and tell which one we are in.
//!
//! Linux binds a network namespace to each *thread*, and files and sockets opened there
//! stay bound to it after the thread returns. So ctguard enters a namespace on a short-lived
//! helper thread, opens its sysctl files and sockets there, and then reads them from anywhere.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Resolves `--netns NAME|PATH`: a bare name means `/run/netns/NAME` (as `ip netns` makes).
pub fn resolve(name_or_path: &str) -> PathBuf {
    if name_or_path.contains('/') {
        PathBuf::from(name_or_path)
    } else {
        Path::new("/run/netns").join(name_or_path)
    }
}

/// The inode that identifies the namespace at `path` (what the kernel prints in
/// `table full in netns N`).
pub fn inode_of(path: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(path)?.ino())
}

/// The inode of the calling thread's network namespace.
pub fn current_inode() -> io::Result<u64> {
    inode_of(Path::new("/proc/thread-self/ns/net"))
}

/// Whether the calling thread is in the initial network namespace (the one of PID 1),
/// the only place where global knobs (`nf_conntrack_max`, hashsize) can be written.
/// `None` when PID 1's namespace cannot be read (e.g. in a PID namespace without it).
pub fn in_initial_namespace() -> Option<bool> {
    let init = inode_of(Path::new("/proc/1/ns/net")).ok()?;
    Some(current_inode().ok()? == init)
}

/// Runs `f` on a new thread that has entered the network namespace at `path`, and returns
/// its result. The caller's own thread never changes namespace.
pub fn run_in<T, F>(path: &Path, f: F) -> io::Result<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let ns = File::open(path).map_err(|e| annotate(path, e))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| annotate(path, io::Error::from(e)))?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
    })
}

fn annotate(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}
