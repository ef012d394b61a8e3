//! The `/dev/kmsg` follower against the real kernel: it starts at the end of the log (no
//! replay of older table-full records) and reports a new namespace's table-full drops.

use crate::lab::{GlobalSysctl, LabNetns};
use ctguard::observe::KernelEvent;
use ctguard::observe::kmsg::KmsgEvent;
use ctguard::observe::kmsg_follower::{KMSG_PATH, KmsgFollower};
use std::time::{Duration, Instant};

pub const TESTS: &[(&str, fn())] = &[(
    "kmsg_follower_reports_new_table_full_and_never_replays",
    reports_new_table_full_only,
)];

/// net_ratelimit allows a burst of 10 messages per 5 s for the whole host, so the second
/// namespace's drops may all be suppressed for up to one interval after the first one's.
const PATIENCE: Duration = Duration::from_secs(20);

fn reports_new_table_full_only() {
    let _max = GlobalSysctl::set("nf_conntrack_max", 4096);
    let old = LabNetns::new("kmsg-old");
    old.fill_table(2000);
    // `old` stays alive, so no namespace made meanwhile can reuse its inode.
    let new = LabNetns::new("kmsg-new");
    assert_ne!(old.inode(), new.inode());

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut follower = runtime
        .block_on(async { KmsgFollower::open_at_end(KMSG_PATH) })
        .unwrap();
    let wanted = KernelEvent::TableFull {
        netns: Some(new.inode()),
    };
    let started = Instant::now();
    let mut seen: Vec<KmsgEvent> = Vec::new();
    while !seen.iter().any(|e| e.event == wanted) {
        assert!(
            started.elapsed() < PATIENCE,
            "no {wanted:?} within {PATIENCE:?}; events seen: {seen:?}"
        );
        // Every round sends flows beyond the (full) table again: each one is dropped.
        new.fill_table(500);
        runtime.block_on(async {
            let drain = Duration::from_millis(500);
            while let Ok(next) = tokio::time::timeout(drain, follower.next_event()).await {
                seen.push(next.expect("the follower keeps reading /dev/kmsg"));
            }
        });
    }

    let replayed: Vec<&KmsgEvent> = seen
        .iter()
        .filter(|e| {
            e.event
                == KernelEvent::TableFull {
                    netns: Some(old.inode()),
                }
        })
        .collect();
    assert!(
        replayed.is_empty(),
        "replayed records from before the follower started: {replayed:?}"
    );
    let seqs: Vec<u64> = seen.iter().map(|e| e.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "events out of order: {seqs:?}"
    );
    println!(
        "{} events in {:?}, first {:?}",
        seen.len(),
        started.elapsed(),
        seen.first()
    );
}
