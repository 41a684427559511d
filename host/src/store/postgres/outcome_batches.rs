//! The record side of the batch ledger (migration 0013): the claim items an outcome
//! transaction closes at their first attempt as delivered or skipped are written as one
//! `herald_outcome_batches` row, instead of a delivery row's update and an attempt row
//! each. Everything else the transaction records (keys, events' status, emitted events)
//! is written as for any delivery.

use sqlx::postgres::PgConnection;

use super::claims::HeldItem;
use super::QueryContext;
use crate::store::batch::{self, Recorded, Settlement};
use crate::store::{Completion, StoreResult};

pub const INSERT_OUTCOME_BATCH: &str =
    "INSERT INTO herald_outcome_batches (instance, event_range, \
       delivery_ids, event_ids, routes, ordered, idempotency_keys, outcomes, details, \
       plugin_versions, leased_at, started_at, duration_us) \
     VALUES ($1, int8range($2, $3, '[]'), $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)";

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

/// Record `closed` (first attempts on held items, each delivered or skipped) as one batch
/// row and their keys in the idempotency ledger; the settlements of their events.
pub(crate) async fn record(
    conn: &mut PgConnection,
    closed: &[(&Completion, &HeldItem)],
) -> StoreResult<Vec<Settlement>> {
    let Some((first, _)) = closed.first() else {
        return Ok(Vec::new());
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
    super::record_keys(conn, &matched).await?;
    // Each item is its event's only delivery: its outcome settles the event.
    let mut states: Vec<batch::DeliveryState> = closed
        .iter()
        .map(|(c, item)| {
            (
                item.event_id,
                c.outcome.delivery_status(),
                item.route.clone(),
                None,
            )
        })
        .collect();
    states.sort_by_key(|(event_id, ..)| *event_id);
    Ok(batch::resettle(states))
}
