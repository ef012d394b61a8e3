//! `ctguard rollback`: put back the original values of changes still in force, newest
//! first, from the journal (also after a crash). Values someone else changed since are
//! left alone and reported, and so is a namespace that cannot be read any more (gone since):
//! the other namespaces are still rolled back, and the command exits non-zero.

use super::StateDir;
use crate::act::executor::{Executor, Reverted};
use crate::act::persist::Persistence;
use crate::act::sysctl::{Roots, SysctlActuator};
use crate::journal::{EntryId, Journal};
use crate::observe::sysctl;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["all", "stage"])))]
pub struct RollbackArgs {
    #[command(flatten)]
    pub state: StateDir,
    /// Roll back every change still in force.
    #[arg(long)]
    pub all: bool,
    /// Roll back only the changes of this stage (e.g. `shorten_timeouts`).
    #[arg(long, value_name = "NAME")]
    pub stage: Option<String>,
}

pub fn run(args: RollbackArgs) -> anyhow::Result<ExitCode> {
    // The journal says what to write to the kernel: only one nobody else can edit.
    crate::security::check_state_dir(&args.state.state_dir)?;
    // Refused while the daemon runs: it writes the journal from its own copy.
    let mut journal = Journal::open_exclusive(&args.state.state_dir)?;
    // Newest first, grouped by namespace: each group gets actuators bound to its
    // namespace. NOTRACK, the later stage, is undone before the knobs.
    let mut groups: Vec<Group> = Vec::new();
    let wanted = |stage: &str| args.stage.as_deref().is_none_or(|s| s == stage);
    for e in journal.notrack_in_force() {
        if wanted(&e.stage) {
            group(&mut groups, &e.netns).notrack.push(e.id);
        }
    }
    for e in journal.in_force_newest_first() {
        if wanted(&e.stage) {
            group(&mut groups, &e.netns).knobs.push(e.id);
        }
    }
    if groups.is_empty() {
        println!("nothing to roll back");
        return Ok(ExitCode::SUCCESS);
    }
    let mut complete = true;
    for Group {
        netns,
        knobs,
        notrack,
    } in groups
    {
        // A namespace gone since (or otherwise unreadable) fails its own changes only.
        let in_use = match entries_in_use(netns.as_deref()) {
            Ok(in_use) => in_use,
            Err(e) => {
                complete = false;
                let name = netns
                    .as_deref()
                    .map_or("ctguard's own".into(), |ns| ns.display().to_string());
                let ids = notrack.iter().chain(&knobs).map(|id| format!("#{id}"));
                println!(
                    "namespace {name}: {} not rolled back: {e:#}",
                    ids.collect::<Vec<_>>().join(", ")
                );
                continue;
            }
        };
        let actuator = SysctlActuator::new(Roots::default(), netns.clone());
        // Each exemption is removed by the kind of backend that made it.
        let mut exec = Executor::new(actuator, journal, netns)
            .without_notrack("rollback makes no NOTRACK exemptions".into());
        let had_notrack = !notrack.is_empty();
        for id in notrack {
            match exec.untrack(id, None) {
                Ok(()) => println!("#{id}: NOTRACK removed"),
                Err(e) => {
                    complete = false;
                    println!("#{id}: {e}")
                }
            }
        }
        if had_notrack {
            match exec.uninstall_notrack_if_unused() {
                Ok(true) => println!("ctguard's NOTRACK table removed"),
                Ok(false) => {}
                Err(e) => {
                    complete = false;
                    println!("removing ctguard's NOTRACK table: {e}")
                }
            }
        }
        for id in knobs {
            match exec.revert(id, in_use) {
                Ok(Reverted::Restored { entry, knob, to }) => {
                    println!("#{entry}: {knob} restored to {to}")
                }
                Ok(Reverted::Stepped { entry, knob, to }) => {
                    complete = false;
                    println!("#{entry}: {knob} only stepped back to {to}")
                }
                Ok(Reverted::AlreadyOriginal { entry, knob }) => {
                    println!("#{entry}: {knob} already at its original value")
                }
                Ok(Reverted::LeftDrifted { entry, knob, live }) => {
                    complete = false;
                    println!(
                        "#{entry}: {knob} left alone: it is {live} now, set by someone else since"
                    )
                }
                Ok(Reverted::Deferred { entry, knob, why }) => {
                    complete = false;
                    println!("#{entry}: {knob} not restored yet: {why}")
                }
                Err(e) => {
                    complete = false;
                    println!("#{id}: {e}")
                }
            }
        }
        journal = exec.into_journal();
    }
    // Boot-time files (persist = true) follow the journal: drop what was rolled back.
    let persistence = Persistence::new("/");
    if persistence.has_files() {
        persistence.sync(&journal, true)?;
    }
    Ok(if complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The changes of one namespace.
struct Group {
    netns: Option<PathBuf>,
    knobs: Vec<EntryId>,
    notrack: Vec<EntryId>,
}

fn group<'a>(groups: &'a mut Vec<Group>, netns: &Option<PathBuf>) -> &'a mut Group {
    match groups.iter().position(|g| g.netns == *netns) {
        Some(i) => &mut groups[i],
        None => {
            groups.push(Group {
                netns: netns.clone(),
                knobs: Vec::new(),
                notrack: Vec::new(),
            });
            groups.last_mut().expect("just pushed")
        }
    }
}

/// The most entries in use that a restored max must still hold: the protected namespace's
/// count and ctguard's own.
fn entries_in_use(netns: Option<&Path>) -> anyhow::Result<u64> {
    let read = || sysctl::read_count(Path::new(sysctl::DEFAULT_ROOT));
    let own = read()?;
    let target = match netns {
        Some(ns) => crate::netns::run_in(ns, read)??,
        None => own,
    };
    Ok(own.max(target))
}
