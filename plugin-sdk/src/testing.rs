//! Run a plugin natively, in `cargo test`, against scripted capabilities.
//!
//! ```
//! use herald_sdk::prelude::*;
//! use herald_sdk::testing::{event, Harness};
//!
//! struct Ping;
//! impl Plugin for Ping {
//!     fn describe() -> PluginInfo {
//!         PluginInfo::new("ping", "0.1.0")
//!     }
//!     fn handle(_event: Event) -> Outcome {
//!         let Some(url) = config::get("url") else {
//!             return Outcome::dead("no url");
//!         };
//!         match http::send(Request::post(url)) {
//!             Ok(response) => Outcome::delivered_with(format!("HTTP {}", response.status)),
//!             Err(err) => Outcome::retry(err.to_string()),
//!         }
//!     }
//! }
//!
//! let run = Harness::new()
//!     .config("url", "https://example.com/ping")
//!     .respond(Response::new(204))
//!     .run::<Ping>(event("order.created").entity("order", "o-1").build());
//! assert_eq!(run.outcome, Outcome::delivered_with("HTTP 204"));
//! assert_eq!(run.requests[0].url, "https://example.com/ping");
//! ```
//!
//! The harness is thread-local, so tests run in parallel without seeing each other.
//! It does not discard emitted events on outcomes other than `delivered` as the host
//! does: [`Run::emitted`] shows everything the plugin tried to emit.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

use crate::emit::{EmitError, NewEvent};
use crate::http::{HttpError, Request, Response};
use crate::log::Level;
use crate::{Event, Outcome, Plugin};

/// The scripted host for one [`Harness::run`]: config, HTTP answers, emit limit.
#[derive(Debug, Default)]
pub struct Harness {
    state: State,
}

impl Harness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a key of the route's config.
    pub fn config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.state.config.insert(key.into(), value.into());
        self
    }

    /// Answers the next `http::send` with this response. Answers are used in the order
    /// they were given; a send with none left gets [`HttpError::Other`].
    pub fn respond(mut self, response: Response) -> Self {
        self.state.responses.push_back(Ok(response));
        self
    }

    /// Answers the next `http::send` with this error, e.g. [`HttpError::Timeout`].
    pub fn respond_error(mut self, error: HttpError) -> Self {
        self.state.responses.push_back(Err(error));
        self
    }

    /// Refuses emits beyond `limit` per run with [`EmitError::LimitReached`], as the
    /// host does. Unlimited by default.
    pub fn emit_limit(mut self, limit: u32) -> Self {
        self.state.emit_limit = Some(limit);
        self
    }

    /// Calls `P::handle(event)` with this harness as its host and returns what happened.
    pub fn run<P: Plugin>(self, event: Event) -> Run {
        let previous = STATE.with(|current| current.replace(Some(self.state)));
        // Restores the previous state even if the plugin panics, so one failing test
        // leaves nothing behind on its thread.
        let restore = Restore(previous);
        let outcome = P::handle(event);
        let state = STATE
            .with(|current| current.borrow_mut().take())
            .unwrap_or_default();
        drop(restore);
        Run {
            outcome,
            requests: state.requests,
            emitted: state.emitted,
            logs: state.logs,
        }
    }
}

/// What one [`Harness::run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub outcome: Outcome,
    /// Every request passed to `http::send`, in order.
    pub requests: Vec<Request>,
    /// Every event the host accepted from `emit::emit`, in order.
    pub emitted: Vec<NewEvent>,
    pub logs: Vec<(Level, String)>,
}

/// Starts a test event of this type; see [`EventBuilder`] for the defaults.
pub fn event(event_type: impl Into<String>) -> EventBuilder {
    EventBuilder {
        event: Event {
            id: 1,
            event_type: event_type.into(),
            target: None,
            entity_type: "test".into(),
            entity_id: "1".into(),
            raw_data: "{}".into(),
            headers: Vec::new(),
            created_at_ms: 1_700_000_000_000,
            now_ms: 1_700_000_001_000,
            attempt: 1,
            idempotency_key: String::new(),
            route: "test-route".into(),
        },
        idempotency_key: None,
    }
}

/// A test [`Event`]. Defaults: id 1, entity `test`/`1`, data `{}`, no target or headers,
/// created at 2023-11-14T22:13:20Z and attempted one second later, attempt 1, route
/// `test-route`, idempotency key `<route>:<id>`.
#[derive(Debug, Clone)]
pub struct EventBuilder {
    event: Event,
    idempotency_key: Option<String>,
}

impl EventBuilder {
    pub fn id(mut self, id: i64) -> Self {
        self.event.id = id;
        self
    }

    pub fn entity(mut self, entity_type: impl Into<String>, entity_id: impl Into<String>) -> Self {
        self.event.entity_type = entity_type.into();
        self.event.entity_id = entity_id.into();
        self
    }

    /// Sets the payload from anything serializable, typically `json!({...})`.
    ///
    /// # Panics
    ///
    /// If `value` does not serialize to JSON: a mistake in the test itself.
    pub fn data(mut self, value: impl Serialize) -> Self {
        self.event.raw_data =
            serde_json::to_string(&value).expect("test event data must serialize to JSON");
        self
    }

    /// Sets the payload text as is, e.g. to test data that is not JSON.
    pub fn raw_data(mut self, text: impl Into<String>) -> Self {
        self.event.raw_data = text.into();
        self
    }

    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.event.target = Some(target.into());
        self
    }

    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.event.headers.push((name.into(), value.into()));
        self
    }

    pub fn created_at_ms(mut self, ms: i64) -> Self {
        self.event.created_at_ms = ms;
        self
    }

    pub fn now_ms(mut self, ms: i64) -> Self {
        self.event.now_ms = ms;
        self
    }

    pub fn attempt(mut self, attempt: u32) -> Self {
        self.event.attempt = attempt;
        self
    }

    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    pub fn route(mut self, route: impl Into<String>) -> Self {
        self.event.route = route.into();
        self
    }

    pub fn build(self) -> Event {
        let mut event = self.event;
        event.idempotency_key = self
            .idempotency_key
            .unwrap_or_else(|| format!("{}:{}", event.route, event.id));
        event
    }
}

#[derive(Debug, Default)]
struct State {
    config: BTreeMap<String, String>,
    responses: VecDeque<Result<Response, HttpError>>,
    emit_limit: Option<u32>,
    requests: Vec<Request>,
    emitted: Vec<NewEvent>,
    logs: Vec<(Level, String)>,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

struct Restore(Option<State>);

impl Drop for Restore {
    fn drop(&mut self) {
        let previous = self.0.take();
        STATE.with(|current| *current.borrow_mut() = previous);
    }
}

const NO_HARNESS: &str =
    "no Herald host here: natively, run the plugin with herald_sdk::testing::Harness";

/// The capabilities as seen natively: served by the current thread's harness.
pub(crate) mod backend {
    use super::*;

    fn with_state<R>(f: impl FnOnce(&mut State) -> R) -> Option<R> {
        STATE.with(|current| current.borrow_mut().as_mut().map(f))
    }

    pub(crate) fn http_send(request: Request) -> Result<Response, HttpError> {
        with_state(|state| {
            let summary = format!("{} {}", request.method, request.url);
            state.requests.push(request);
            state.responses.pop_front().unwrap_or_else(|| {
                Err(HttpError::Other(format!(
                    "test harness: no scripted response left for {summary}"
                )))
            })
        })
        .unwrap_or_else(|| Err(HttpError::Other(NO_HARNESS.into())))
    }

    pub(crate) fn emit(event: NewEvent) -> Result<(), EmitError> {
        with_state(|state| {
            if let Some(limit) = state.emit_limit {
                if state.emitted.len() >= limit as usize {
                    return Err(EmitError::LimitReached(limit));
                }
            }
            if let Err(err) = serde_json::from_str::<serde_json::Value>(&event.data) {
                return Err(EmitError::Invalid(format!("data is not JSON: {err}")));
            }
            state.emitted.push(event);
            Ok(())
        })
        .unwrap_or_else(|| Err(EmitError::Invalid(NO_HARNESS.into())))
    }

    pub(crate) fn log(level: Level, message: &str) {
        // Also on stderr, which `cargo test` shows for failing tests.
        eprintln!("[{level}] {message}");
        with_state(|state| state.logs.push((level, message.to_owned())));
    }

    pub(crate) fn config_get(key: &str) -> Option<String> {
        with_state(|state| state.config.get(key).cloned()).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config, emit, http, log};
    use serde_json::json;

    struct Everything;

    impl Plugin for Everything {
        fn describe() -> crate::PluginInfo {
            crate::PluginInfo::new("everything", "0")
        }

        fn handle(event: Event) -> Outcome {
            log::info(format!("handling {}", event.id));
            let first = http::send(Request::post("https://a.example").json(json!({"n": 1})));
            let second = http::send(Request::get("https://b.example"));
            let third = http::send(Request::get("https://c.example"));
            let emitted = emit::emit(NewEvent::same_entity_as(&event, "x.done"));
            let again = emit::emit(NewEvent::same_entity_as(&event, "x.again"));
            Outcome::skip(format!(
                "{:?} | {:?} | {:?} | {:?} | {:?} | {:?}",
                first.map(|r| r.status),
                second.map(|r| r.status),
                third.map(|r| r.status),
                emitted,
                again,
                config::get("k"),
            ))
        }
    }

    #[test]
    fn scripts_and_records_every_capability() {
        let run = Harness::new()
            .config("k", "v")
            .respond(Response::new(200))
            .respond_error(HttpError::Timeout)
            .emit_limit(1)
            .run::<Everything>(
                event("x.created")
                    .entity("x", "7")
                    .header("traceparent", "00-t-s-01")
                    .build(),
            );
        assert_eq!(
            run.outcome.reason(),
            Some(
                "Ok(200) | Err(Timeout) | Err(Other(\"test harness: no scripted response left \
                 for GET https://c.example\")) | Ok(()) | Err(LimitReached(1)) | Some(\"v\")"
            )
        );
        assert_eq!(run.requests.len(), 3);
        assert_eq!(run.requests[0].body_text(), r#"{"n":1}"#);
        assert_eq!(
            run.requests[0].get_header("content-type"),
            Some("application/json")
        );
        assert_eq!(run.emitted.len(), 1);
        assert_eq!(run.emitted[0].entity_id, "7");
        assert_eq!(
            run.emitted[0].headers,
            vec![("traceparent".to_owned(), "00-t-s-01".to_owned())]
        );
        assert_eq!(run.logs, vec![(Level::Info, "handling 1".to_owned())]);
    }

    #[test]
    fn without_a_harness_capabilities_fail_softly() {
        assert!(matches!(
            http::send(Request::get("https://a.example")),
            Err(HttpError::Other(_))
        ));
        assert!(config::get("k").is_none());
        assert!(emit::emit(NewEvent::new("t", "e", "1")).is_err());
        // And a run leaves nothing behind.
        let _ = Harness::new()
            .config("k", "v")
            .run::<Everything>(event("x").build());
        assert!(config::get("k").is_none());
    }

    #[test]
    fn builds_events_with_defaults() {
        let event = event("order.created").id(9).route("r").build();
        assert_eq!(event.idempotency_key, "r:9");
        assert_eq!(event.attempt, 1);
        assert_eq!(event.data_json(), json!({}));
        assert_eq!(event.created_at_rfc3339(), "2023-11-14T22:13:20.000Z");
    }

    #[test]
    fn typed_data_and_errors() {
        #[derive(serde::Deserialize, Debug)]
        struct Order {
            #[allow(dead_code)]
            total: u32,
        }
        let good = event("o").data(json!({"total": 3})).build();
        assert!(good.data::<Order>().is_ok());
        let bad = event("o").data(json!({"sum": 3})).build();
        let err = bad.data::<Order>().unwrap_err();
        assert!(err.to_string().contains("missing field `total`"), "{err}");
        let not_json = event("o").raw_data("nope").build();
        assert_eq!(not_json.data_json(), json!("nope"));
    }

    #[test]
    fn unserializable_bodies_are_reported_by_send() {
        let mut map = std::collections::HashMap::new();
        map.insert(vec![1u8], 1);
        let result = http::send(Request::post("https://a.example").json(&map));
        assert!(matches!(result, Err(HttpError::InvalidRequest(_))));
    }
}
