//! TODO-overview: kmsg_follower
