//! What one plugin call may consume. Every cap turns into a clear attempt failure, never a
//! host failure.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct CallLimits {
    /// Wall time for the whole call, host calls (HTTP) included.
    pub time: Duration,
    /// Linear memory of the instance, in bytes.
    pub memory: usize,
    /// Events one call may emit.
    pub max_emits: u32,
    /// Bytes of log messages one call may write; the rest is dropped with one warning.
    pub max_log_bytes: usize,
    /// Bytes of one emitted event's data.
    pub max_emit_bytes: usize,
    /// Events one instance handles in a row before a fresh one is made. Instantiation
    /// costs tens of microseconds, a call on a live instance a few; what a plugin keeps
    /// in globals survives between those events. 1 gives every event a fresh instance.
    pub events_per_instance: u32,
}

impl Default for CallLimits {
    fn default() -> Self {
        CallLimits {
            time: Duration::from_secs(10),
            memory: 64 << 20,
            max_emits: 100,
            max_log_bytes: 64 << 10,
            max_emit_bytes: 1 << 20,
            events_per_instance: 64,
        }
    }
}
