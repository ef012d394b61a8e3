//! Simulation on a virtual clock (see issue 3).
