//! Built-in synthetic scenarios: deterministic loads over time (no randomness), expressed
//! as entries offered relative to the kernel's default max of 262144 (`M` below).

use super::world::Load;
use crate::engine::{PortKey, Proto};
use crate::knob::TimeoutKnob;
use std::time::Duration;

const M: f64 = 262_144.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Steady growth to 1.6 M over 30 minutes, a plateau, then the load goes away.
    Ramp,
    /// A flood: 0.3 M, then 6 M within 5 seconds for 10 minutes (drops), then quiet.
    Flood,
    /// A slow leak: 0.2 M growing to 1.5 M over 6 hours, fixed at the 6th hour.
    Leak,
    /// Load swinging between above the act level (0.9 M) and well below it (0.3 M) every
    /// 15 minutes, for two hours.
    Flap,
    /// Heavy load (0.9 M, reached in 2 minutes) for 10 minutes, then a drop-off to 0.1 M
    /// over 5 minutes.
    Recovery,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Ramp => "ramp",
            Scenario::Flood => "flood",
            Scenario::Leak => "leak",
            Scenario::Flap => "flap",
            Scenario::Recovery => "recovery",
        }
    }

    /// How long the scenario runs.
    pub fn duration(self) -> Duration {
        let minutes = match self {
            Scenario::Ramp => 75,
            Scenario::Flood => 45,
            Scenario::Leak => 7 * 60,
            Scenario::Flap => 2 * 60,
            Scenario::Recovery => 45,
        };
        Duration::from_secs(minutes * 60)
    }

    /// The load at `t`.
    pub fn load(self, t: Duration) -> Load {
        let s = t.as_secs_f64();
        let min = 60.0;
        let entries = match self {
            Scenario::Ramp => {
                if s < 30.0 * min {
                    M * (0.2 + 1.4 * s / (30.0 * min))
                } else if s < 40.0 * min {
                    1.6 * M
                } else {
                    0.1 * M
                }
            }
            Scenario::Flood => {
                if s < min {
                    0.3 * M
                } else if s < min + 5.0 {
                    M * (0.3 + 5.7 * (s - min) / 5.0)
                } else if s < 11.0 * min {
                    6.0 * M
                } else {
                    0.2 * M
                }
            }
            Scenario::Leak => {
                if s < 360.0 * min {
                    M * (0.2 + 1.3 * s / (360.0 * min))
                } else {
                    0.2 * M
                }
            }
            Scenario::Flap => {
                let phase = (s / (15.0 * min)) as u64;
                if phase.is_multiple_of(2) {
                    0.9 * M
                } else {
                    0.3 * M
                }
            }
            Scenario::Recovery => {
                if s < 2.0 * min {
                    M * (0.3 + 0.6 * s / (2.0 * min))
                } else if s < 10.0 * min {
                    0.9 * M
                } else if s < 15.0 * min {
                    M * (0.9 - 0.8 * (s - 10.0 * min) / (5.0 * min))
                } else {
                    0.1 * M
                }
            }
        };
        Load {
            entries,
            classes: vec![
                (TimeoutKnob::Established, 0.35),
                (TimeoutKnob::TimeWait, 0.25),
                (TimeoutKnob::SynRecv, 0.10),
                (TimeoutKnob::FinWait, 0.10),
                (TimeoutKnob::Udp, 0.20),
            ],
            ports: vec![
                (port(Proto::Tcp, 443), 0.45),
                (port(Proto::Tcp, 80), 0.25),
                (port(Proto::Udp, 53), 0.15),
                (port(Proto::Tcp, 22), 0.02),
            ],
        }
    }
}

fn port(proto: Proto, port: u16) -> PortKey {
    PortKey { proto, port }
}
