/*!
The async `/dev/kmsg` reader: follows the kernel log from "now" and yields the records
that [`classify`](super::kmsg::classify) recognises, as [`KmsgEvent`]s.

How `/dev/kmsg` behaves, and what the follower does about it:
- every open file has its own position; [`KmsgFollower::open_at_end`] seeks to the end, so
  records logged before ctguard started are never reported as new;
- each `read(2)` returns exactly one record, or `EAGAIN` when there is none yet (the fd is
  non-blocking and driven by tokio's [`AsyncFd`]);
- `EPIPE` means the ring buffer overwrote records this reader had not read yet; the next
  read returns the oldest surviving record, and the sequence gap says how many were lost,
  reported as [`KernelEvent::RecordsLost`] before that record's own event;
- `EINVAL` means the buffer is smaller than the record; the kernel keeps its position, so
  the buffer is grown (a warning says so) and the read retried.

Malformed records are logged with `tracing::warn!` and skipped: one bad record must not
stop the watch.
*/

use super::kmsg::{KmsgEvent, KmsgRecord};
use super::{KernelEvent, ObserveError};
use nix::errno::Errno;
use nix::unistd::{Whence, lseek, read};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The kernel log device.
pub const KMSG_PATH: &str = "/dev/kmsg";

/// Records are at most 8 KiB (CONSOLE_EXT_LOG_MAX) on current kernels; twice that leaves
/// room for a kernel that grows them before `EINVAL` forces a bigger buffer.
const INITIAL_BUFFER: usize = 16 * 1024;
/// Beyond this, `EINVAL` is not a small buffer but something else: give up loudly.
const MAX_BUFFER: usize = 1024 * 1024;

/// Follows `/dev/kmsg` (or another kmsg-like device) from the moment it was opened.
pub struct KmsgFollower {
    path: PathBuf,
    fd: AsyncFd<OwnedFd>,
    /// One record per read; allocated once (grown only on `EINVAL`).
    buffer: Vec<u8>,
    gaps: GapTracker,
    /// An event already decided but not yet returned (the record after a loss).
    pending: Option<KmsgEvent>,
}

/// What one read produced.
enum ReadOutcome {
    /// A record of this many bytes is at the start of the buffer.
    Record(usize),
    /// `EPIPE`: unread records were overwritten.
    Overrun,
}

impl KmsgFollower {
    /// Opens [`KMSG_PATH`] positioned after the newest record.
    pub fn open() -> Result<Self, ObserveError> {
        Self::open_at_end(KMSG_PATH)
    }

    /// Opens `path` (non-blocking, close-on-exec) positioned after its newest record.
    /// Must be called inside a tokio runtime (the fd is registered with its reactor).
    pub fn open_at_end(path: impl AsRef<Path>) -> Result<Self, ObserveError> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| ObserveError::io(&path, e))?;
        let fd = OwnedFd::from(file);
        lseek(&fd, 0, Whence::SeekEnd).map_err(|e| ObserveError::io(&path, e.into()))?;
        // SAFETY: the AsyncFd takes ownership of the OwnedFd, which stays open (and is never
        // swapped) until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| ObserveError::io(&path, e.into_parts().1))?;
        Ok(KmsgFollower {
            path,
            fd,
            buffer: vec![0; INITIAL_BUFFER],
            gaps: GapTracker::default(),
            pending: None,
        })
    }

    /// The path being followed.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next record that is a [`KernelEvent`] (or for a loss of records).
    /// Errors only when the device itself fails; malformed records are skipped.
    pub async fn next_event(&mut self) -> Result<KmsgEvent, ObserveError> {
        loop {
            if let Some(event) = self.pending.take() {
                return Ok(event);
            }
            let len = match self.read_record().await? {
                ReadOutcome::Overrun => {
                    self.gaps.overrun();
                    continue;
                }
                ReadOutcome::Record(len) => len,
            };
            let record = match KmsgRecord::parse(&self.buffer[..len]) {
                Ok(record) => record,
                Err(err) => {
                    tracing::warn!(path = %self.path.display(), "skipping malformed record: {err}");
                    continue;
                }
            };
            let lost = self.gaps.lost_before(record.seq);
            let event = record.event();
            match lost {
                Some(count) => {
                    self.pending = event;
                    return Ok(KmsgEvent {
                        seq: record.seq,
                        timestamp_us: record.timestamp_us,
                        event: KernelEvent::RecordsLost { count },
                    });
                }
                None => {
                    if let Some(event) = event {
                        return Ok(event);
                    }
                }
            }
        }
    }

    /// One `read(2)`, waiting for readiness on `EAGAIN`.
    async fn read_record(&mut self) -> Result<ReadOutcome, ObserveError> {
        loop {
            let mut ready = self
                .fd
                .readable()
                .await
                .map_err(|e| ObserveError::io(&self.path, e))?;
            let buffer = &mut self.buffer;
            // try_io clears readiness only on WouldBlock (EAGAIN), so the next loop waits.
            let Ok(result) = ready.try_io(|fd| read(fd, buffer).map_err(std::io::Error::from))
            else {
                continue;
            };
            match result {
                Ok(0) => {
                    return Err(ObserveError::format(
                        &self.path,
                        "one log record per read",
                        "end of file",
                    ));
                }
                Ok(len) => return Ok(ReadOutcome::Record(len)),
                Err(e) => match Errno::from_raw(e.raw_os_error().unwrap_or(0)) {
                    Errno::EPIPE => return Ok(ReadOutcome::Overrun),
                    Errno::EINTR => continue,
                    Errno::EINVAL if self.buffer.len() < MAX_BUFFER => {
                        let grown = self.buffer.len() * 2;
                        tracing::warn!(
                            path = %self.path.display(),
                            "a record is larger than the {} byte buffer; growing it to {grown}",
                            self.buffer.len()
                        );
                        self.buffer.resize(grown, 0);
                    }
                    _ => return Err(ObserveError::io(&self.path, e)),
                },
            }
        }
    }
}

/// Counts records lost to overruns from the sequence numbers around them.
#[derive(Debug, Default)]
struct GapTracker {
    last_seq: Option<u64>,
    overrun: bool,
}

impl GapTracker {
    fn overrun(&mut self) {
        self.overrun = true;
    }

    /// Notes a record; after an overrun, returns how many records were lost before it.
    /// Without an earlier record to measure from (an overrun before the first read) the
    /// count is 1, the least an overrun means.
    fn lost_before(&mut self, seq: u64) -> Option<u64> {
        let lost = std::mem::take(&mut self.overrun).then(|| match self.last_seq {
            Some(last) if seq > last.saturating_add(1) => seq - last - 1,
            _ => 1,
        });
        self.last_seq = Some(seq);
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gap_after_overrun_counts_the_missing_records() {
        let mut gaps = GapTracker::default();
        assert_eq!(gaps.lost_before(10), None);
        assert_eq!(gaps.lost_before(11), None);
        gaps.overrun();
        assert_eq!(gaps.lost_before(500), Some(488));
        assert_eq!(gaps.lost_before(501), None, "one overrun is reported once");
    }

    #[test]
    fn overrun_before_any_record_counts_at_least_one() {
        let mut gaps = GapTracker::default();
        gaps.overrun();
        assert_eq!(gaps.lost_before(42), Some(1));
    }

    #[test]
    fn overrun_without_a_visible_gap_still_counts_one() {
        let mut gaps = GapTracker::default();
        assert_eq!(gaps.lost_before(7), None);
        gaps.overrun();
        assert_eq!(gaps.lost_before(8), Some(1));
    }

    #[tokio::test]
    async fn open_names_the_missing_path() {
        let err = match KmsgFollower::open_at_end("/nonexistent/kmsg") {
            Err(err) => err,
            Ok(_) => panic!("opened a path that does not exist"),
        };
        let text = err.to_string();
        assert!(text.starts_with("/nonexistent/kmsg: "), "{text}");
    }
}
