//! `saga-compensator`: when a step of a saga can't be delivered, emit the event that
//! undoes the steps before it (a refund for a capture, a release for a reservation).
//!
//! Route it to `herald.delivery.dead`, the event the host emits when a delivery goes
//! dead. Its data:
//!
//! ```json
//! {"event_id": 42, "event_type": "payment.capture", "entity_type": "payment",
//!  "entity_id": "p-1", "route": "psp", "reason": "HTTP 400: card expired",
//!  "data": {"amount_cents": 1250}}
//! ```
//!
//! # Config
//!
//! | key | | |
//! |---|---|---|
//! | `compensations` | required | a JSON object from the dead event's type to the compensation's type, e.g. `{"payment.capture": "payment.refund"}` |
//!
//! # What it emits
//!
//! For a dead `payment.capture` of payment `p-1`, a `payment.refund` of payment `p-1`
//! with data
//!
//! ```json
//! {"compensates": 42, "reason": "HTTP 400: card expired", "original": {"amount_cents": 1250}}
//! ```
//!
//! and the idempotency key `compensate:<event_id>:<compensation type>`: one event that
//! dies on several routes, or a redriven dead letter, is still compensated once. The
//! trace context (`traceparent`) of the dead-letter event is carried over.
//!
//! # Outcomes
//!
//! - not a `herald.delivery.dead` event, or no compensation for its type: skip;
//! - compensation emitted: delivered, receipt `emitted <type> for event <id>`;
//! - malformed dead-letter data, missing or malformed `compensations`, or the host
//!   refuses the emit: dead.

use std::collections::BTreeMap;

use herald_sdk::prelude::*;
use serde::Deserialize;
use serde_json::{json, Value};

/// The event type the host emits for a dead delivery.
pub const DEAD_EVENT_TYPE: &str = "herald.delivery.dead";

pub struct SagaCompensator;

impl Plugin for SagaCompensator {
    fn describe() -> PluginInfo {
        PluginInfo::new("saga-compensator", env!("CARGO_PKG_VERSION"))
            .event_type(DEAD_EVENT_TYPE)
            .config(ConfigKey::required(
                "compensations",
                r#"JSON object from event type to compensation event type, e.g. {"payment.capture": "payment.refund"}."#,
            ))
    }

    fn handle(event: Event) -> Outcome {
        if event.event_type != DEAD_EVENT_TYPE {
            return Outcome::skip(format!("not a `{DEAD_EVENT_TYPE}` event"));
        }
        let compensations = match compensations_from_config() {
            Ok(compensations) => compensations,
            Err(reason) => return Outcome::dead(reason),
        };
        let dead: DeadDelivery = match event.data() {
            Ok(dead) => dead,
            Err(err) => return Outcome::dead(format!("not a `{DEAD_EVENT_TYPE}` payload: {err}")),
        };
        let Some(compensation_type) = compensations.get(&dead.event_type) else {
            return Outcome::skip(format!("no compensation for `{}`", dead.event_type));
        };

        let mut compensation = NewEvent::new(compensation_type, &dead.entity_type, &dead.entity_id)
            .data(json!({
                "compensates": dead.event_id,
                "reason": dead.reason,
                "original": dead.data,
            }))
            .idempotency_key(format!("compensate:{}:{compensation_type}", dead.event_id));
        if let Some(traceparent) = event.header("traceparent") {
            compensation = compensation.header("traceparent", traceparent);
        }
        match emit::emit(compensation) {
            Ok(()) => Outcome::delivered_with(format!(
                "emitted {compensation_type} for event {}",
                dead.event_id
            )),
            Err(err) => Outcome::dead(format!("emitting `{compensation_type}`: {err}")),
        }
    }
}

herald_sdk::export_plugin!(SagaCompensator);

/// The data of a `herald.delivery.dead` event. Other fields (such as `route`) are
/// ignored.
#[derive(Debug, Deserialize)]
struct DeadDelivery {
    event_id: i64,
    event_type: String,
    entity_type: String,
    entity_id: String,
    reason: String,
    /// The dead event's payload; `null` if the host left it out.
    #[serde(default)]
    data: Value,
}

fn compensations_from_config() -> Result<BTreeMap<String, String>, String> {
    match config::json::<BTreeMap<String, String>>("compensations") {
        Ok(Some(compensations)) => Ok(compensations),
        Ok(None) => Err(config::ConfigError::Missing("compensations".into()).to_string()),
        Err(err) => Err(err.to_string()),
    }
}
