//! SQLite-only behaviour: fan-out's cursor (migration 0005), and the indexes a delivery
//! writes (migration 0006). SQLite has one writer, so events commit in id order and
//! fan-out remembers the last one it read instead of marking each event; these tests hold
//! it to never losing an event that way. And the CHECK constraints that Herald's own
//! writer connection skips: every status it writes is one they accept. And the watch that
//! stands in for Postgres's NOTIFY.

use std::borrow::Cow;
use std::path::Path;
use std::time::Duration;

use herald::store::{
    self, AttemptOutcome, ClaimRequest, Completion, DeliveryFilter, DeliveryStatus, EventHead,
    EventStatus, EventStore, FanOutRequest, NewEvent, OpenOptions, Outcome, RoutePlan,
};
use serde_json::json;
use sqlx::migrate::Migrator;
use sqlx::SqlitePool;

fn orders_route(_: &EventHead) -> Vec<RoutePlan> {
    vec![RoutePlan::ordered("orders")]
}

async fn open(path: &Path) -> Box<dyn EventStore> {
    let store = store::open(
        &format!("sqlite://{}", path.display()),
        OpenOptions {
            create_if_missing: true,
            ..OpenOptions::default()
        },
    )
    .await
    .expect("open sqlite store");
    store.migrate().await.expect("migrate");
    store
}

async fn raw(path: &Path) -> SqlitePool {
    SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("raw pool")
}

fn order(n: u32) -> NewEvent {
    NewEvent::new(
        "order.created",
        "order",
        format!("o-{n}"),
        json!({ "n": n }),
    )
}

async fn delivered_event_ids(pool: &SqlitePool) -> Vec<i64> {
    sqlx::query_scalar("SELECT event_id FROM herald_deliveries ORDER BY event_id")
        .fetch_all(pool)
        .await
        .expect("deliveries")
}

/// An id set by hand at or below what fan-out has read would never be fanned out: the
/// producer's insert fails and says why, instead of the event waiting forever.
#[tokio::test]
async fn an_event_written_below_the_fan_out_cursor_is_refused_not_lost() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("herald.db");
    let store = open(&path).await;
    for n in 1..=3 {
        store.append(&order(n)).await.expect("append");
    }
    let report = store
        .fan_out(&FanOutRequest::new(100), &orders_route)
        .await
        .expect("fan out");
    assert_eq!(report.routed, 3);

    let pool = raw(&path).await;
    sqlx::query("DELETE FROM events WHERE event_id = 2")
        .execute(&pool)
        .await
        .expect("retention deletes an event");
    let insert = "INSERT INTO events (event_id, event_type, entity_type, entity_id, event_data) \
                  VALUES ($1, 'order.created', 'order', 'by-hand', '{}')";
    let err = sqlx::query(insert)
        .bind(2_i64)
        .execute(&pool)
        .await
        .expect_err("an id below the cursor is refused");
    assert!(
        err.to_string()
            .contains("at or below the last event Herald has fanned out"),
        "{err}"
    );

    sqlx::query(insert)
        .bind(10_i64)
        .execute(&pool)
        .await
        .expect("an id above the cursor is taken");
    let report = store
        .fan_out(&FanOutRequest::new(100), &orders_route)
        .await
        .expect("fan out");
    assert_eq!(report.routed, 1);
    assert_eq!(delivered_event_ids(&pool).await, vec![1, 3, 10]);
}

/// Fan-out passes over an event that is not READY when it gets there (a producer may
/// write one already settled) and goes on to the events after it.
#[tokio::test]
async fn an_event_that_is_not_ready_does_not_hold_fan_out_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("herald.db");
    let store = open(&path).await;
    let pool = raw(&path).await;
    sqlx::query(
        "INSERT INTO events (event_type, entity_type, entity_id, event_data, event_status) \
         VALUES ('order.created', 'order', 'o-0', '{}', 'SKIPPED')",
    )
    .execute(&pool)
    .await
    .expect("a settled event");
    let ready = store.append(&order(1)).await.expect("append");

    let report = store
        .fan_out(&FanOutRequest::new(1), &orders_route)
        .await
        .expect("fan out");
    assert_eq!(
        report.events(),
        0,
        "the first pass reads only the SKIPPED one"
    );
    let report = store
        .fan_out(&FanOutRequest::new(100), &orders_route)
        .await
        .expect("fan out");
    assert_eq!(report.routed, 1);
    assert_eq!(delivered_event_ids(&pool).await, vec![ready]);
    let again = store
        .fan_out(&FanOutRequest::new(100), &orders_route)
        .await
        .expect("fan out");
    assert_eq!(again.events(), 0, "nothing is read twice");
}

/// A store made before the cursor goes on from the last event fan-out had marked: the
/// marked events are not fanned out again, the unmarked ones are.
#[tokio::test]
async fn upgrading_to_the_cursor_keeps_what_fan_out_had_read() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("herald.db");
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let pool = SqlitePool::connect(&url).await.expect("new file");
    let mut before_cursor =
        Migrator::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite"))
            .await
            .expect("migrations");
    let upto = before_cursor
        .migrations
        .iter()
        .position(|m| m.version == 5)
        .expect("migration 0005");
    before_cursor.migrations = Cow::Owned(before_cursor.migrations[..upto].to_vec());
    before_cursor.run(&pool).await.expect("migrations 1-4");
    sqlx::query(
        "INSERT INTO events (event_type, entity_type, entity_id, event_data, fanned_out) \
         VALUES ('order.created', 'order', 'o-1', '{}', 1), \
                ('order.created', 'order', 'o-2', '{}', 1), \
                ('order.created', 'order', 'o-3', '{}', 0), \
                ('order.created', 'order', 'o-4', '{}', 0)",
    )
    .execute(&pool)
    .await
    .expect("events of the old schema");
    pool.close().await;

    let store = open(&path).await;
    let report = store
        .fan_out(&FanOutRequest::new(100), &orders_route)
        .await
        .expect("fan out");
    assert_eq!(report.routed, 2);
    assert_eq!(delivered_event_ids(&raw(&path).await).await, vec![3, 4]);
}

/// A delivery that succeeds writes index entries only where the drain needs them
/// (migration 0006): besides the keys, every index of the deliveries holds open, retrying
/// or dead ones only, and no index of the attempts names the event. What operators read
/// is still there: an event's attempts, through its deliveries, and the dead letters.
#[tokio::test]
async fn a_delivered_event_writes_no_index_entry_only_operators_read() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("herald.db");
    let store = open(&path).await;
    let pool = raw(&path).await;
    let unconditional: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM pragma_index_list('herald_deliveries') \
         WHERE \"unique\" = 0 AND partial = 0 ORDER BY name",
    )
    .fetch_all(&pool)
    .await
    .expect("indexes of the deliveries");
    assert_eq!(
        unconditional,
        Vec::<String>::new(),
        "indexes every delivered delivery writes into"
    );
    let naming_the_event: Vec<String> = sqlx::query_scalar(
        "SELECT l.name FROM pragma_index_list('herald_attempts') AS l, \
           pragma_index_info(l.name) AS i WHERE i.name = 'event_id'",
    )
    .fetch_all(&pool)
    .await
    .expect("indexes of the attempts");
    assert_eq!(naming_the_event, Vec::<String>::new());

    let delivered = store.append(&order(1)).await.expect("append");
    let dead = store.append(&order(2)).await.expect("append");
    store
        .fan_out(&FanOutRequest::new(100), &orders_route)
        .await
        .expect("fan out");
    let claimed = store
        .claim(&ClaimRequest {
            owner: "operator-test".into(),
            limit: 10,
            lease: Duration::from_secs(60),
            paused_routes: Vec::new(),
        })
        .await
        .expect("claim");
    let completions: Vec<Completion> = claimed
        .iter()
        .map(|c| {
            let outcome = if c.event.event_id == dead {
                Outcome::Dead {
                    reason: "refused".into(),
                }
            } else {
                Outcome::delivered()
            };
            Completion::for_claim(c, "operator-test", outcome)
        })
        .collect();
    store.complete(&completions).await.expect("complete");

    let detail = store
        .event_detail(delivered)
        .await
        .expect("event detail")
        .expect("the event exists");
    assert_eq!(
        detail.attempts.len(),
        1,
        "the event's attempt, through its delivery"
    );
    let letters = store
        .list_deliveries(&DeliveryFilter {
            status: Some(DeliveryStatus::Dead),
            route: None,
            limit: 10,
        })
        .await
        .expect("dead letters");
    let dead_events: Vec<i64> = letters.iter().map(|d| d.event_id).collect();
    assert_eq!(dead_events, vec![dead]);
}

/// Herald's writer connection skips the schema's CHECK constraints (each cost a temporary
/// index per row written) because it writes the checked columns only from Herald's enums.
/// This holds the two together: every name of each enum passes its column's constraint, so
/// a name added to an enum without a migration fails here; and on any other connection the
/// constraints still refuse what is not a name.
#[tokio::test]
async fn every_status_herald_writes_is_one_the_schema_accepts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("herald.db");
    let _store = open(&path).await;
    let pool = raw(&path).await;
    let refused = |result: Result<sqlx::sqlite::SqliteQueryResult, sqlx::Error>| match result {
        Err(err) => assert!(
            err.to_string().contains("CHECK constraint failed"),
            "refused for another reason: {err}"
        ),
        Ok(_) => panic!("a status outside the schema's list was written"),
    };

    let insert_event = "INSERT INTO events (event_type, entity_type, entity_id, event_status) \
                        VALUES ('t', 'e', '1', ?)";
    let mut event_id = 0;
    for status in EventStatus::ALL {
        event_id = sqlx::query(insert_event)
            .bind(status.as_str())
            .execute(&pool)
            .await
            .unwrap_or_else(|err| panic!("event status {}: {err}", status.as_str()))
            .last_insert_rowid();
    }
    refused(sqlx::query(insert_event).bind("LOST").execute(&pool).await);

    let insert_delivery = "INSERT INTO herald_deliveries (event_id, route, entity_type, \
                           entity_id, ordered, idempotency_key, status) \
                           VALUES (?, ?, 'e', '1', 1, 'k', ?)";
    let mut delivery_id = 0;
    for status in DeliveryStatus::ALL {
        delivery_id = sqlx::query(insert_delivery)
            .bind(event_id)
            .bind(status.as_str())
            .bind(status.as_str())
            .execute(&pool)
            .await
            .unwrap_or_else(|err| panic!("delivery status {}: {err}", status.as_str()))
            .last_insert_rowid();
    }
    refused(
        sqlx::query(insert_delivery)
            .bind(event_id)
            .bind("elsewhere")
            .bind("LOST")
            .execute(&pool)
            .await,
    );

    let insert_attempt = "INSERT INTO herald_attempts (delivery_id, event_id, route, attempt, \
                          outcome, instance, started_at, duration_us) \
                          VALUES (?, ?, 'r', 1, ?, 'i', '2026-12-02T00:00:00.000Z', 1)";
    for outcome in AttemptOutcome::ALL {
        sqlx::query(insert_attempt)
            .bind(delivery_id)
            .bind(event_id)
            .bind(outcome.as_str())
            .execute(&pool)
            .await
            .unwrap_or_else(|err| panic!("attempt outcome {}: {err}", outcome.as_str()));
    }
    refused(
        sqlx::query(insert_attempt)
            .bind(delivery_id)
            .bind(event_id)
            .bind("LOST")
            .execute(&pool)
            .await,
    );

    // The ledger records the outcome of each attempt that completes its key.
    let insert_key = "INSERT INTO herald_idempotency (route, idempotency_key, event_id, outcome) \
                      VALUES ('r', ?, ?, ?)";
    let every_outcome = [
        Outcome::delivered(),
        Outcome::Retry {
            after: Duration::from_secs(1),
            reason: "later".into(),
        },
        Outcome::Dead {
            reason: "refused".into(),
        },
        Outcome::Skipped {
            reason: "not ours".into(),
        },
    ];
    for outcome in every_outcome.iter().filter(|o| o.completes_key()) {
        let name = outcome.attempt_outcome().as_str();
        sqlx::query(insert_key)
            .bind(name)
            .bind(event_id)
            .bind(name)
            .execute(&pool)
            .await
            .unwrap_or_else(|err| panic!("ledger outcome {name}: {err}"));
    }
    refused(
        sqlx::query(insert_key)
            .bind("lost")
            .bind(event_id)
            .bind("RETRY")
            .execute(&pool)
            .await,
    );
}

/// SQLite has no NOTIFY: the store watches for commits instead, so a dispatcher that
/// listens wakes when another connection (a producer's) inserts an event, without polling.
#[tokio::test]
async fn an_insert_by_another_connection_wakes_a_listener() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("herald.db");
    let store = open(&path).await;
    let producer = raw(&path).await;
    let wake = std::sync::Arc::new(tokio::sync::Notify::new());
    assert!(store
        .watch_new_events(std::sync::Arc::downgrade(&wake))
        .await
        .expect("watch"));

    for n in 0..2 {
        let woken = wake.notified();
        sqlx::query(
            "INSERT INTO events (event_type, entity_type, entity_id, event_data) \
             VALUES ('order.created', 'order', ?, '{}')",
        )
        .bind(n.to_string())
        .execute(&producer)
        .await
        .expect("insert");
        tokio::time::timeout(Duration::from_secs(10), woken)
            .await
            .unwrap_or_else(|_| panic!("insert {n} did not wake the listener"));
    }
}
