//! TODO-overview: kmsg
