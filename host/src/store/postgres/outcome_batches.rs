//! The record side of the batch ledger (migration 0013): the claim items an outcome
//! transaction closes at their first attempt as delivered or skipped are written as one
//! `herald_outcome_batches` row, instead of a delivery row's update and an attempt row
//! each. Everything else the transaction records (keys, events' status, emitted events)
//! is written as for any delivery.

use std::collections::HashSet;

use sqlx::postgres::PgConnection;

use super::claims::HeldItem;
use super::QueryContext;
use crate::store::batch::{self, Recorded};
use crate::store::fan_out::settle_from_deliveries;
use crate::store::{Completion, EventStatus, StoreResult};

pub const INSERT_OUTCOME_BATCH: &str =
    "INSERT INTO herald_outcome_batches (instance, event_range, \
       delivery_ids, event_ids, routes, ordered, idempotency_keys, outcomes, details, \
       plugin_versions, leased_at, started_at, duration_us) \
     VALUES ($1, int8range($2, $3, '[]'), $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)";

/// Settle the events of items closed at their first attempt, only those still open: their
/// event READY and no delivery row under their id. Returns the open ones' delivery ids. An
/// item that became a row (given back, failed over, recovered) goes on as that row, and an
/// outcome recorded once is not recorded again. It runs after
/// [`super::claims::LOCK_CLAIMS`], as a statement of its own: a statement that waited for a
/// claim's lock reads that claim as it is now but every other table as it was when the
/// statement began, and would miss a row the transaction it waited for had made. The
/// event's row is read as it is once locked, so an event another transaction settled
/// meanwhile is not READY here. "No row under its id" is asked of the event (no delivery
/// row of it under any of these ids): an item is its event's only delivery, so the two are
/// the same, and asked of the items it lowered their estimate until the generic plan
/// joined them to the events by a nested loop, quadratic in the batch
/// (docs/benchmarks-history.md, the twenty-third refresh). Parameters: event ids,
/// statuses, reasons, delivery ids.
pub const SETTLE_OPEN_ITEMS: &str =
    "UPDATE events e SET event_status = u.status, status_reason = u.reason \
     FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[]) \
       AS u(id, status, reason, delivery_id) \
     WHERE e.event_id = u.id AND e.event_id = ANY($1) AND e.event_status = 'READY' \
       AND NOT (e.event_id = ANY (ARRAY(SELECT d.event_id FROM herald_deliveries d \
         WHERE d.delivery_id = ANY($4)))) \
     RETURNING u.delivery_id";

/// An event's deliveries in both shapes, as `herald_deliveries` rows read: rows and open
/// items through migration 0013's view, whose branches the event's id reaches; the batch
/// entries through the index of the batches' event ranges, which the view cannot use.
pub const EVENT_DELIVERIES: &str = "SELECT * FROM herald_open_delivery_records \
       WHERE event_id = $1 \
     UNION ALL \
     SELECT u.delivery_id, u.event_id, u.route, \
       CASE u.outcome WHEN 'DELIVERED' THEN 'SUCCESS' ELSE u.outcome END, 1, u.ordered, \
       u.key, b.recorded_at, NULL, NULL, NULL, b.recorded_at \
     FROM herald_outcome_batches b CROSS JOIN LATERAL \
       unnest(b.delivery_ids, b.event_ids, b.routes, b.ordered, b.idempotency_keys, \
         b.outcomes) AS u(delivery_id, event_id, route, ordered, key, outcome) \
     WHERE b.event_range @> $1::bigint AND u.event_id = $1 \
     ORDER BY delivery_id";

/// An event's attempts in both shapes (a batch entry is its delivery's one attempt, with
/// the attempt id migration 0013's `herald_outcome_entries` gives it), in attempt order.
pub const EVENT_ATTEMPTS: &str = "SELECT * FROM herald_attempts WHERE delivery_id IN (\
       SELECT delivery_id FROM herald_deliveries WHERE event_id = $1) \
     UNION ALL \
     SELECT b.batch_id * 1048576 + u.n - 1 - 4611686018427387904, u.delivery_id, \
       u.event_id, u.route, 1, u.outcome, u.detail, u.plugin_version, b.instance, \
       u.started_at, u.duration_us, b.recorded_at \
     FROM herald_outcome_batches b CROSS JOIN LATERAL \
       unnest(b.delivery_ids, b.event_ids, b.routes, b.outcomes, b.details, \
         b.plugin_versions, b.started_at, b.duration_us) WITH ORDINALITY \
       AS u(delivery_id, event_id, route, outcome, detail, plugin_version, started_at, \
         duration_us, n) \
     WHERE b.event_range @> $1::bigint AND u.event_id = $1 \
     ORDER BY attempt_id";

/// Settle the events of `closed` (first attempts on held items, each delivered or
/// skipped) that are still open, and return those items' delivery ids
/// ([`SETTLE_OPEN_ITEMS`]). Each item is its event's only delivery: its outcome settles the
/// event.
pub(crate) async fn settle_open(
    conn: &mut PgConnection,
    closed: &[(&Completion, &HeldItem)],
) -> StoreResult<HashSet<i64>> {
    if closed.is_empty() {
        return Ok(HashSet::new());
    }
    let settlements: Vec<(EventStatus, Option<String>)> = closed
        .iter()
        .map(|(c, item)| {
            settle_from_deliveries(&[(c.outcome.delivery_status(), item.route.clone(), None)])
        })
        .collect();
    let open: Vec<i64> = sqlx::query_scalar(SETTLE_OPEN_ITEMS)
        .bind(closed.iter().map(|(_, i)| i.event_id).collect::<Vec<_>>())
        .bind(
            settlements
                .iter()
                .map(|(status, _)| status.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            settlements
                .iter()
                .map(|(_, reason)| reason.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            closed
                .iter()
                .map(|(c, _)| c.delivery_id)
                .collect::<Vec<_>>(),
        )
        .fetch_all(conn)
        .await
        .doing("settling the events of completed items")?;
    Ok(open.into_iter().collect())
}

/// Record `closed` (open items, settled by [`settle_open`]) as one batch row and their keys
/// in the idempotency ledger.
pub(crate) async fn record(
    conn: &mut PgConnection,
    closed: &[(&Completion, &HeldItem)],
) -> StoreResult<()> {
    let Some((first, _)) = closed.first() else {
        return Ok(());
    };
    let events = || closed.iter().map(|(_, item)| item.event_id);
    let (lowest, highest) = (
        events().min().unwrap_or_default(),
        events().max().unwrap_or_default(),
    );
    let texts = |f: for<'a> fn(&'a Completion, &'a HeldItem) -> Option<&'a str>| {
        closed.iter().map(|(c, i)| f(c, i)).collect::<Vec<_>>()
    };
    sqlx::query(INSERT_OUTCOME_BATCH)
        .bind(&first.owner)
        .bind(lowest)
        .bind(highest)
        .bind(
            closed
                .iter()
                .map(|(c, _)| c.delivery_id)
                .collect::<Vec<_>>(),
        )
        .bind(events().collect::<Vec<_>>())
        .bind(texts(|_, i| Some(i.route.as_str())))
        .bind(closed.iter().map(|(_, i)| i.ordered).collect::<Vec<_>>())
        .bind(texts(|_, i| Some(i.idempotency_key.as_str())))
        .bind(texts(|c, _| Some(c.outcome.attempt_outcome().as_str())))
        .bind(texts(|c, _| c.outcome.detail()))
        .bind(texts(|c, _| c.plugin_version.as_deref()))
        .bind(closed.iter().map(|(_, i)| i.leased_at).collect::<Vec<_>>())
        .bind(closed.iter().map(|(c, _)| c.started_at).collect::<Vec<_>>())
        .bind(
            closed
                .iter()
                .map(|(c, _)| batch::duration_us(c.duration))
                .collect::<Vec<_>>(),
        )
        .execute(&mut *conn)
        .await
        .doing("writing an outcome batch")?;
    let recorded: Vec<(&Completion, Recorded)> = closed
        .iter()
        .map(|(c, item)| {
            (
                *c,
                Recorded {
                    delivery_id: c.delivery_id,
                    event_id: item.event_id,
                    route: item.route.clone(),
                    idempotency_key: item.idempotency_key.clone(),
                },
            )
        })
        .collect();
    let matched: Vec<(&Completion, &Recorded)> = recorded.iter().map(|(c, r)| (*c, r)).collect();
    super::record_keys(conn, &matched).await
}
