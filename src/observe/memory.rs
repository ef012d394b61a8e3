//! Host memory and the size of a conntrack entry, and the table ceilings derived from them.
//!
//! Two ceilings matter. The classic rule from the netfilter docs (and seed 000),
//! `CONNTRACK_MAX = RAM / 16384 / (ARCH / 32)`, and a budget ceiling: how many entries fit
//! in a number of bytes when each costs its slab object plus its share of the hash table.

use serde::{Deserialize, Serialize};

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
        let cost = self.entry_bytes * per_bucket + pointer_bytes;
        budget_bytes.saturating_mul(per_bucket) / cost.max(1)
    }

    /// Bytes that `entries` entries and `buckets` buckets take at most.
    pub fn bytes_for(&self, entries: u64, buckets: u64) -> u64 {
        entries
            .saturating_mul(self.entry_bytes)
            .saturating_add(buckets.saturating_mul(u64::from(self.pointer_bits / 8)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
