//! Policies: raw TOML and the validated `Policy` (see issue 3).
