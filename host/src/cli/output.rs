//! Rendering for people (compact tables) and for scripts (JSON from the model's serde
//! impls, with stored JSON text embedded as JSON), and writing it to stdout.

use std::io::Write;

use chrono::{DateTime, Utc};
use comfy_table::{Cell, Table};
use serde::Serialize;
use serde_json::Value;

use crate::store::{Attempt, Delivery, Event, EventDetail};

/// How much of a payload a list row shows.
const DATA_PREVIEW_CHARS: usize = 40;
/// How much of an error or receipt a delivery or attempt row shows.
const DETAIL_PREVIEW_CHARS: usize = 60;

/// Plain columns with a rule under the header.
const TABLE_STYLE: &str = "     ─             ";

/// Pretty JSON plus a newline.
pub fn json(value: &impl Serialize) -> anyhow::Result<String> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    Ok(text)
}

/// Write to stdout; a reader that went away (`| head`) is not an error.
pub fn print(text: &str) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// An event for scripts (see [`Event::to_json`]).
pub fn event_json(event: &Event) -> anyhow::Result<Value> {
    Ok(event.to_json()?)
}

pub fn events_json(events: &[Event]) -> anyhow::Result<Value> {
    events
        .iter()
        .map(event_json)
        .collect::<anyhow::Result<Vec<_>>>()
        .map(Value::Array)
}

pub fn detail_json(detail: &EventDetail) -> anyhow::Result<Value> {
    Ok(detail.to_json()?)
}

/// Events as a table, one row each, with a payload preview.
pub fn events_table(events: &[Event]) -> String {
    if events.is_empty() {
        return "no events\n".to_string();
    }
    let mut table = new_table([
        "ID", "STATUS", "TYPE", "ENTITY", "TARGET", "CREATED", "DATA",
    ]);
    for event in events {
        table.add_row([
            event.event_id.to_string(),
            event.event_status.to_string(),
            event.event_type.clone(),
            entity(event),
            or_dash(event.event_target.as_deref()),
            timestamp(event.created_at),
            preview(
                &compact_data(event.event_data.as_deref()),
                DATA_PREVIEW_CHARS,
            ),
        ]);
    }
    finish(&table)
}

/// One event in full, then its deliveries and attempts.
pub fn detail_text(detail: &EventDetail) -> String {
    let event = &detail.event;
    let mut fields = Table::new();
    fields.load_preset(comfy_table::presets::NOTHING);
    let rows: [(&str, String); 10] = [
        ("id", event.event_id.to_string()),
        ("status", event.event_status.to_string()),
        ("reason", or_dash(event.status_reason.as_deref())),
        ("type", event.event_type.clone()),
        ("entity", entity(event)),
        ("target", or_dash(event.event_target.as_deref())),
        ("key", or_dash(event.idempotency_key.as_deref())),
        ("created", timestamp(event.created_at)),
        ("headers", compact_data(event.headers.as_deref())),
        ("data", pretty_data(event.event_data.as_deref())),
    ];
    for (name, value) in rows {
        fields.add_row([Cell::new(name), Cell::new(value)]);
    }
    let mut text = format!("event {}\n{}\n", event.event_id, fields.trim_fmt());

    text.push_str(&format!("\ndeliveries: {}\n", detail.deliveries.len()));
    if !detail.deliveries.is_empty() {
        text.push_str(&deliveries_table(&detail.deliveries));
    }
    text.push_str(&format!("\nattempts: {}\n", detail.attempts.len()));
    if !detail.attempts.is_empty() {
        text.push_str(&attempts_table(&detail.attempts));
    }
    text
}

pub fn deliveries_table(deliveries: &[Delivery]) -> String {
    let mut table = new_table([
        "ID",
        "ROUTE",
        "STATUS",
        "ATTEMPTS",
        "NEXT",
        "LEASE",
        "LAST ERROR",
    ]);
    for delivery in deliveries {
        let lease = match (&delivery.locked_by, delivery.locked_until) {
            (Some(owner), Some(until)) => format!("{owner} until {}", timestamp(until)),
            (Some(owner), None) => owner.clone(),
            _ => "-".to_string(),
        };
        table.add_row([
            delivery.delivery_id.to_string(),
            delivery.route.clone(),
            delivery.status.to_string(),
            delivery.attempts.to_string(),
            timestamp(delivery.next_attempt_at),
            lease,
            preview(
                &or_dash(delivery.last_error.as_deref()),
                DETAIL_PREVIEW_CHARS,
            ),
        ]);
    }
    finish(&table)
}

fn attempts_table(attempts: &[Attempt]) -> String {
    let mut table = new_table([
        "#", "ROUTE", "OUTCOME", "STARTED", "TOOK", "PLUGIN", "DETAIL",
    ]);
    for attempt in attempts {
        table.add_row([
            attempt.attempt.to_string(),
            attempt.route.clone(),
            attempt.outcome.to_string(),
            timestamp(attempt.started_at),
            duration(attempt.duration_us),
            preview(&or_dash(attempt.plugin_version.as_deref()), 16),
            preview(&or_dash(attempt.detail.as_deref()), DETAIL_PREVIEW_CHARS),
        ]);
    }
    finish(&table)
}

pub fn new_table<const N: usize>(header: [&str; N]) -> Table {
    let mut table = Table::new();
    table.load_preset(TABLE_STYLE).set_header(header);
    table
}

pub fn finish(table: &Table) -> String {
    let mut text = table.trim_fmt();
    text.push('\n');
    text
}

fn entity(event: &Event) -> String {
    format!("{}/{}", event.entity_type, event.entity_id)
}

fn or_dash(value: Option<&str>) -> String {
    value.unwrap_or("-").to_string()
}

pub fn timestamp(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%SZ").to_string()
}

fn duration(micros: i64) -> String {
    if micros >= 1_000_000 {
        format!("{:.1}s", micros as f64 / 1e6)
    } else if micros >= 1_000 {
        format!("{:.1}ms", micros as f64 / 1e3)
    } else {
        format!("{micros}µs")
    }
}

/// Stored JSON text on one line; text that is not JSON is shown as it is, on one line.
fn compact_data(text: Option<&str>) -> String {
    match text {
        None => "NULL".to_string(),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(value) => value.to_string(),
            Err(_) => text.split_whitespace().collect::<Vec<_>>().join(" "),
        },
    }
}

fn pretty_data(text: Option<&str>) -> String {
    match text {
        None => "NULL".to_string(),
        Some(text) => serde_json::from_str::<Value>(text)
            .ok()
            .and_then(|value| serde_json::to_string_pretty(&value).ok())
            .unwrap_or_else(|| format!("{text}  (not valid JSON)")),
    }
}

/// At most `max` characters, with an ellipsis when cut.
fn preview(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_cut_on_characters() {
        assert_eq!(preview("héllo", 5), "héllo");
        assert_eq!(preview("héllo wörld", 6), "héllo…");
    }

    #[test]
    fn stored_json_is_compacted_and_other_text_kept() {
        assert_eq!(compact_data(Some("{ \"a\" :\n 1 }")), "{\"a\":1}");
        assert_eq!(compact_data(Some("not\njson")), "not json");
        assert_eq!(compact_data(None), "NULL");
    }

    #[test]
    fn durations_pick_a_readable_unit() {
        assert_eq!(duration(250), "250µs");
        assert_eq!(duration(1_500), "1.5ms");
        assert_eq!(duration(2_000_000), "2.0s");
    }
}
