//! The state behind one plugin call and the capabilities it is granted.
//!
//! A `HostState` lives as long as one plugin instance. An instance may serve several
//! events in a row (the route's `events_per_instance`); everything the host keeps per
//! event is reset between them (`begin_event`), so no event sees another's emits, logs or
//! stderr. WASI is linked (a Rust `wasm32-wasip2` component imports it) but
//! its context grants nothing: no preopened directories, no environment, no arguments,
//! no sockets, stdin closed, stdout discarded; stderr is kept (capped) so a panic message
//! reaches the attempts log.

use std::collections::BTreeMap;
use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::p2::pipe::{MemoryOutputPipe, SinkOutputStream};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{config, emit, herald::plugin::types, http, log};
use super::limits::CallLimits;
use crate::capabilities::http::{HttpCapability, HttpFailure, OutboundRequest};
use crate::store::NewEvent;

/// Bytes of a plugin's stderr kept per instance (beyond it, writes fail).
const STDERR_CAPACITY: usize = 64 << 10;

/// Longest event type, entity type, entity id, target, idempotency key or header name an
/// emitted event may have: these are routing and lookup keys, not payload, and an
/// unbounded one would be copied into every index and log line that names the event.
const MAX_EMIT_FIELD_BYTES: usize = 1024;

/// What a route grants its plugin; shared by every call on the route.
pub struct RouteGrant {
    pub route: String,
    pub plugin: String,
    /// The route's config with `env:` secrets already resolved.
    pub config: BTreeMap<String, String>,
    /// `None` when the route allows no HTTP hosts.
    pub http: Option<HttpCapability>,
    pub limits: CallLimits,
}

pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    grant: Arc<RouteGrant>,
    event_id: i64,
    pub(super) stderr: MemoryOutputPipe,
    /// Where the current event's stderr begins in `stderr`.
    stderr_start: usize,
    pub(super) emitted: Vec<NewEvent>,
    /// Data and header bytes of the events the current event's call emitted.
    emitted_bytes: usize,
    /// Emits of the current event's call that the host refused, and why the first was:
    /// a `delivered` outcome with refused emits would commit only part of its effect.
    pub(super) emits_refused: u32,
    pub(super) first_refused_emit: Option<String>,
    http_requests: u32,
    log_bytes: usize,
    log_truncated: bool,
    /// Set when the plugin asked for more memory than the route allows.
    pub(super) memory_refused: Option<usize>,
    /// Set when a host call trapped the plugin for exceeding a per-call limit: the
    /// attempt's reason.
    pub(super) limit_exceeded: Option<String>,
    /// When the running call's time limit is up (checked at every epoch tick).
    pub(super) call_deadline: Option<std::time::Instant>,
}

impl HostState {
    pub fn new(grant: Arc<RouteGrant>, event_id: i64) -> Self {
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        let wasi = WasiCtx::builder()
            .stdout(SinkOutputStream)
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        HostState {
            wasi,
            table: ResourceTable::new(),
            grant,
            event_id,
            stderr,
            stderr_start: 0,
            emitted: Vec::new(),
            emitted_bytes: 0,
            emits_refused: 0,
            first_refused_emit: None,
            http_requests: 0,
            log_bytes: 0,
            log_truncated: false,
            memory_refused: None,
            limit_exceeded: None,
            call_deadline: None,
        }
    }

    /// Start the next event on the same instance: what the host keeps per event (emits,
    /// log budget, the event id in log lines, stderr) starts empty again, so nothing of
    /// one event's call reaches the next one's report.
    pub(super) fn begin_event(&mut self, event_id: i64) {
        self.event_id = event_id;
        self.emitted.clear();
        self.emitted_bytes = 0;
        self.emits_refused = 0;
        self.first_refused_emit = None;
        self.http_requests = 0;
        self.log_bytes = 0;
        self.log_truncated = false;
        self.memory_refused = None;
        self.limit_exceeded = None;
        self.stderr_start = self.stderr.contents().len();
    }

    /// Whether the stderr buffer is past half full: the instance is then retired before
    /// a chatty plugin fills it and its writes start to fail.
    pub(super) fn stderr_filling(&self) -> bool {
        self.stderr.contents().len() > STDERR_CAPACITY / 2
    }

    /// The plugin's stderr during the current event, for the attempts log: the last lines,
    /// where a panic message is.
    pub(super) fn stderr_tail(&self, max: usize) -> Option<String> {
        let bytes = self.stderr.contents();
        let bytes = bytes.get(self.stderr_start..).unwrap_or_default();
        let text = String::from_utf8_lossy(bytes);
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        let start = text.len().saturating_sub(max);
        let start = (start..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(text.len());
        Some(text[start..].replace('\n', " | "))
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.grant.limits.memory {
            self.memory_refused = Some(desired);
            // An error (not `Ok(false)`) traps at once: a Rust guest would otherwise abort
            // with a less telling "memory allocation failed".
            wasmtime::bail!(
                "memory limit of {} bytes exceeded (asked for {desired})",
                self.grant.limits.memory
            );
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

impl types::Host for HostState {}

impl http::Host for HostState {
    async fn send(
        &mut self,
        request: http::Request,
    ) -> wasmtime::Result<Result<http::Response, http::Error>> {
        let limit = self.grant.limits.max_http_requests;
        if self.http_requests >= limit {
            let reason = format!("{limit} HTTP requests per attempt");
            self.limit_exceeded = Some(reason.clone());
            wasmtime::bail!(reason);
        }
        self.http_requests += 1;
        Ok(self.send_within_limits(request).await)
    }
}

impl HostState {
    async fn send_within_limits(
        &mut self,
        request: http::Request,
    ) -> Result<http::Response, http::Error> {
        let Some(capability) = self.grant.http.clone() else {
            return Err(http::Error::Denied(format!(
                "route '{}' allows no HTTP hosts (set allowed_hosts)",
                self.grant.route
            )));
        };
        let outbound = OutboundRequest {
            method: request.method,
            url: request.url,
            headers: request.headers,
            body: request.body,
            timeout: request
                .timeout_ms
                .map(|ms| std::time::Duration::from_millis(u64::from(ms))),
        };
        match capability.send(outbound).await {
            Ok(response) => Ok(http::Response {
                status: response.status,
                headers: response.headers,
                body: response.body,
            }),
            Err(failure) => {
                tracing::debug!(
                    event_id = self.event_id,
                    route = %self.grant.route,
                    %failure,
                    "plugin HTTP request failed"
                );
                Err(match failure {
                    HttpFailure::Denied(why) => http::Error::Denied(why),
                    HttpFailure::InvalidRequest(why) => http::Error::InvalidRequest(why),
                    HttpFailure::Timeout => http::Error::Timeout,
                    HttpFailure::Connect(why) => http::Error::Connect(why),
                    HttpFailure::TooLarge(cap) => http::Error::TooLarge(cap),
                    HttpFailure::Other(why) => http::Error::Other(why),
                })
            }
        }
    }
}

impl emit::Host for HostState {
    async fn emit(&mut self, event: emit::NewEvent) -> Result<(), emit::EmitError> {
        let accepted = self.accept_emit(event);
        if let Err(refusal) = &accepted {
            self.emits_refused = self.emits_refused.saturating_add(1);
            if self.first_refused_emit.is_none() {
                self.first_refused_emit = Some(match refusal {
                    emit::EmitError::Invalid(why) => format!("invalid event: {why}"),
                    emit::EmitError::LimitReached(limit) => {
                        format!("emit limit of {limit} events per attempt reached")
                    }
                });
            }
        }
        accepted
    }
}

impl HostState {
    /// Checks an emitted event against the call's limits and against what every store
    /// can hold (Postgres `text` and `jsonb` refuse NUL characters, and an event that
    /// cannot be written would make the whole outcome unrecordable).
    fn accept_emit(&mut self, event: emit::NewEvent) -> Result<(), emit::EmitError> {
        let limits = &self.grant.limits;
        if self.emitted.len() >= limits.max_emits as usize {
            return Err(emit::EmitError::LimitReached(limits.max_emits));
        }
        let invalid = emit::EmitError::Invalid;
        let size = event.data.len()
            + event
                .headers
                .iter()
                .map(|(name, value)| name.len() + value.len())
                .sum::<usize>();
        if size > limits.max_emit_bytes {
            return Err(invalid(format!(
                "data and headers are {size} bytes, over the limit of {}",
                limits.max_emit_bytes
            )));
        }
        if self.emitted_bytes + size > limits.max_emitted_bytes {
            return Err(invalid(format!(
                "the events emitted in this attempt would exceed {} bytes in all",
                limits.max_emitted_bytes
            )));
        }
        let keys = [
            ("event_type", Some(&event.event_type)),
            ("entity_type", Some(&event.entity_type)),
            ("entity_id", Some(&event.entity_id)),
            ("target", event.target.as_ref()),
            ("idempotency_key", event.idempotency_key.as_ref()),
        ];
        for (field, value) in keys {
            let Some(value) = value else { continue };
            if value.trim().is_empty() {
                return Err(invalid(format!("{field} is empty")));
            }
            field_fits(field, value).map_err(invalid)?;
        }
        for (name, value) in &event.headers {
            if name.trim().is_empty() {
                return Err(invalid("a header name is empty".into()));
            }
            field_fits("header name", name).map_err(invalid)?;
            if value.contains('\0') {
                return Err(invalid(format!("header '{name}' contains a NUL character")));
            }
        }
        let data: serde_json::Value = serde_json::from_str(&event.data)
            .map_err(|err| invalid(format!("data is not valid JSON: {err}")))?;
        if json_contains_nul(&data) {
            return Err(invalid("data contains a NUL character (\\u0000)".into()));
        }
        let headers: serde_json::Map<String, serde_json::Value> = event
            .headers
            .into_iter()
            .map(|(name, value)| (name, serde_json::Value::String(value)))
            .collect();
        let new_event = NewEvent {
            event_type: event.event_type,
            entity_type: event.entity_type,
            entity_id: event.entity_id,
            event_data: data,
            event_target: event.target,
            idempotency_key: event.idempotency_key,
            headers: Some(headers),
        };
        new_event.validate().map_err(invalid)?;
        self.emitted_bytes += size;
        self.emitted.push(new_event);
        Ok(())
    }
}

fn field_fits(field: &str, value: &str) -> Result<(), String> {
    if value.len() > MAX_EMIT_FIELD_BYTES {
        return Err(format!(
            "{field} is {} bytes, over the limit of {MAX_EMIT_FIELD_BYTES}",
            value.len()
        ));
    }
    if value.contains('\0') {
        return Err(format!("{field} contains a NUL character"));
    }
    Ok(())
}

fn json_contains_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(text) => text.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(json_contains_nul),
        serde_json::Value::Object(map) => map
            .iter()
            .any(|(key, value)| key.contains('\0') || json_contains_nul(value)),
        _ => false,
    }
}

impl log::Host for HostState {
    async fn log(&mut self, level: log::Level, message: String) {
        let budget = self.grant.limits.max_log_bytes;
        if self.log_bytes >= budget {
            if !self.log_truncated {
                self.log_truncated = true;
                tracing::warn!(
                    event_id = self.event_id,
                    route = %self.grant.route,
                    plugin = %self.grant.plugin,
                    "plugin log budget of {budget} bytes spent; further lines of this call dropped"
                );
            }
            return;
        }
        let room = budget - self.log_bytes;
        let mut message = message;
        if message.len() > room {
            let cut = (0..=room)
                .rev()
                .find(|i| message.is_char_boundary(*i))
                .unwrap_or(0);
            message.truncate(cut);
            message.push_str(" …[truncated]");
        }
        let message = without_control_characters(message);
        self.log_bytes += message.len();
        let (event_id, route, plugin) = (self.event_id, &self.grant.route, &self.grant.plugin);
        match level {
            log::Level::Trace => tracing::trace!(event_id, %route, %plugin, "{message}"),
            log::Level::Debug => tracing::debug!(event_id, %route, %plugin, "{message}"),
            log::Level::Info => tracing::info!(event_id, %route, %plugin, "{message}"),
            log::Level::Warn => tracing::warn!(event_id, %route, %plugin, "{message}"),
            log::Level::Error => tracing::error!(event_id, %route, %plugin, "{message}"),
        }
    }
}

/// A plugin's log line with control characters escaped (`\n` as `\\n`): in the text log
/// format a raw newline or terminal escape would let a plugin forge lines of the host's
/// log or garble the terminal reading it.
fn without_control_characters(message: String) -> String {
    if !message.chars().any(char::is_control) {
        return message;
    }
    let mut escaped = String::with_capacity(message.len() + 16);
    for c in message.chars() {
        if c.is_control() {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    escaped
}

impl config::Host for HostState {
    async fn get(&mut self, key: String) -> Option<String> {
        self.grant.config.get(&key).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_cannot_forge_other_lines() {
        assert_eq!(
            without_control_characters("ok\n2026-01-01 INFO forged\u{1b}[2J".into()),
            "ok\\n2026-01-01 INFO forged\\u{1b}[2J"
        );
        assert_eq!(without_control_characters("plain é".into()), "plain é");
    }

    #[test]
    fn nul_anywhere_in_emitted_data_is_found() {
        let nested = serde_json::json!({ "a": [1, { "b": "x\u{0}y" }] });
        assert!(json_contains_nul(&nested));
        assert!(json_contains_nul(&serde_json::json!({ "k\u{0}": 1 })));
        assert!(!json_contains_nul(&serde_json::json!({ "a": ["fine"] })));
    }
}
