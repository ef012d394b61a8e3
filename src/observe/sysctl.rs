//! TODO-overview: sysctl
