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
    StoreError::Corrupt(format!("column {column}: {err}"))
}

pub(crate) fn event(row: &impl StoreRow) -> StoreResult<Event> {
    Ok(Event {
        event_id: row.int("event_id")?,
        event_target: row.opt_text("event_target")?,
        event_type: row.text("event_type")?,
        entity_type: row.text("entity_type")?,
        entity_id: row.text("entity_id")?,
        event_data: row.opt_text("event_data")?,
        event_status: row.parsed::<EventStatus>("event_status")?,
        status_reason: row.opt_text("status_reason")?,
        idempotency_key: row.opt_text("idempotency_key")?,
        headers: row.opt_text("headers")?,
        created_at: row.time("created_at")?,
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

/// The row of [`super::BACKLOG_SQL`].
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

pub(crate) fn candidate(row: &impl StoreRow) -> StoreResult<Candidate> {
    Ok(Candidate {
        head: EventHead {
            event_id: row.int("event_id")?,
            event_type: row.text("event_type")?,
            event_target: row.opt_text("event_target")?,
            entity_type: row.text("entity_type")?,
            entity_id: row.text("entity_id")?,
        },
        event_data: row.opt_text("event_data")?,
        idempotency_key: row.opt_text("idempotency_key")?,
    })
}

pub(crate) fn recorded(row: &impl StoreRow) -> StoreResult<Recorded> {
    Ok(Recorded {
        delivery_id: row.int("delivery_id")?,
        event_id: row.int("event_id")?,
        route: row.text("route")?,
        idempotency_key: row.text("idempotency_key")?,
    })
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
