//! TODO-overview: stat
