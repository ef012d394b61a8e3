/*!
ctguard keeps Linux connection tracking from overflowing.

The design is one pure decision [`engine`] at the centre, fed by [`observe`] sources,
judged against a validated [`policy`]. Simulation and the other drivers in [`cli`] are
thin layers around that same engine.
*/

pub mod act;
pub mod cli;
pub mod daemon;
pub mod drill;
pub mod engine;
pub mod incident;
pub mod journal;
pub mod knob;
pub mod loadgen;
pub mod metrics;
pub mod netns;
pub mod observe;
pub mod policy;
pub mod policy_watch;
pub mod port;
pub mod security;
pub mod simulate;
pub mod svg;
