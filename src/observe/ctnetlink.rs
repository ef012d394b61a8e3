//! TODO-overview: ctnetlink
