//! The recording actuator: reads through to a real one, records writes instead of making
//! them. Dry-run drives it, so what it logs as "would" is exactly what enforce would do.

use super::notrack::{BackendKind, NotrackBackend, NotrackChange, NotrackError, PortKey};
use super::{ActError, Actuator};
use crate::knob::Knob;
use std::collections::BTreeMap;

/// A write that was asked for and not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordedWrite {
    pub knob: Knob,
    pub value: u64,
}

/// Wraps a reader; writes are recorded and then seen by later reads, so a sequence of
/// decisions plays out as it would on the host.
#[derive(Debug)]
pub struct RecordingActuator<A> {
    inner: A,
    overlay: BTreeMap<Knob, u64>,
    writes: Vec<RecordedWrite>,
}

impl<A: Actuator> RecordingActuator<A> {
    pub fn new(inner: A) -> Self {
        RecordingActuator {
            inner,
            overlay: BTreeMap::new(),
            writes: Vec::new(),
        }
    }

    /// Every write asked for, in order.
    pub fn writes(&self) -> &[RecordedWrite] {
        &self.writes
    }
}

impl<A: Actuator> Actuator for RecordingActuator<A> {
    fn read(&mut self, knob: Knob) -> Result<u64, ActError> {
        match self.overlay.get(&knob) {
            Some(&v) => Ok(v),
            None => self.inner.read(knob),
        }
    }

    /// Records the write, unless the kernel would refuse it here (then the same error as
    /// enforce would get, so the engine moves on to the next stage as it would).
    fn write(&mut self, knob: Knob, value: u64) -> Result<(), ActError> {
        self.inner.check_write(knob, value)?;
        self.writes.push(RecordedWrite { knob, value });
        self.overlay.insert(knob, value);
        Ok(())
    }
}

/// A NOTRACK backend that records what it is asked to do and changes nothing. It
/// rehearses one kind (the one the host would use), so the dry-run journal says which.
#[derive(Debug, Default)]
pub struct RecordingNotrack {
    pub rehearsing: BackendKind,
    pub applied: Vec<NotrackChange>,
    pub removed: Vec<PortKey>,
}

impl RecordingNotrack {
    pub fn rehearsing(kind: BackendKind) -> Self {
        RecordingNotrack {
            rehearsing: kind,
            ..RecordingNotrack::default()
        }
    }
}

impl NotrackBackend for RecordingNotrack {
    fn kind(&self) -> BackendKind {
        self.rehearsing
    }

    fn is_rehearsal(&self) -> bool {
        true
    }

    fn install(&mut self) -> Result<(), NotrackError> {
        Ok(())
    }

    fn apply(&mut self, changes: &[NotrackChange]) -> Result<(), NotrackError> {
        self.applied.extend_from_slice(changes);
        Ok(())
    }

    fn remove(&mut self, ports: &[PortKey]) -> Result<(), NotrackError> {
        self.removed.extend_from_slice(ports);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::sysctl::{Roots, SysctlActuator};

    #[test]
    fn records_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let nf = dir.path().join("net/netfilter");
        std::fs::create_dir_all(&nf).unwrap();
        std::fs::write(nf.join("nf_conntrack_max"), "100\n").unwrap();
        let real = SysctlActuator::new(
            Roots {
                proc_sys: dir.path().to_path_buf(),
                module_params: dir.path().join("none"),
            },
            None,
        );
        let mut rec = RecordingActuator::new(real);
        rec.write(Knob::Max, 200).unwrap();
        assert_eq!(rec.read(Knob::Max).unwrap(), 200);
        assert_eq!(
            rec.writes(),
            &[RecordedWrite {
                knob: Knob::Max,
                value: 200
            }]
        );
        assert_eq!(
            std::fs::read_to_string(nf.join("nf_conntrack_max")).unwrap(),
            "100\n"
        );
    }
}
