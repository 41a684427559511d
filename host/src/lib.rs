//! Herald: the event handler of the transactional-outbox pattern.
//!
//! Producers write events into the store; Herald routes them to plugins and keeps the
//! books. This crate is both the service and the `herald` command line.

pub mod admin;
pub mod capabilities;
pub mod cli;
pub mod config;
pub mod dispatch;
pub mod metrics;
pub mod router;
pub mod runtime;
pub mod service;
pub mod store;
