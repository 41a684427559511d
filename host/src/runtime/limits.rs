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
}

impl Default for CallLimits {
    fn default() -> Self {
        CallLimits {
            time: Duration::from_secs(10),
            memory: 64 << 20,
            max_emits: 100,
            max_log_bytes: 64 << 10,
            max_emit_bytes: 1 << 20,
        }
    }
}
