//! Capabilities the host grants to plugins, each enforcing its route's policy.

pub mod http;
