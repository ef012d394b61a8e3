//! TODO-overview: memory
