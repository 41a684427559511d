//! `upcaster`: re-emits events of an old schema in the new one, so consumers only ever
//! see the new shape while old producers are still being upgraded.
//!
//! # Config
//!
//! | key | | |
//! |---|---|---|
//! | `from` | required | the old event type, e.g. `order.created.v1` |
//! | `to` | required | the new event type, e.g. `order.created.v2` |
//!
//! # Transformation
//!
//! v1 keeps the order total in integer cents beside a currency; v2 groups them into a
//! `total` with an exact decimal string (no floats for money) and says which schema it
//! is:
//!
//! ```json
//! {"amount_cents": 1250, "currency": "EUR", "customer": "c-7"}
//! ```
//! becomes
//! ```json
//! {"total": {"amount": "12.50", "currency": "EUR"}, "schema": 2, "customer": "c-7"}
//! ```
//!
//! Every other field is carried over unchanged. `amount_cents` must be an integer
//! (negative for credits: `-5` becomes `"-0.05"`), `currency` an ISO 4217 code (three
//! capital letters).
//!
//! The new event is about the same entity, has the same target and headers, and the
//! idempotency key `upcast:<delivery key>`, so a redriven v1 event does not produce a
//! second v2 event.
//!
//! # Outcomes
//!
//! - event type is not `from`: skip;
//! - data is not a v1 payload (missing or mistyped field, bad currency, already has
//!   `total` or `schema`): dead, with serde's error as reason; the data will not change
//!   on a retry;
//! - v2 event emitted: delivered, receipt `emitted <to>`;
//! - the host refuses the emit, or `from`/`to` are missing or equal: dead.

use herald_sdk::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub struct Upcaster;

impl Plugin for Upcaster {
    fn describe() -> PluginInfo {
        PluginInfo::new("upcaster", env!("CARGO_PKG_VERSION"))
            .event_type("*")
            .config(ConfigKey::required(
                "from",
                "The old event type to upcast, e.g. order.created.v1.",
            ))
            .config(ConfigKey::required(
                "to",
                "The new event type to emit, e.g. order.created.v2.",
            ))
    }

    fn handle(event: Event) -> Outcome {
        let (from, to) = match types_from_config() {
            Ok(types) => types,
            Err(reason) => return Outcome::dead(reason),
        };
        if event.event_type != from {
            return Outcome::skip(format!("not a `{from}` event"));
        }
        let v1: OrderV1 = match event.data() {
            Ok(v1) => v1,
            Err(err) => return Outcome::dead(format!("not a `{from}` payload: {err}")),
        };
        let v2 = match upcast(v1) {
            Ok(v2) => v2,
            Err(why) => return Outcome::dead(format!("not a `{from}` payload: {why}")),
        };

        let mut upcast_event = NewEvent::new(&to, &event.entity_type, &event.entity_id)
            .data(v2)
            .idempotency_key(format!("upcast:{}", event.idempotency_key));
        upcast_event.target = event.target.clone();
        upcast_event.headers = event.headers.clone();
        match emit::emit(upcast_event) {
            Ok(()) => Outcome::delivered_with(format!("emitted {to}")),
            Err(err) => Outcome::dead(format!("emitting `{to}`: {err}")),
        }
    }
}

herald_sdk::export_plugin!(Upcaster);

fn types_from_config() -> Result<(String, String), String> {
    let from = config::require("from").map_err(|err| err.to_string())?;
    let to = config::require("to").map_err(|err| err.to_string())?;
    if from == to {
        // The upcast event would be routed back here, forever.
        return Err(format!("config keys `from` and `to` are both `{from}`"));
    }
    Ok((from, to))
}

/// The old shape. Unknown fields are kept in `rest`.
#[derive(Debug, Deserialize)]
pub struct OrderV1 {
    pub amount_cents: i64,
    pub currency: String,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// The new shape.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct OrderV2 {
    pub total: Money,
    pub schema: u32,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Money {
    /// A decimal string with two places, e.g. `12.50`.
    pub amount: String,
    pub currency: String,
}

/// v1 → v2, or why the payload is not really v1.
pub fn upcast(v1: OrderV1) -> Result<OrderV2, String> {
    let OrderV1 {
        amount_cents,
        currency,
        rest,
    } = v1;
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "`currency` must be an ISO 4217 code such as EUR, not {currency:?}"
        ));
    }
    // Overwriting these would lose data: such a payload is a v2 (or something else)
    // mislabelled as v1.
    if let Some(field) = ["total", "schema"]
        .into_iter()
        .find(|f| rest.contains_key(*f))
    {
        return Err(format!("it already has a `{field}` field"));
    }
    Ok(OrderV2 {
        total: Money {
            amount: decimal_from_cents(amount_cents),
            currency,
        },
        schema: 2,
        rest,
    })
}

/// `1250` → `12.50`, `-5` → `-0.05`: exact, whatever the size.
fn decimal_from_cents(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}

#[cfg(test)]
mod tests {
    use super::decimal_from_cents;

    #[test]
    fn formats_cents_exactly() {
        assert_eq!(decimal_from_cents(1250), "12.50");
        assert_eq!(decimal_from_cents(0), "0.00");
        assert_eq!(decimal_from_cents(7), "0.07");
        assert_eq!(decimal_from_cents(-5), "-0.05");
        assert_eq!(decimal_from_cents(i64::MIN), "-92233720368547758.08");
    }
}
