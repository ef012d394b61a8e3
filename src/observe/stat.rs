//! `/proc/net/stat/nf_conntrack`: the kernel's conntrack counters, one hex row per CPU.
//!
//! The column set changed across kernels (2.6/3.x had `searched`, `delete_list`; 5.x+ has
//! `clashres`, `chainlength` instead), so columns are found by their header *name*: unknown
//! columns are ignored and known ones a kernel lacks read as 0. The `entries` column is the
//! table size repeated on every row, not a per-CPU value, so it is required in the header
//! (it identifies the file) but never summed.
//!
//! [`StatSource`] keeps the file open and re-reads it with `pread` at offset 0 (seq_file
//! restarts there) into a buffer it reuses, and parsing allocates nothing.

use super::{ConntrackStats, ObserveError};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The stat file of the calling *thread's* namespace. `/proc/net` follows the process's
/// main thread, so a helper thread inside another namespace must use `thread-self`.
pub const THREAD_SELF_PATH: &str = "/proc/thread-self/net/stat/nf_conntrack";
/// The stat file of the process's namespace, for kernels before 3.17 (no `thread-self`).
pub const PROCESS_PATH: &str = "/proc/net/stat/nf_conntrack";
/// The file's name before 2.6.20.
pub const LEGACY_PROCESS_PATH: &str = "/proc/net/stat/ip_conntrack";

/// The counters ctguard keeps, by header name.
fn counter<'s>(stats: &'s mut ConntrackStats, column: &[u8]) -> Option<&'s mut u64> {
    Some(match column {
        b"found" => &mut stats.found,
        b"invalid" => &mut stats.invalid,
        b"ignore" => &mut stats.ignore,
        b"insert" => &mut stats.insert,
        b"insert_failed" => &mut stats.insert_failed,
        b"drop" => &mut stats.drop,
        b"early_drop" => &mut stats.early_drop,
        b"icmp_error" => &mut stats.icmp_error,
        b"search_restart" => &mut stats.search_restart,
        b"clashres" => &mut stats.clash_resolve,
        _ => return None,
    })
}

fn fields(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    line.split(u8::is_ascii_whitespace)
        .filter(|f| !f.is_empty())
}

fn parse_hex(field: &[u8]) -> Option<u64> {
    if field.is_empty() || field.len() > 16 {
        return None;
    }
    field.iter().try_fold(0u64, |acc, &b| {
        let digit = (b as char).to_digit(16)?;
        Some((acc << 4) | u64::from(digit))
    })
}

/// Parses the whole file: a header line, then one row of hex counters per CPU, summed.
/// `path` only names the file in errors.
pub fn parse_stats(path: &Path, text: &[u8]) -> Result<ConntrackStats, ObserveError> {
    let mut lines = text
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.trim_ascii().is_empty());
    let header = match lines.next() {
        Some((_, header)) => header,
        None => {
            return Err(ObserveError::format(
                path,
                "a header line naming the columns (`entries …`)",
                "an empty file",
            ));
        }
    };
    let lossy = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let mut probe = ConntrackStats::default();
    let has_entries = fields(header).any(|c| c == b"entries");
    let knows_a_counter = fields(header).any(|c| counter(&mut probe, c).is_some());
    if !has_entries || !knows_a_counter {
        return Err(ObserveError::format(
            path,
            "a header with an `entries` column and at least one known counter (drop, early_drop, insert_failed, …)",
            lossy(header.trim_ascii()),
        ));
    }
    let width = fields(header).count();

    let mut stats = ConntrackStats::default();
    let mut rows = 0usize;
    for (index, row) in lines {
        let line_no = index + 1;
        let found = fields(row).count();
        if found != width {
            return Err(ObserveError::format(
                path,
                format!(
                    "line {line_no} (CPU row {rows}): {width} hex fields, one per header column"
                ),
                format!("{found} fields: {}", lossy(row.trim_ascii())),
            ));
        }
        for (column, value) in fields(header).zip(fields(row)) {
            let value = parse_hex(value).ok_or_else(|| {
                ObserveError::format(
                    path,
                    format!(
                        "line {line_no} (CPU row {rows}), column `{}`: a hexadecimal counter",
                        lossy(column)
                    ),
                    lossy(value),
                )
            })?;
            if let Some(total) = counter(&mut stats, column) {
                *total = total.saturating_add(value);
            }
        }
        rows += 1;
    }
    if rows == 0 {
        return Err(ObserveError::format(
            path,
            "at least one per-CPU row after the header",
            "only the header",
        ));
    }
    Ok(stats)
}

/// The stat file of one network namespace, held open for cheap polling.
#[derive(Debug)]
pub struct StatSource {
    file: File,
    path: PathBuf,
    buf: Vec<u8>,
}

impl StatSource {
    /// Opens the file at `path`.
    pub fn open(path: &Path) -> Result<StatSource, ObserveError> {
        let file = File::open(path).map_err(|e| ObserveError::io(path, e))?;
        Ok(StatSource {
            file,
            path: path.to_owned(),
            // Two CPUs take ~400 bytes; the buffer grows once on bigger hosts, then stays.
            buf: vec![0; 4096],
        })
    }

    /// Opens the stat file of the calling thread's network namespace, falling back to the
    /// process-wide and pre-2.6.20 paths on old kernels. Errors name the modern path.
    pub fn open_current_netns() -> Result<StatSource, ObserveError> {
        let thread_self = Path::new(THREAD_SELF_PATH);
        if Path::new("/proc/thread-self").exists() {
            return StatSource::open(thread_self);
        }
        [PROCESS_PATH, LEGACY_PROCESS_PATH]
            .into_iter()
            .map(Path::new)
            .find(|p| p.exists())
            .map_or_else(
                || {
                    Err(ObserveError::io(
                        PROCESS_PATH,
                        io::Error::from(io::ErrorKind::NotFound),
                    ))
                },
                StatSource::open,
            )
    }

    /// The path this source reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads and parses the whole file.
    pub fn read(&mut self) -> Result<ConntrackStats, ObserveError> {
        let mut filled = 0;
        loop {
            if filled == self.buf.len() {
                self.buf.resize(self.buf.len() * 2, 0);
            }
            match self.file.read_at(&mut self.buf[filled..], filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ObserveError::io(&self.path, e)),
            }
        }
        parse_stats(&self.path, &self.buf[..filled])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/proc")
            .join(name)
    }

    fn parse_fixture(name: &str) -> Result<ConntrackStats, ObserveError> {
        let path = fixture(name);
        parse_stats(&path, &std::fs::read(&path).unwrap())
    }

    #[test]
    fn sums_the_cpu_rows_captured_on_this_kernel() {
        let stats = parse_fixture("nf_conntrack_stat_6.18_full.txt").unwrap();
        assert_eq!(
            stats,
            ConntrackStats {
                drop: 0x60b,
                early_drop: 0x1c9,
                ..ConntrackStats::default()
            }
        );
    }

    #[test]
    fn reads_the_old_column_set() {
        let stats = parse_fixture("nf_conntrack_stat_3.10_legacy.txt").unwrap();
        assert_eq!(
            stats.found,
            0x9b2e4f10 + 0x8a1b2c3d + 0x7c6b5a49 + 0x8d7c6b5a
        );
        assert_eq!(stats.invalid, 0xe21 + 0xd10 + 0xc0f + 0xf32);
        assert_eq!(stats.insert_failed, 3 + 1 + 2);
        assert_eq!(stats.drop, 0x11 + 7 + 2 + 4);
        assert_eq!(stats.icmp_error, 2 + 1);
        assert_eq!(stats.search_restart, 4 + 1 + 2);
        assert_eq!(stats.clash_resolve, 0, "no clashres column before 5.x");
    }

    #[test]
    fn finds_columns_by_name_in_any_order() {
        let stats = parse_fixture("nf_conntrack_stat_reordered.txt").unwrap();
        assert_eq!(
            (stats.drop, stats.early_drop, stats.insert_failed),
            (5, 0x30, 1)
        );
        assert_eq!(stats.found, 0);
    }

    #[test]
    fn refuses_a_header_it_does_not_know() {
        let err = parse_fixture("nf_conntrack_stat_unknown_header.txt")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nf_conntrack_stat_unknown_header.txt"),
            "{err}"
        );
        assert!(err.contains("`entries` column"), "{err}");
    }

    fn error_of(text: &str) -> String {
        parse_stats(Path::new("/proc/net/stat/nf_conntrack"), text.as_bytes())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_the_row_the_column_and_the_expectation() {
        assert!(error_of("").contains("an empty file"));
        assert!(error_of("\n \n").contains("an empty file"));
        assert!(error_of("entries drop\n").contains("at least one per-CPU row"));
        assert!(error_of("entries searched\n0 0\n").contains("known counter"));
        let short = error_of("entries drop early_drop\n00000001 00000002\n");
        assert!(
            short.contains("line 2 (CPU row 0): 3 hex fields"),
            "{short}"
        );
        let bad = error_of("entries drop\n00000001 00000002\n00000001 0000zz02\n");
        assert!(
            bad.contains("line 3 (CPU row 1), column `drop`: a hexadecimal counter")
                && bad.contains("0000zz02"),
            "{bad}"
        );
    }

    #[test]
    fn re_reads_an_open_file_from_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nf_conntrack");
        std::fs::write(&path, "entries drop\n1 1\n").unwrap();
        let mut source = StatSource::open(&path).unwrap();
        assert_eq!(source.read().unwrap().drop, 1);
        // Longer than the initial buffer, to exercise its growth.
        let rows = "00000001 00000002\n".repeat(1000);
        std::fs::write(&path, format!("entries drop\n{rows}")).unwrap();
        assert_eq!(source.read().unwrap().drop, 2000);
        assert_eq!(source.path(), path);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_stats(Path::new("f"), &bytes);
        }

        #[test]
        fn arbitrary_rows_under_a_real_header_never_panic(
            rows in proptest::collection::vec("[0-9a-fA-Fx ]{0,60}", 0..8)
        ) {
            let text = format!("entries drop early_drop insert_failed\n{}", rows.join("\n"));
            let _ = parse_stats(Path::new("f"), text.as_bytes());
        }
    }
}
