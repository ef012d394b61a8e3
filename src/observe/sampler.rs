//! The sampler: one [`ConntrackSample`] per poll from the sysctl and stat sources of one
//! network namespace, opened once (inside the namespace when asked) and re-read cheaply.
//!
//! The sysctls are required: without count and max there is nothing to decide on. The
//! counters are not: a stat file this kernel lays out unexpectedly leaves `stats` empty,
//! is logged once, and the sampler keeps going.

use super::stat::StatSource;
use super::sysctl::SysctlSource;
use super::{ConntrackSample, ObserveError};
use std::path::Path;

pub struct Sampler {
    sysctl: SysctlSource,
    stat: Option<StatSource>,
    /// The last stat error logged, so a persistent one is logged once, not every poll.
    last_stat_error: Option<String>,
}

impl Sampler {
    /// Opens the sources of the namespace at `netns`, or of the caller's own.
    pub fn open(netns: Option<&Path>) -> Result<Sampler, ObserveError> {
        let open_here = || {
            (
                SysctlSource::open_default(),
                StatSource::open_current_netns(),
            )
        };
        let (sysctl, stat) = match netns {
            Some(path) => {
                crate::netns::run_in(path, open_here).map_err(|e| ObserveError::io(path, e))?
            }
            None => open_here(),
        };
        let mut sampler = Sampler {
            sysctl: sysctl?,
            stat: None,
            last_stat_error: None,
        };
        match stat {
            Ok(stat) => sampler.stat = Some(stat),
            Err(e) => sampler.note_stat_error(&e),
        }
        Ok(sampler)
    }

    /// Re-reads everything into `sample`, reusing its allocations.
    pub fn read_into(&mut self, sample: &mut ConntrackSample) -> Result<(), ObserveError> {
        self.sysctl.read_into(sample)?;
        sample.stats = match self.stat.as_mut().map(StatSource::read) {
            Some(Ok(stats)) => {
                self.last_stat_error = None;
                Some(stats)
            }
            Some(Err(e)) => {
                self.note_stat_error(&e);
                None
            }
            None => None,
        };
        Ok(())
    }

    /// A fresh sample.
    pub fn read(&mut self) -> Result<ConntrackSample, ObserveError> {
        let mut sample = ConntrackSample::default();
        self.read_into(&mut sample)?;
        Ok(sample)
    }

    fn note_stat_error(&mut self, e: &ObserveError) {
        let text = e.to_string();
        if self.last_stat_error.as_ref() != Some(&text) {
            tracing::warn!(error = %text, "conntrack counters unavailable; watching the fill ratio only");
            self.last_stat_error = Some(text);
        }
    }
}
