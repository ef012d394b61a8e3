//! Kernel tests: real kernel, scratch network namespaces, root only.
//!
//! They run one at a time (several change global sysctls), and without root or conntrack
//! they are reported as ignored with one line that says why.

mod act;
mod ctnetlink;
mod daemon;
mod daemon_notrack;
mod drill;
mod evict;
mod faults;
mod incidents;
mod kmsg;
mod lab;
mod loadgen;
mod metrics;
mod notrack;
mod record;
mod rollback;
mod status;
mod table;

use libtest_mimic::{Arguments, Trial};

/// Every kernel test, by name.
fn tests() -> Vec<(&'static str, fn())> {
    let mut all: Vec<(&'static str, fn())> = Vec::new();
    all.extend(act::TESTS);
    all.extend(loadgen::TESTS);
    all.extend(rollback::TESTS);
    all.extend(kmsg::TESTS);
    all.extend(ctnetlink::TESTS);
    all.extend(daemon::TESTS);
    all.extend(daemon_notrack::TESTS);
    all.extend(status::TESTS);
    all.extend(notrack::TESTS);
    all.extend(table::TESTS);
    all.extend(record::TESTS);
    all.extend(drill::TESTS);
    all.extend(metrics::TESTS);
    all.extend(faults::TESTS);
    all.extend(evict::TESTS);
    all.extend(incidents::TESTS);
    all
}

fn main() {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    let reason = lab::unavailable_reason();
    // Global sysctls are shared by every process on the host: hold a host-wide lock so two
    // kernel test runs (two checkouts, CI) never save and restore over each other.
    let _lock = reason.is_none().then(lab::lock_host);
    if let Some(why) = &reason {
        println!("kernel tests skipped: {why}");
    }
    let trials = tests()
        .into_iter()
        .map(|(name, test)| {
            Trial::test(name, move || {
                test();
                Ok(())
            })
            .with_ignored_flag(reason.is_some())
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
