//! Host memory and the size of a conntrack entry, and the table ceilings derived from them.
//!
//! Two ceilings matter. The classic rule from the netfilter docs (and seed 000),
//! `CONNTRACK_MAX = RAM / 16384 / (ARCH / 32)`, and a budget ceiling: how many entries fit
//! in a number of bytes when each costs its slab object plus its share of the hash table.
//!
//! The inputs come from `/proc/meminfo` (MemTotal) and `/proc/slabinfo` (the `nf_conntrack`
//! object size). slabinfo is root-only and SLUB may merge the cache away, so a missing size
//! falls back to [`FALLBACK_ENTRY_BYTES`] and says so in [`EntrySizeSource`].

use super::ObserveError;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The `nf_conntrack` slab object size used when `/proc/slabinfo` cannot be read. 320 bytes
/// is what 64-bit kernels of the 4.x–6.x era report (this lab's 6.18 kernel reports 256);
/// the larger value keeps the budget conservative.
pub const FALLBACK_ENTRY_BYTES: u64 = 320;

/// Where [`HostMemory::entry_bytes`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntrySizeSource {
    Slabinfo,
    Fallback,
}

/// What the engine needs to know about the host's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostMemory {
    /// MemTotal, in bytes.
    pub mem_total_bytes: u64,
    /// Bytes one conntrack entry takes (slab object size).
    pub entry_bytes: u64,
    pub entry_bytes_source: EntrySizeSource,
    /// Pointer width in bits (a hash bucket is one pointer).
    pub pointer_bits: u32,
}

impl HostMemory {
    /// Reads the host's memory from `/proc`.
    pub fn read() -> Result<HostMemory, ObserveError> {
        HostMemory::read_from(Path::new("/proc"))
    }

    /// Reads `meminfo` and `slabinfo` under `proc_root` (a directory laid out like `/proc`).
    /// MemTotal is required; an unreadable slabinfo or one without the conntrack cache
    /// gives the fallback entry size.
    pub fn read_from(proc_root: &Path) -> Result<HostMemory, ObserveError> {
        let meminfo = proc_root.join("meminfo");
        let text = std::fs::read(&meminfo).map_err(|e| ObserveError::io(&meminfo, e))?;
        let mem_total_bytes = parse_mem_total(&meminfo, &text)?;
        let objsize = std::fs::read(proc_root.join("slabinfo"))
            .ok()
            .and_then(|text| parse_conntrack_objsize(&text));
        let (entry_bytes, entry_bytes_source) = match objsize {
            Some(bytes) => (bytes, EntrySizeSource::Slabinfo),
            None => (FALLBACK_ENTRY_BYTES, EntrySizeSource::Fallback),
        };
        Ok(HostMemory {
            mem_total_bytes,
            entry_bytes,
            entry_bytes_source,
            pointer_bits: usize::BITS,
        })
    }

    /// `RAM / 16384 / (ARCH / 32)`: the netfilter documentation's ceiling for `nf_conntrack_max`.
    pub fn classic_ceiling(&self) -> u64 {
        self.mem_total_bytes / 16384 / u64::from((self.pointer_bits / 32).max(1))
    }

    /// How many entries fit in `budget_bytes` when the hash table has one bucket per
    /// `entries_per_bucket` entries: each entry costs its object plus its share of a bucket.
    pub fn entries_within(&self, budget_bytes: u64, entries_per_bucket: u64) -> u64 {
        let pointer_bytes = u64::from(self.pointer_bits / 8);
        // Work in units of 1/entries_per_bucket byte to stay in integers.
        let per_bucket = entries_per_bucket.max(1);
        let cost = self
            .entry_bytes
            .saturating_mul(per_bucket)
            .saturating_add(pointer_bytes);
        budget_bytes.saturating_mul(per_bucket) / cost.max(1)
    }

    /// Bytes that `entries` entries and `buckets` buckets take at most.
    pub fn bytes_for(&self, entries: u64, buckets: u64) -> u64 {
        entries
            .saturating_mul(self.entry_bytes)
            .saturating_add(buckets.saturating_mul(u64::from(self.pointer_bits / 8)))
    }
}

/// MemTotal from the text of `/proc/meminfo` (`MemTotal:  24684084 kB`), in bytes.
/// `path` only names the file in errors.
pub fn parse_mem_total(path: &Path, text: &[u8]) -> Result<u64, ObserveError> {
    let expected = "a line `MemTotal: <n> kB`";
    let line = text
        .split(|&b| b == b'\n')
        .find_map(|line| line.strip_prefix(b"MemTotal:"))
        .ok_or_else(|| ObserveError::format(path, expected, "no MemTotal line"))?;
    let mut fields = line
        .split(u8::is_ascii_whitespace)
        .filter(|f| !f.is_empty());
    let kib = match (fields.next(), fields.next(), fields.next()) {
        (Some(n), Some(b"kB"), None) => std::str::from_utf8(n)
            .ok()
            .and_then(|n| n.parse::<u64>().ok()),
        _ => None,
    };
    kib.and_then(|kib| kib.checked_mul(1024)).ok_or_else(|| {
        ObserveError::format(
            path,
            expected,
            format!("MemTotal:{}", String::from_utf8_lossy(line)),
        )
    })
}

/// Whether a slab cache name is the conntrack entry cache: `nf_conntrack` (and
/// `ip_conntrack` before 2.6.20), or `nf_conntrack_<hex address>` on 2.6.26–3.x kernels,
/// which had one cache per namespace. `nf_conntrack_expect` is a different object.
fn is_conntrack_cache(name: &[u8]) -> bool {
    if name == b"nf_conntrack" || name == b"ip_conntrack" {
        return true;
    }
    name.strip_prefix(b"nf_conntrack_")
        .is_some_and(|suffix| !suffix.is_empty() && suffix.iter().all(u8::is_ascii_hexdigit))
}

/// The conntrack entry's object size from the text of `/proc/slabinfo` (version 2.x:
/// `name active_objs num_objs objsize …`), or `None` when no sane line is there.
pub fn parse_conntrack_objsize(text: &[u8]) -> Option<u64> {
    text.split(|&b| b == b'\n').find_map(|line| {
        let mut fields = line
            .split(u8::is_ascii_whitespace)
            .filter(|f| !f.is_empty());
        if !is_conntrack_cache(fields.next()?) {
            return None;
        }
        let objsize = fields.nth(2)?;
        std::str::from_utf8(objsize)
            .ok()?
            .parse::<u64>()
            .ok()
            .filter(|&bytes| bytes > 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/proc")
            .join(name)
    }

    #[test]
    fn mem_total_of_this_machine() {
        let path = fixture("meminfo_6.18.txt");
        let bytes = parse_mem_total(&path, &std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(bytes, 24_684_084 * 1024);
    }

    #[test]
    fn a_bad_meminfo_is_an_error_naming_the_file() {
        let p = Path::new("/proc/meminfo");
        for bad in [
            &b"MemFree: 1 kB\n"[..],
            b"MemTotal: x kB\n",
            b"MemTotal: 12\n",
            b"",
        ] {
            let err = parse_mem_total(p, bad).unwrap_err().to_string();
            assert!(
                err.contains("/proc/meminfo") && err.contains("MemTotal"),
                "{err}"
            );
        }
    }

    #[test]
    fn objsize_of_this_kernel_and_of_per_namespace_caches() {
        let this = std::fs::read(fixture("slabinfo_6.18.txt")).unwrap();
        assert_eq!(parse_conntrack_objsize(&this), Some(256));
        let old = std::fs::read(fixture("slabinfo_3.10_per_netns.txt")).unwrap();
        assert_eq!(
            parse_conntrack_objsize(&old),
            Some(320),
            "skips nf_conntrack_expect"
        );
        assert_eq!(parse_conntrack_objsize(b"kmalloc-256 1 1 256 1 1\n"), None);
        assert_eq!(parse_conntrack_objsize(b"nf_conntrack 1 1\n"), None);
    }

    #[test]
    fn reads_a_proc_tree_and_falls_back_without_slabinfo() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(fixture("meminfo_6.18.txt"), dir.path().join("meminfo")).unwrap();
        let fallback = HostMemory::read_from(dir.path()).unwrap();
        assert_eq!(fallback.entry_bytes, FALLBACK_ENTRY_BYTES);
        assert_eq!(fallback.entry_bytes_source, EntrySizeSource::Fallback);
        assert_eq!(fallback.pointer_bits, usize::BITS);
        std::fs::copy(fixture("slabinfo_6.18.txt"), dir.path().join("slabinfo")).unwrap();
        let measured = HostMemory::read_from(dir.path()).unwrap();
        assert_eq!(
            (measured.entry_bytes, measured.entry_bytes_source),
            (256, EntrySizeSource::Slabinfo)
        );
        assert_eq!(measured.mem_total_bytes, 24_684_084 * 1024);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_mem_total(Path::new("f"), &bytes);
            let _ = parse_conntrack_objsize(&bytes);
        }
    }

    fn host(gib: u64) -> HostMemory {
        HostMemory {
            mem_total_bytes: gib << 30,
            entry_bytes: 256,
            entry_bytes_source: EntrySizeSource::Slabinfo,
            pointer_bits: 64,
        }
    }

    #[test]
    fn classic_ceiling_matches_the_seed_example() {
        // Seed 000: 64 GiB, 64-bit: 64*1024*1024*1024/16384/2 = 2097152.
        assert_eq!(host(64).classic_ceiling(), 2_097_152);
    }

    #[test]
    fn budget_ceiling_counts_objects_and_buckets() {
        let h = host(1);
        let n = h.entries_within(256 * 1024 * 1024, 4);
        // 256 bytes per entry + 8/4 bytes of bucket each.
        assert_eq!(n, 256 * 1024 * 1024 * 4 / (256 * 4 + 8));
        assert!(h.bytes_for(n, n / 4) <= 256 * 1024 * 1024);
    }

    #[test]
    fn an_absurd_entry_size_fits_nothing_instead_of_overflowing() {
        // slabinfo (or a trace's host) can claim any object size.
        let h = HostMemory {
            entry_bytes: u64::MAX / 2,
            ..host(1)
        };
        assert_eq!(h.entries_within(256 * 1024 * 1024, 4), 0);
    }
}
