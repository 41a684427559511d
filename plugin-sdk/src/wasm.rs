//! The component side: converts between the generated bindings and the SDK's types, and
//! serves the capabilities with the component's imports.

use crate::bindings::herald::plugin::{
    config, emit as wit_emit, http as wit_http, log as wit_log, types,
};
use crate::emit::{EmitError, NewEvent};
use crate::http::{HttpError, Request, Response};
use crate::log::Level;
use crate::{Event, Outcome, Plugin, PluginInfo};

/// The `describe` export of a [`Plugin`].
pub fn describe<P: Plugin>() -> types::PluginInfo {
    let PluginInfo {
        name,
        version,
        event_types,
        config_keys,
    } = P::describe();
    types::PluginInfo {
        name,
        version,
        event_types,
        config_keys: config_keys
            .into_iter()
            .map(|key| types::ConfigKey {
                name: key.name,
                required: key.required,
                secret: key.secret,
                description: key.description,
            })
            .collect(),
    }
}

/// The `handle` export of a [`Plugin`].
pub fn handle<P: Plugin>(event: types::Event) -> types::Outcome {
    let event = Event {
        id: event.id,
        event_type: event.event_type,
        target: event.target,
        entity_type: event.entity_type,
        entity_id: event.entity_id,
        raw_data: event.data,
        headers: event.headers,
        created_at_ms: event.created_at_ms,
        now_ms: event.now_ms,
        attempt: event.attempt,
        idempotency_key: event.idempotency_key,
        route: event.route,
    };
    match P::handle(event) {
        Outcome::Delivered { receipt } => types::Outcome::Delivered(receipt),
        Outcome::Retry { after, reason } => types::Outcome::Retry(types::RetryRequest {
            // Saturates: a delay beyond u64 milliseconds means "much later" anyway.
            after_ms: after.map(|after| u64::try_from(after.as_millis()).unwrap_or(u64::MAX)),
            reason,
        }),
        Outcome::Dead { reason } => types::Outcome::Dead(reason),
        Outcome::Skip { reason } => types::Outcome::Skip(reason),
    }
}

pub(crate) fn http_send(request: Request) -> Result<Response, HttpError> {
    let request = wit_http::Request {
        method: request.method,
        url: request.url,
        headers: request.headers,
        body: request.body,
        // Saturates: the host caps it to the route's limit anyway.
        timeout_ms: request
            .timeout
            .map(|timeout| u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX)),
    };
    match wit_http::send(&request) {
        Ok(response) => Ok(Response {
            status: response.status,
            headers: response.headers,
            body: response.body,
        }),
        Err(error) => Err(match error {
            wit_http::Error::Denied(why) => HttpError::Denied(why),
            wit_http::Error::InvalidRequest(why) => HttpError::InvalidRequest(why),
            wit_http::Error::Timeout => HttpError::Timeout,
            wit_http::Error::Connect(why) => HttpError::Connect(why),
            wit_http::Error::TooLarge(cap) => HttpError::TooLarge(cap),
            wit_http::Error::Other(why) => HttpError::Other(why),
        }),
    }
}

pub(crate) fn emit(event: NewEvent) -> Result<(), EmitError> {
    let event = wit_emit::NewEvent {
        event_type: event.event_type,
        entity_type: event.entity_type,
        entity_id: event.entity_id,
        data: event.data,
        target: event.target,
        idempotency_key: event.idempotency_key,
        headers: event.headers,
    };
    wit_emit::emit(&event).map_err(|error| match error {
        wit_emit::EmitError::Invalid(why) => EmitError::Invalid(why),
        wit_emit::EmitError::LimitReached(limit) => EmitError::LimitReached(limit),
    })
}

pub(crate) fn log(level: Level, message: &str) {
    let level = match level {
        Level::Trace => wit_log::Level::Trace,
        Level::Debug => wit_log::Level::Debug,
        Level::Info => wit_log::Level::Info,
        Level::Warn => wit_log::Level::Warn,
        Level::Error => wit_log::Level::Error,
    };
    wit_log::log(level, message);
}

pub(crate) fn config_get(key: &str) -> Option<String> {
    config::get(key)
}
