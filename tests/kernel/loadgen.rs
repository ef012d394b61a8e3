//! The load generator really fills a scratch namespace's table, and the kernel then drops.

use crate::lab::{GlobalSysctl, LabNetns, read_global};

pub const TESTS: &[(&str, fn())] = &[("loadgen_fills_a_namespace_table", fills_table)];

fn fills_table() {
    let _max = GlobalSysctl::set("nf_conntrack_max", 4096);
    let lab = LabNetns::new("fill");
    let count = lab.fill_table(2000);
    assert_eq!(count, read_global("nf_conntrack_max"));
    let dropped = lab.sysctl("nf_conntrack_count");
    assert_eq!(dropped, count, "the table stays full while the flows live");
}
