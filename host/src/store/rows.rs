//! Decoding rows into model values, shared by both backends. Only timestamps are stored
//! differently (text on SQLite, `timestamptz` on Postgres); [`StoreRow`] hides that.

use chrono::{DateTime, Utc};

use super::batch::{DeliveryState, Recorded};
use super::fan_out::Candidate;
use super::{
    Attempt, AttemptOutcome, Backlog, ClaimedDelivery, Delivery, DeliveryStatus, Event, EventHead,
    EventStatus, Instance, LedgerEntry, Quarantine, StoreError, StoreResult,
};

pub(crate) trait StoreRow {
    fn text(&self, column: &str) -> StoreResult<String>;
    fn opt_text(&self, column: &str) -> StoreResult<Option<String>>;
    fn int(&self, column: &str) -> StoreResult<i64>;
    fn flag(&self, column: &str) -> StoreResult<bool>;
    fn time(&self, column: &str) -> StoreResult<DateTime<Utc>>;
    fn opt_time(&self, column: &str) -> StoreResult<Option<DateTime<Utc>>>;

    /// A text column for showing, never failing on what a producer wrote: on a database
    /// that stores any bytes (SQLite), bytes that are not UTF-8 are replaced (U+FFFD).
    /// Fan-out refuses such events (strict [`StoreRow::opt_text`]), so they never reach a
    /// plugin; this keeps them listable with their reason.
    fn shown_text(&self, column: &str) -> StoreResult<Option<String>> {
        self.opt_text(column)
    }

    fn int32(&self, column: &str) -> StoreResult<i32> {
        let value = self.int(column)?;
        i32::try_from(value)
            .map_err(|_| StoreError::Corrupt(format!("{column} = {value} does not fit in 32 bits")))
    }

    fn parsed<T>(&self, column: &str) -> StoreResult<T>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
    {
        let text = self.text(column)?;
        text.parse()
            .map_err(|err| StoreError::Corrupt(format!("{column}: {err}")))
    }
}

pub(crate) fn column_error(column: &str, err: sqlx::Error) -> StoreError {
    // sqlx's message repeats the column name; its source says what is wrong.
    let what = match err {
        sqlx::Error::ColumnDecode { source, .. } => source.to_string(),
        other => other.to_string(),
    };
    StoreError::Corrupt(format!("column {column}: {what}"))
}

/// A required text column as shown (see [`StoreRow::shown_text`]); NULL reads as empty.
fn shown(row: &impl StoreRow, column: &str) -> StoreResult<String> {
    Ok(row.shown_text(column)?.unwrap_or_default())
}

/// An event row. The producer's columns are read as shown, so one row holding bytes
/// that are not text does not make a whole listing (or claim) fail.
pub(crate) fn event(row: &impl StoreRow) -> StoreResult<Event> {
    Ok(Event {
        event_id: row.int("event_id")?,
        event_target: row.shown_text("event_target")?,
        event_type: shown(row, "event_type")?,
        entity_type: shown(row, "entity_type")?,
        entity_id: shown(row, "entity_id")?,
        event_data: row.shown_text("event_data")?,
        event_status: row.parsed::<EventStatus>("event_status")?,
        status_reason: row.opt_text("status_reason")?,
        idempotency_key: row.shown_text("idempotency_key")?,
        headers: row.shown_text("headers")?,
        // A producer may write anything into SQLite's created_at; fan-out has made such an
        // event DEAD, naming the value. Shown as the Unix epoch rather than hiding the row.
        created_at: row
            .time("created_at")
            .unwrap_or(DateTime::<Utc>::UNIX_EPOCH),
    })
}

pub(crate) fn delivery(row: &impl StoreRow) -> StoreResult<Delivery> {
    Ok(Delivery {
        delivery_id: row.int("delivery_id")?,
        event_id: row.int("event_id")?,
        route: row.text("route")?,
        status: row.parsed::<DeliveryStatus>("status")?,
        attempts: row.int32("attempts")?,
        ordered: row.flag("ordered")?,
        idempotency_key: row.text("idempotency_key")?,
        next_attempt_at: row.time("next_attempt_at")?,
        locked_by: row.opt_text("locked_by")?,
        locked_until: row.opt_time("locked_until")?,
        last_error: row.opt_text("last_error")?,
        updated_at: row.time("updated_at")?,
    })
}

pub(crate) fn attempt(row: &impl StoreRow) -> StoreResult<Attempt> {
    Ok(Attempt {
        attempt_id: row.int("attempt_id")?,
        delivery_id: row.int("delivery_id")?,
        event_id: row.int("event_id")?,
        route: row.text("route")?,
        attempt: row.int32("attempt")?,
        outcome: row.parsed::<AttemptOutcome>("outcome")?,
        detail: row.opt_text("detail")?,
        plugin_version: row.opt_text("plugin_version")?,
        instance: row.text("instance")?,
        started_at: row.time("started_at")?,
        duration_us: row.int("duration_us")?,
    })
}

/// The ledger columns of a claim row, prefixed `ledger_`; absent when the key is not done.
pub(crate) fn ledger(row: &impl StoreRow) -> StoreResult<Option<LedgerEntry>> {
    let Some(outcome) = row.opt_text("ledger_outcome")? else {
        return Ok(None);
    };
    Ok(Some(LedgerEntry {
        route: row.text("route")?,
        idempotency_key: row.text("idempotency_key")?,
        event_id: row.int("ledger_event_id")?,
        outcome: outcome
            .parse()
            .map_err(|err| StoreError::Corrupt(format!("ledger outcome: {err}")))?,
        detail: row.opt_text("ledger_detail")?,
        completed_at: row.time("ledger_completed_at")?,
    }))
}

/// Ledger entries by (route, key): how fan-out finds a started delivery's entry.
pub(crate) fn ledger_by_key(
    entries: impl IntoIterator<Item = LedgerEntry>,
) -> std::collections::HashMap<(String, String), LedgerEntry> {
    entries
        .into_iter()
        .map(|entry| ((entry.route.clone(), entry.idempotency_key.clone()), entry))
        .collect()
}

/// A claim row: the delivery's columns, the event's (its own key as `producer_key`, since
/// `idempotency_key` is the delivery's) and the ledger's.
pub(crate) fn claimed(row: &impl StoreRow) -> StoreResult<ClaimedDelivery> {
    let mut event = event(row)?;
    event.idempotency_key = row.opt_text("producer_key")?;
    Ok(ClaimedDelivery {
        delivery_id: row.int("delivery_id")?,
        route: row.text("route")?,
        attempt: row.int32("attempts")?,
        idempotency_key: row.text("idempotency_key")?,
        already_completed: ledger(row)?,
        event,
    })
}

pub(crate) fn instance(row: &impl StoreRow) -> StoreResult<Instance> {
    Ok(Instance {
        instance_id: row.text("instance_id")?,
        version: row.text("version")?,
        started_at: row.time("started_at")?,
        last_seen: row.time("last_seen")?,
        leases_held: row.int("leases_held")?,
    })
}

/// A row of [`super::QUARANTINED_SQL`].
pub(crate) fn quarantine(row: &impl StoreRow) -> StoreResult<Quarantine> {
    Ok(Quarantine {
        plugin: row.text("plugin")?,
        reason: row.text("reason")?,
        faults: row.int("faults")?,
        since: row.time("since")?,
    })
}

/// The row of a backlog query: `ready_events` and `waiting_retry`.
pub(crate) fn backlog(row: &impl StoreRow) -> StoreResult<Backlog> {
    let count = |column: &str| -> StoreResult<u64> {
        let value = row.int(column)?;
        u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("{column} = {value}")))
    };
    Ok(Backlog {
        ready_events: count("ready_events")?,
        waiting_retry: count("waiting_retry")?,
    })
}

/// A row of fan-out's read (see the backends' `take_candidates`). Only a broken
/// `event_id` fails: anything else a producer can get wrong in a row is recorded as a
/// problem of that event, which fan-out then settles as DEAD. Failing instead would
/// roll the whole pass back, and the next pass would meet the same row: a loop that
/// blocks every event behind it.
pub(crate) fn candidate(row: &impl StoreRow, max_event_bytes: u64) -> StoreResult<Candidate> {
    let event_id = row.int("event_id")?;
    let mut problems = Vec::new();
    let mut text = |column: &str, required: bool| match row.opt_text(column) {
        Ok(Some(text)) => Some(text),
        Ok(None) if required => {
            problems.push(format!("{column} is NULL"));
            None
        }
        Ok(None) => None,
        Err(err) => {
            problems.push(unreadable(err));
            None
        }
    };
    let event_type = text("event_type", true);
    let event_target = text("event_target", false);
    let entity_type = text("entity_type", true);
    let entity_id = text("entity_id", true);
    let idempotency_key = text("idempotency_key", false);
    let headers = text("headers", false);
    if let Some(problem) = headers.as_deref().and_then(headers_problem) {
        problems.push(problem);
    }
    let created_at = row.time("created_at").unwrap_or_else(|err| {
        problems.push(unreadable(err));
        DateTime::<Utc>::UNIX_EPOCH
    });
    if let Some(problem) = over_limit(row, "headers", max_event_bytes) {
        problems.push(problem);
    }
    // The payload is only read when it is within the limit (the query withholds it).
    let event_data = match over_limit(row, "event_data", max_event_bytes) {
        Some(problem) => Err(problem),
        None => row.opt_text("event_data").map_err(unreadable),
    };
    Ok(Candidate {
        head: EventHead {
            event_id,
            event_type: event_type.unwrap_or_default(),
            event_target,
            entity_type: entity_type.unwrap_or_default(),
            entity_id: entity_id.unwrap_or_default(),
        },
        event_data,
        idempotency_key,
        headers,
        created_at,
        problems,
    })
}

/// What a column that cannot be read says, for the event's `status_reason`.
fn unreadable(err: StoreError) -> String {
    match err {
        StoreError::Corrupt(what) => what,
        other => other.to_string(),
    }
}

/// Headers are a JSON object (or NULL/`null`: none). Anything else would reach the
/// plugin as no headers at all, silently losing `traceparent` or a tenant.
fn headers_problem(text: &str) -> Option<String> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(_) | serde_json::Value::Null) => None,
        Ok(other) => Some(format!(
            "headers is not a JSON object (found {})",
            json_kind(&other)
        )),
        Err(err) => Some(format!("headers is not valid JSON: {err}")),
    }
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The column's size (`<column>_bytes` in the row) against the limit.
fn over_limit(row: &impl StoreRow, column: &str, max_event_bytes: u64) -> Option<String> {
    let size_column = format!("{column}_bytes");
    match row.int(&size_column) {
        Ok(bytes) if u64::try_from(bytes).is_ok_and(|bytes| bytes > max_event_bytes) => {
            Some(format!(
                "{column} is {bytes} bytes, over the limit of {max_event_bytes} bytes \
                 ([dispatch] max_event_bytes)"
            ))
        }
        Ok(_) => None,
        Err(err) => Some(unreadable(err)),
    }
}

/// A closed delivery's row: what it is and, when it is its event's only delivery
/// (`alone`), its state, which settles the event.
pub(crate) fn closed(row: &impl StoreRow) -> StoreResult<(Recorded, Option<DeliveryState>)> {
    let recorded = Recorded {
        delivery_id: row.int("delivery_id")?,
        event_id: row.int("event_id")?,
        route: row.text("route")?,
        idempotency_key: row.text("idempotency_key")?,
    };
    let alone = if row.flag("alone")? {
        Some(delivery_state(row)?)
    } else {
        None
    };
    Ok((recorded, alone))
}

/// A row of `event_id, status, route, last_error` from `herald_deliveries`.
pub(crate) fn delivery_state(row: &impl StoreRow) -> StoreResult<DeliveryState> {
    Ok((
        row.int("event_id")?,
        row.parsed::<DeliveryStatus>("status")?,
        row.text("route")?,
        row.opt_text("last_error")?,
    ))
}
