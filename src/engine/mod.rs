//! The pure decision engine (see issue 3).
