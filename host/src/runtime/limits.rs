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
    /// Bytes of one emitted event's data and headers.
    pub max_emit_bytes: usize,
    /// Bytes of data of all events one call emits together: what the host holds in
    /// memory for a call until its outcome is written (without it, `max_emits` events of
    /// `max_emit_bytes` each would be 100 MiB per call).
    pub max_emitted_bytes: usize,
    /// `http.send` calls one call may make. A delivery needs a handful; a plugin looping
    /// on `http.send` would otherwise turn one event into thousands of requests to a
    /// receiver until its time limit. The call past it traps.
    pub max_http_requests: u32,
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
            max_emitted_bytes: 8 << 20,
            max_http_requests: 32,
            events_per_instance: 64,
        }
    }
}
