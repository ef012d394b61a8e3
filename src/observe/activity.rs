//! TODO-overview: activity
