//! Pressure levels with hysteresis and sustain, and drop detection on cumulative counters.

use crate::observe::ConntrackStats;
use crate::policy::{Level, Levels};
use std::time::Duration;

/// Which levels are reached, and since when the ratio has been above each.
///
/// A level's sustain clock starts when the ratio first reaches `at` and only restarts
/// once the ratio falls below `clear_below`: noise inside the hysteresis band must not
/// keep a real, sustained pressure from ever counting.
#[derive(Debug, Clone, Default)]
pub struct LevelTracker {
    /// Indexed warn, act, critical.
    above_since: [Option<Duration>; 3],
    reached: [bool; 3],
}

const INDEXED: [Level; 3] = [Level::Warn, Level::Act, Level::Critical];

fn index(level: Level) -> Option<usize> {
    INDEXED.iter().position(|&l| l == level)
}

impl LevelTracker {
    /// Feeds one ratio. `lost_packets` (drops, insert failures, a table-full message)
    /// makes the level critical at once, whatever the ratio.
    pub fn update(&mut self, levels: &Levels, now: Duration, ratio: f64, lost_packets: bool) {
        for (i, (_, t)) in levels.iter().into_iter().enumerate() {
            if ratio < t.clear_below {
                self.above_since[i] = None;
                self.reached[i] = false;
            } else if ratio >= t.at || self.above_since[i].is_some() {
                let since = *self.above_since[i].get_or_insert(now);
                if now.saturating_sub(since) >= t.sustain {
                    self.reached[i] = true;
                }
            }
        }
        if lost_packets {
            self.force_critical(now);
        }
    }

    /// After a policy reload: a level whose threshold changed starts over (its sustain clock
    /// and hysteresis were measured against the old one), so the next ratio is judged by the
    /// new threshold alone.
    pub fn retune(&mut self, old: &Levels, new: &Levels) {
        for (i, ((_, a), (_, b))) in old.iter().into_iter().zip(new.iter()).enumerate() {
            if a != b {
                self.above_since[i] = None;
                self.reached[i] = false;
            }
        }
    }

    /// Marks critical as reached now (packets are being lost).
    pub fn force_critical(&mut self, now: Duration) {
        self.above_since[2].get_or_insert(now);
        self.reached[2] = true;
    }

    /// The highest level reached.
    pub fn level(&self) -> Level {
        (0..3)
            .rev()
            .find(|&i| self.reached[i])
            .map_or(Level::Normal, |i| INDEXED[i])
    }

    /// How long the ratio has been above `level` (zero for normal or an unknown start).
    pub fn held(&self, level: Level, now: Duration) -> Duration {
        index(level)
            .and_then(|i| self.above_since[i])
            .map_or(Duration::ZERO, |since| now.saturating_sub(since))
    }
}

/// Packets lost between two readings of the cumulative counters: the increase of `drop`
/// plus `insert_failed`. A counter that went backwards (reboot, a different namespace,
/// a counter source that changed) is a new baseline, not an alarm: returns 0.
pub fn lost_between(previous: Option<&ConntrackStats>, current: Option<&ConntrackStats>) -> u64 {
    let (Some(prev), Some(cur)) = (previous, current) else {
        return 0;
    };
    if cur.drop < prev.drop || cur.insert_failed < prev.insert_failed {
        return 0;
    }
    (cur.drop - prev.drop).saturating_add(cur.insert_failed - prev.insert_failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn sustain_and_hysteresis() {
        let levels = Policy::embedded_default().levels; // act 0.85/0.80 for 10s
        let mut t = LevelTracker::default();
        t.update(&levels, secs(0), 0.86, false);
        assert_eq!(t.level(), Level::Normal);
        // A dip inside the band does not restart the clock…
        t.update(&levels, secs(5), 0.82, false);
        t.update(&levels, secs(10), 0.86, false);
        assert_eq!(t.level(), Level::Act);
        assert_eq!(t.held(Level::Act, secs(10)), secs(10));
        // …staying inside the band keeps the level…
        t.update(&levels, secs(11), 0.81, false);
        assert_eq!(t.level(), Level::Act);
        // …and falling below clear_below leaves it.
        t.update(&levels, secs(12), 0.79, false);
        assert_eq!(t.level(), Level::Normal);
        // Warn (sustain 30s) has been held since 0s throughout.
        t.update(&levels, secs(30), 0.79, false);
        assert_eq!(t.level(), Level::Warn);
        t.update(&levels, secs(31), 0.10, false);
        assert_eq!(t.level(), Level::Normal);
    }

    #[test]
    fn losses_are_critical_at_once_and_clear_on_low_ratio() {
        let levels = Policy::embedded_default().levels;
        let mut t = LevelTracker::default();
        t.update(&levels, secs(0), 0.30, true);
        assert_eq!(t.level(), Level::Critical);
        t.update(&levels, secs(1), 0.30, false);
        assert_eq!(t.level(), Level::Normal);
    }

    #[test]
    fn counters_going_backwards_are_not_losses() {
        let a = ConntrackStats {
            drop: 100,
            insert_failed: 5,
            ..Default::default()
        };
        let b = ConntrackStats {
            drop: 103,
            insert_failed: 6,
            ..Default::default()
        };
        assert_eq!(lost_between(Some(&a), Some(&b)), 4);
        assert_eq!(lost_between(Some(&b), Some(&ConntrackStats::default())), 0);
        assert_eq!(lost_between(None, Some(&b)), 0);
    }
}
