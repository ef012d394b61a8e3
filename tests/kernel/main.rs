//! Kernel tests: real kernel, scratch network namespaces, root only.
//!
//! They run one at a time (several change global sysctls), and without root or conntrack
//! they are reported as ignored with one line that says why.

mod lab;
mod loadgen;
mod status;

use libtest_mimic::{Arguments, Trial};

/// Every kernel test, by name.
fn tests() -> Vec<(&'static str, fn())> {
    let mut all: Vec<(&'static str, fn())> = Vec::new();
    all.extend(loadgen::TESTS);
    all.extend(status::TESTS);
    all
}

fn main() {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    let reason = lab::unavailable_reason();
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
