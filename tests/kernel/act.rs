//! The sysctl actuator on the real kernel: per-namespace timeouts are written inside the
//! target namespace only; global knobs are refused as "not permitted" from inside one.

use crate::lab::{GlobalSysctl, LabNetns, read_global};
use ctguard::act::Actuator;
use ctguard::act::recording::RecordingActuator;
use ctguard::act::sysctl::{Roots, SysctlActuator};
use ctguard::knob::{Knob, TimeoutKnob};

pub const TESTS: &[(&str, fn())] = &[
    (
        "act_writes_timeouts_in_the_target_namespace_only",
        timeouts_in_target_namespace,
    ),
    (
        "act_global_knobs_are_not_permitted_inside_a_namespace",
        global_knobs_not_permitted_inside,
    ),
    ("act_raises_max_and_buckets_from_the_host", raises_globals),
];

const ESTABLISHED: Knob = Knob::Timeout(TimeoutKnob::Established);

fn timeouts_in_target_namespace() {
    let lab = LabNetns::new("act");
    let host_before = read_global(ESTABLISHED.sysctl_file());
    let mut act = SysctlActuator::new(Roots::default(), Some(lab.path.clone()));
    let lab_before = act.read(ESTABLISHED).unwrap();
    act.write(ESTABLISHED, 1234).unwrap();
    assert_eq!(lab.sysctl(ESTABLISHED.sysctl_file()), 1234);
    assert_eq!(act.read(ESTABLISHED).unwrap(), 1234);
    assert_eq!(read_global(ESTABLISHED.sysctl_file()), host_before);
    act.write(ESTABLISHED, lab_before).unwrap();
}

fn global_knobs_not_permitted_inside() {
    let lab = LabNetns::new("actns");
    let max = read_global("nf_conntrack_max");
    let (max_err, buckets_err, timeout) = ctguard::netns::run_in(&lab.path, || {
        let mut act = SysctlActuator::new(Roots::default(), None);
        (
            act.write(Knob::Max, max + 1).unwrap_err(),
            act.write(Knob::Buckets, 1024).unwrap_err(),
            act.write(ESTABLISHED, 600),
        )
    })
    .unwrap();
    assert!(max_err.is_not_permitted(), "{max_err}");
    assert!(buckets_err.is_not_permitted(), "{buckets_err}");
    timeout.expect("timeouts are per namespace and writable inside it");
    assert_eq!(read_global("nf_conntrack_max"), max, "host max untouched");

    // Dry-run's recording actuator meets the same refusals without writing anything.
    let (max_err, buckets_err, timeout, recorded) = ctguard::netns::run_in(&lab.path, || {
        let mut rehearsal = RecordingActuator::new(SysctlActuator::new(Roots::default(), None));
        (
            rehearsal.write(Knob::Max, max + 1).unwrap_err(),
            rehearsal.write(Knob::Buckets, 1024).unwrap_err(),
            rehearsal.write(ESTABLISHED, 60),
            rehearsal.writes().len(),
        )
    })
    .unwrap();
    assert!(max_err.is_not_permitted(), "{max_err}");
    assert!(buckets_err.is_not_permitted(), "{buckets_err}");
    timeout.expect("a timeout write would be allowed");
    assert_eq!(recorded, 1, "only the timeout is recorded");
    assert_eq!(
        lab.sysctl(ESTABLISHED.sysctl_file()),
        600,
        "nothing written"
    );
    // From the host, the global knobs would be written.
    let mut rehearsal = RecordingActuator::new(SysctlActuator::new(Roots::default(), None));
    rehearsal.write(Knob::Max, max + 1).unwrap();
    rehearsal.write(Knob::Buckets, 1024).unwrap();
    assert_eq!(read_global("nf_conntrack_max"), max, "host max untouched");
}

fn raises_globals() {
    let max = read_global("nf_conntrack_max");
    let buckets = read_global("nf_conntrack_buckets");
    let _max_guard = GlobalSysctl::set("nf_conntrack_max", max);
    let _buckets_guard = GlobalSysctl::set("nf_conntrack_buckets", buckets);
    let mut act = SysctlActuator::new(Roots::default(), None);
    act.write(Knob::Max, max + 4096).unwrap();
    assert_eq!(read_global("nf_conntrack_max"), max + 4096);
    act.write(Knob::Buckets, buckets + 1024).unwrap();
    assert_eq!(read_global("nf_conntrack_buckets"), buckets + 1024);
}
