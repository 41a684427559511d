//! One suite, both backends: every store operation must behave the same on SQLite and
//! Postgres. Each test body takes a `Fixture`; the macro at the bottom runs it on each.

use std::collections::HashSet;
use std::time::Duration;

use herald::store::{
    self, ClaimRequest, Completion, CompletionResult, DeliveryFilter, DeliveryStatus, EventFilter,
    EventHead, EventStatus, EventStore, FanOutRequest, NewEvent, OpenOptions, Outcome, RoutePlan,
};
use herald_tests::PgSchema;
use serde_json::json;

struct Fixture {
    store: Box<dyn EventStore>,
    raw: Raw,
    _sqlite_dir: Option<tempfile::TempDir>,
}

/// A second, plain connection pool for what producers and operators do behind Herald's back.
enum Raw {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl Fixture {
    async fn exec(&self, sql: &str) -> u64 {
        let result = match &self.raw {
            Raw::Sqlite(pool) => sqlx::query(sql)
                .execute(pool)
                .await
                .map(|r| r.rows_affected()),
            Raw::Postgres(pool) => sqlx::query(sql)
                .execute(pool)
                .await
                .map(|r| r.rows_affected()),
        };
        result.unwrap_or_else(|err| panic!("{sql}: {err}"))
    }

    /// A producer's INSERT that the database may refuse; the error as text.
    async fn try_exec(&self, sql: &str) -> Result<u64, String> {
        match &self.raw {
            Raw::Sqlite(pool) => sqlx::query(sql)
                .execute(pool)
                .await
                .map(|r| r.rows_affected()),
            Raw::Postgres(pool) => sqlx::query(sql)
                .execute(pool)
                .await
                .map(|r| r.rows_affected()),
        }
        .map_err(|err| err.to_string())
    }

    /// Insert one event row as a producer would, returning its id.
    async fn insert(&self, columns: &str, values: &str) -> i64 {
        let sql = format!("INSERT INTO events ({columns}) VALUES ({values}) RETURNING event_id");
        let result = match &self.raw {
            Raw::Sqlite(pool) => sqlx::query_scalar(&sql).fetch_one(pool).await,
            Raw::Postgres(pool) => sqlx::query_scalar(&sql).fetch_one(pool).await,
        };
        result.unwrap_or_else(|err| panic!("{sql}: {err}"))
    }

    fn is_sqlite(&self) -> bool {
        matches!(self.raw, Raw::Sqlite(_))
    }

    async fn count(&self, sql: &str) -> i64 {
        let result = match &self.raw {
            Raw::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
            Raw::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
        };
        result.unwrap_or_else(|err| panic!("{sql}: {err}"))
    }
}

async fn sqlite_fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("herald.db");
    let url = format!("sqlite://{}", path.display());
    let store = store::open(
        &url,
        OpenOptions {
            create_if_missing: true,
            ..OpenOptions::default()
        },
    )
    .await
    .expect("open sqlite store");
    store.migrate().await.expect("migrate sqlite");
    let raw = sqlx::SqlitePool::connect(&url)
        .await
        .expect("raw sqlite pool");
    Fixture {
        store,
        raw: Raw::Sqlite(raw),
        _sqlite_dir: Some(dir),
    }
}

async fn postgres_fixture(schema: &PgSchema) -> Fixture {
    let store = store::open(&schema.url, OpenOptions::default())
        .await
        .expect("open postgres store");
    store.migrate().await.expect("migrate postgres");
    let raw = sqlx::PgPool::connect(&schema.url)
        .await
        .expect("raw pg pool");
    Fixture {
        store,
        raw: Raw::Postgres(raw),
        _sqlite_dir: None,
    }
}

/// `order.*` → one ordered route; `payment.*` → an ordered and an unordered route;
/// `bulk.*` → one unordered route; anything else has no route.
fn router(head: &EventHead) -> Vec<RoutePlan> {
    let t = head.event_type.as_str();
    if t.starts_with("order.") {
        vec![RoutePlan::ordered("orders")]
    } else if t.starts_with("payment.") {
        vec![RoutePlan::ordered("ledger"), RoutePlan::unordered("audit")]
    } else if t.starts_with("bulk.") {
        vec![RoutePlan::unordered("bulk")]
    } else {
        vec![]
    }
}

fn order(entity: &str, n: i64) -> NewEvent {
    NewEvent::new("order.created", "order", entity, json!({ "n": n }))
}

fn claim_request(owner: &str, limit: u32) -> ClaimRequest {
    ClaimRequest {
        owner: owner.into(),
        limit,
        lease: Duration::from_secs(60),
        paused_routes: Vec::new(),
    }
}

async fn claim(f: &Fixture, owner: &str, limit: u32) -> Vec<store::ClaimedDelivery> {
    f.store
        .claim(&claim_request(owner, limit))
        .await
        .expect("claim")
}

/// One fan-out pass of up to `limit` events through [`router`].
async fn fan_out(f: &Fixture, limit: u32) -> store::FanOutReport {
    f.store
        .fan_out(&FanOutRequest::new(limit), &router)
        .await
        .expect("fan out")
}

async fn complete_one(
    f: &Fixture,
    claimed: &store::ClaimedDelivery,
    owner: &str,
    outcome: Outcome,
) -> CompletionResult {
    let mut results = f
        .store
        .complete(&[Completion::for_claim(claimed, owner, outcome)])
        .await
        .expect("complete");
    assert_eq!(results.len(), 1);
    results.remove(0)
}

async fn status_of(f: &Fixture, event_id: i64) -> (EventStatus, Option<String>) {
    let detail = f
        .store
        .event_detail(event_id)
        .await
        .expect("detail")
        .expect("event exists");
    (detail.event.event_status, detail.event.status_reason)
}

// ---------------------------------------------------------------------------------------

async fn append_one_and_read_it_back(f: &Fixture) {
    let event = order("o-1", 1).with_target("billing").with_key("k-1");
    let id = f.store.append(&event).await.expect("append");
    let detail = f
        .store
        .event_detail(id)
        .await
        .expect("detail")
        .expect("found");
    let stored = detail.event;
    assert_eq!(stored.event_id, id);
    assert_eq!(stored.event_type, "order.created");
    assert_eq!(
        (stored.entity_type.as_str(), stored.entity_id.as_str()),
        ("order", "o-1")
    );
    assert_eq!(stored.event_target.as_deref(), Some("billing"));
    assert_eq!(stored.idempotency_key.as_deref(), Some("k-1"));
    assert_eq!(stored.event_status, EventStatus::Ready);
    let data: serde_json::Value =
        serde_json::from_str(stored.event_data.as_deref().expect("data")).expect("json");
    assert_eq!(data, json!({ "n": 1 }));
    let headers: serde_json::Value =
        serde_json::from_str(stored.headers.as_deref().expect("headers")).expect("json");
    assert_eq!(headers, json!({}));
    assert!(detail.deliveries.is_empty() && detail.attempts.is_empty());
    assert!(f
        .store
        .event_detail(id + 1000)
        .await
        .expect("detail")
        .is_none());
}

async fn bulk_append_is_all_or_nothing(f: &Fixture) {
    let ids = f
        .store
        .append_batch(&[order("a", 1), order("b", 2), order("c", 3)])
        .await
        .expect("bulk append");
    assert_eq!(ids.len(), 3);
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids in input order: {ids:?}"
    );

    let bad = NewEvent::new("order.created", "order", "  ", json!({}));
    let err = f
        .store
        .append_batch(&[order("d", 4), bad])
        .await
        .expect_err("an empty entity_id is refused");
    assert!(err.to_string().contains("entity_id is empty"), "{err}");
    let all = f
        .store
        .list_events(&EventFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(all.len(), 3, "nothing of the failed batch was written");
}

async fn producer_inserts_only_the_seed_columns(f: &Fixture) {
    f.exec(
        "INSERT INTO events (event_target, event_type, entity_type, entity_id, event_data) \
         VALUES (NULL, 'order.created', 'order', 'raw-1', '{\"total\": 5}')",
    )
    .await;
    let events = f
        .store
        .list_events(&EventFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event_status, EventStatus::Ready);
    let report = fan_out(f, 100).await;
    assert_eq!(report.routed, 1);
    let claimed = claim(f, "a", 10).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].event.entity_id, "raw-1");
    assert_eq!(
        claimed[0].idempotency_key,
        format!("herald-{}-orders", events[0].event_id)
    );
}

async fn fan_out_routes_skips_and_refuses_visibly(f: &Fixture) {
    let routed = f.store.append(&order("o-1", 1)).await.expect("append");
    let fanned = f
        .store
        .append(&NewEvent::new(
            "payment.captured",
            "payment",
            "p-1",
            json!({}),
        ))
        .await
        .expect("append");
    let unrouted = f
        .store
        .append(&NewEvent::new("user.created", "user", "u-1", json!({})).with_target("crm"))
        .await
        .expect("append");
    let first_key = f
        .store
        .append(&order("o-2", 2).with_key("same"))
        .await
        .expect("append");
    let repeat_key = f
        .store
        .append(&order("o-3", 3).with_key("same"))
        .await
        .expect("append");
    f.exec(
        "INSERT INTO events (event_type, entity_type, entity_id, event_data) \
         VALUES ('order.created', 'order', 'o-4', NULL)",
    )
    .await;

    let report = fan_out(f, 100).await;
    assert_eq!(
        (
            report.routed,
            report.deliveries,
            report.skipped,
            report.duplicates,
            report.malformed
        ),
        (3, 4, 1, 1, 1)
    );
    assert_eq!(report.events(), 6);

    let (status, reason) = status_of(f, unrouted).await;
    assert_eq!(status, EventStatus::Skipped);
    assert_eq!(
        reason.as_deref(),
        Some("no route matches event_type 'user.created' and event_target 'crm'")
    );
    let (status, reason) = status_of(f, repeat_key).await;
    assert_eq!(status, EventStatus::Duplicate);
    assert_eq!(
        reason,
        Some(format!(
            "duplicate of event {first_key} (idempotency_key 'same')"
        ))
    );
    let dead = f
        .store
        .list_events(&EventFilter {
            status: Some(EventStatus::Dead),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].status_reason.as_deref(), Some("event_data is NULL"));

    let routes: HashSet<String> = f
        .store
        .event_detail(fanned)
        .await
        .expect("detail")
        .expect("found")
        .deliveries
        .into_iter()
        .map(|d| d.route)
        .collect();
    assert_eq!(
        routes,
        HashSet::from(["ledger".to_string(), "audit".to_string()])
    );
    assert_eq!(status_of(f, routed).await.0, EventStatus::Ready);

    // A second pass finds nothing new: routed events are not routed twice.
    assert_eq!(fan_out(f, 100).await.events(), 0);
    // The producer key is the delivery key on every route of the event.
    let keyed = f
        .store
        .event_detail(first_key)
        .await
        .expect("detail")
        .expect("found");
    assert_eq!(keyed.deliveries[0].idempotency_key, "same");
}

async fn late_duplicate_of_an_already_handled_key(f: &Fixture) {
    let first = f
        .store
        .append(&order("o-1", 1).with_key("k"))
        .await
        .expect("append");
    fan_out(f, 100).await;
    let second = f
        .store
        .append(&order("o-2", 2).with_key("k"))
        .await
        .expect("append");
    let report = fan_out(f, 100).await;
    assert_eq!(report.duplicates, 1);
    let (status, reason) = status_of(f, second).await;
    assert_eq!(status, EventStatus::Duplicate);
    assert!(reason
        .unwrap_or_default()
        .contains(&format!("event {first}")));
}

async fn concurrent_claimers_never_share_a_delivery(f: &Fixture) {
    let events: Vec<NewEvent> = (0..60)
        .map(|n| NewEvent::new("bulk.item", "item", format!("i-{n}"), json!({ "n": n })))
        .collect();
    f.store.append_batch(&events).await.expect("append");
    fan_out(f, 1000).await;

    let mut seen = HashSet::new();
    loop {
        let (a, b) = tokio::join!(claim(f, "alpha", 7), claim(f, "beta", 7));
        if a.is_empty() && b.is_empty() {
            break;
        }
        for delivery in a.iter().chain(b.iter()) {
            assert!(
                seen.insert(delivery.delivery_id),
                "delivery {} claimed twice",
                delivery.delivery_id
            );
        }
    }
    assert_eq!(seen.len(), 60);
}

async fn a_live_lease_holds_and_an_expired_one_is_taken_over(f: &Fixture) {
    f.store.append(&order("o-1", 1)).await.expect("append");
    fan_out(f, 10).await;
    let first = claim(f, "alpha", 10).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].attempt, 1);
    assert!(
        claim(f, "beta", 10).await.is_empty(),
        "a live lease is not claimable"
    );

    // Expire alpha's lease the way time would.
    f.exec("UPDATE herald_deliveries SET locked_until = created_at")
        .await;
    let taken = claim(f, "beta", 10).await;
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].attempt, 2);

    // alpha wakes up late: its completion must not land, beta's does.
    assert_eq!(
        complete_one(f, &first[0], "alpha", Outcome::delivered()).await,
        CompletionResult::LeaseLost
    );
    assert_eq!(f.count("SELECT count(*) FROM herald_attempts").await, 0);
    assert!(matches!(
        complete_one(f, &taken[0], "beta", Outcome::delivered()).await,
        CompletionResult::Committed { .. }
    ));
    assert_eq!(
        status_of(f, taken[0].event.event_id).await.0,
        EventStatus::Success
    );
}

async fn a_zero_lease_expires_at_once(f: &Fixture) {
    f.store.append(&order("o-1", 1)).await.expect("append");
    fan_out(f, 10).await;
    let request = ClaimRequest {
        owner: "alpha".into(),
        limit: 10,
        lease: Duration::ZERO,
        paused_routes: Vec::new(),
    };
    assert_eq!(f.store.claim(&request).await.expect("claim").len(), 1);
    assert_eq!(claim(f, "beta", 10).await.len(), 1);
}

async fn completion_writes_attempt_ledger_emits_and_status_together(f: &Fixture) {
    let id = f
        .store
        .append(&order("o-1", 1).with_key("k-1"))
        .await
        .expect("append");
    fan_out(f, 10).await;
    let claimed = claim(f, "alpha", 10).await;
    let follow_up = NewEvent::new(
        "invoice.requested",
        "invoice",
        "inv-1",
        json!({ "for": id }),
    );
    let mut completion = Completion::for_claim(
        &claimed[0],
        "alpha",
        Outcome::Delivered {
            receipt: Some("202 accepted".into()),
            emitted: vec![follow_up],
        },
    );
    completion.plugin_version = Some("sha256:abc".into());
    completion.duration = Duration::from_micros(1500);
    let results = f.store.complete(&[completion]).await.expect("complete");
    let CompletionResult::Committed { emitted } = &results[0] else {
        panic!("not committed: {results:?}");
    };
    assert_eq!(emitted.len(), 1);

    let detail = f
        .store
        .event_detail(id)
        .await
        .expect("detail")
        .expect("found");
    assert_eq!(detail.event.event_status, EventStatus::Success);
    assert_eq!(detail.event.status_reason, None);
    assert_eq!(detail.deliveries[0].status, DeliveryStatus::Success);
    assert_eq!(detail.deliveries[0].locked_by, None);
    let attempt = &detail.attempts[0];
    assert_eq!(attempt.attempt, 1);
    assert_eq!(attempt.outcome, store::AttemptOutcome::Delivered);
    assert_eq!(attempt.detail.as_deref(), Some("202 accepted"));
    assert_eq!(attempt.plugin_version.as_deref(), Some("sha256:abc"));
    assert_eq!(attempt.instance, "alpha");
    assert_eq!(attempt.duration_us, 1500);
    assert_eq!(f.count("SELECT count(*) FROM herald_idempotency").await, 1);

    let emitted_event = f
        .store
        .event_detail(emitted[0])
        .await
        .expect("detail")
        .expect("found");
    assert_eq!(emitted_event.event.event_type, "invoice.requested");
    assert_eq!(emitted_event.event.event_status, EventStatus::Ready);
}

/// Both kinds of key: the producer's, which the ledger records, and a derived one, which
/// names one delivery and is known done from that delivery's attempts log (the ledger
/// gets no row for it).
async fn a_completed_key_is_reported_on_a_later_claim(f: &Fixture) {
    let derived = f.store.append(&order("o-1", 1)).await.expect("append");
    let keyed = f
        .store
        .append(&order("o-2", 2).with_key("k-2"))
        .await
        .expect("append");
    fan_out(f, 10).await;
    let claimed = claim(f, "alpha", 10).await;
    assert_eq!(claimed.len(), 2);
    for delivery in &claimed {
        assert!(delivery.already_completed.is_none());
        let outcome = if delivery.event.event_id == derived {
            Outcome::Skipped {
                reason: "not for us".into(),
            }
        } else {
            Outcome::delivered()
        };
        complete_one(f, delivery, "alpha", outcome).await;
    }
    assert_eq!(f.count("SELECT count(*) FROM herald_idempotency").await, 1);

    // A replay re-opens the deliveries, even with a fresh attempt count; the effects are
    // still known to have happened.
    f.exec("UPDATE herald_deliveries SET status = 'PENDING', attempts = 0")
        .await;
    let again = claim(f, "beta", 10).await;
    assert_eq!(again.len(), 2);
    for delivery in &again {
        let id = delivery.event.event_id;
        let ledger = delivery
            .already_completed
            .as_ref()
            .unwrap_or_else(|| panic!("no completion reported for event {id}"));
        assert_eq!(ledger.event_id, id);
        assert_eq!(ledger.route, "orders");
        assert_eq!(ledger.idempotency_key, delivery.idempotency_key);
        if id == keyed {
            assert_eq!(ledger.outcome, store::AttemptOutcome::Delivered);
            assert_eq!(ledger.idempotency_key, "k-2");
        } else {
            assert_eq!(ledger.outcome, store::AttemptOutcome::Skipped);
            assert_eq!(ledger.detail.as_deref(), Some("not for us"));
        }
    }
}

async fn retry_waits_then_succeeds_with_every_attempt_logged(f: &Fixture) {
    let id = f.store.append(&order("o-1", 1)).await.expect("append");
    fan_out(f, 10).await;
    let first = claim(f, "alpha", 10).await;
    complete_one(
        f,
        &first[0],
        "alpha",
        Outcome::Retry {
            after: Duration::from_secs(3600),
            reason: "HTTP 503".into(),
        },
    )
    .await;
    let (status, reason) = status_of(f, id).await;
    assert_eq!(status, EventStatus::Failed);
    assert_eq!(reason.as_deref(), Some("route orders: HTTP 503"));
    assert!(
        claim(f, "alpha", 10).await.is_empty(),
        "not due for an hour"
    );

    f.exec("UPDATE herald_deliveries SET next_attempt_at = created_at")
        .await;
    let second = claim(f, "alpha", 10).await;
    assert_eq!(second[0].attempt, 2);
    complete_one(f, &second[0], "alpha", Outcome::delivered()).await;
    let detail = f
        .store
        .event_detail(id)
        .await
        .expect("detail")
        .expect("found");
    assert_eq!(detail.event.event_status, EventStatus::Success);
    let outcomes: Vec<_> = detail
        .attempts
        .iter()
        .map(|a| (a.attempt, a.outcome))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (1, store::AttemptOutcome::Retry),
            (2, store::AttemptOutcome::Delivered)
        ]
    );
    assert_eq!(detail.attempts[0].detail.as_deref(), Some("HTTP 503"));
}

async fn dead_is_final_and_listed(f: &Fixture) {
    let id = f.store.append(&order("o-1", 1)).await.expect("append");
    fan_out(f, 10).await;
    let claimed = claim(f, "alpha", 10).await;
    let mut completion = Completion::for_claim(
        &claimed[0],
        "alpha",
        Outcome::Dead {
            reason: "HTTP 410 Gone".into(),
        },
    );
    completion.host_events = vec![NewEvent::new(
        "herald.delivery.dead",
        "order",
        "o-1",
        json!({ "event_id": id }),
    )];
    f.store.complete(&[completion]).await.expect("complete");
    assert_eq!(
        f.count("SELECT count(*) FROM events WHERE event_type = 'herald.delivery.dead'")
            .await,
        1,
        "the host's dead notice is committed with the dead outcome"
    );
    assert_eq!(
        status_of(f, id).await,
        (
            EventStatus::Dead,
            Some("route orders: HTTP 410 Gone".into())
        )
    );
    let dead = f
        .store
        .list_deliveries(&DeliveryFilter {
            status: Some(DeliveryStatus::Dead),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].last_error.as_deref(), Some("HTTP 410 Gone"));
    assert_eq!(f.count("SELECT count(*) FROM herald_idempotency").await, 0);
    assert!(claim(f, "alpha", 10).await.is_empty());
}

async fn redrive_sends_dead_deliveries_again(f: &Fixture) {
    let ids = f
        .store
        .append_batch(&[
            order("A", 1),
            order("B", 1),
            NewEvent::new("payment.captured", "payment", "P", json!({})),
        ])
        .await
        .expect("append");
    fan_out(f, 10).await;
    let batch = claim(f, "alpha", 10).await;
    assert_eq!(batch.len(), 4);
    for delivery in &batch {
        complete_one(
            f,
            delivery,
            "alpha",
            Outcome::Dead {
                reason: "boom".into(),
            },
        )
        .await;
    }
    let one = batch
        .iter()
        .find(|d| d.event.event_id == ids[0])
        .expect("A claimed");
    let redriven = f
        .store
        .redrive(&store::RedriveSelection {
            delivery_id: Some(one.delivery_id),
            route: None,
        })
        .await
        .expect("redrive one");
    assert_eq!(redriven, 1);
    assert_eq!(status_of(f, ids[0]).await, (EventStatus::Ready, None));
    let again = claim(f, "alpha", 10).await;
    assert_eq!(again.len(), 1);
    assert_eq!(
        again[0].attempt, 1,
        "a redrive starts a fresh attempt budget"
    );

    let by_route = f
        .store
        .redrive(&store::RedriveSelection {
            delivery_id: None,
            route: Some("audit".into()),
        })
        .await
        .expect("redrive by route");
    assert_eq!(by_route, 1);
    let rest = f
        .store
        .redrive(&store::RedriveSelection::default())
        .await
        .expect("redrive all");
    assert_eq!(rest, 2, "orders B and ledger P; A is not dead any more");
    assert_eq!(
        f.store
            .redrive(&store::RedriveSelection::default())
            .await
            .expect("again"),
        0
    );
}

async fn later_events_of_an_entity_wait_for_earlier_ones(f: &Fixture) {
    let a1 = f.store.append(&order("A", 1)).await.expect("append");
    let a2 = f.store.append(&order("A", 2)).await.expect("append");
    let b1 = f.store.append(&order("B", 1)).await.expect("append");
    fan_out(f, 10).await;

    let batch = claim(f, "alpha", 10).await;
    let ids: HashSet<i64> = batch.iter().map(|d| d.event.event_id).collect();
    assert_eq!(
        ids,
        HashSet::from([a1, b1]),
        "A's second event waits behind its first"
    );

    let first_a = batch
        .iter()
        .find(|d| d.event.event_id == a1)
        .expect("a1 claimed");
    complete_one(
        f,
        first_a,
        "alpha",
        Outcome::Retry {
            after: Duration::ZERO,
            reason: "later".into(),
        },
    )
    .await;
    let next = claim(f, "alpha", 10).await;
    let ids: Vec<i64> = next.iter().map(|d| d.event.event_id).collect();
    assert_eq!(
        ids,
        vec![a1],
        "the retrying event goes first, its successor still waits"
    );

    complete_one(f, &next[0], "alpha", Outcome::delivered()).await;
    let last = claim(f, "alpha", 10).await;
    assert_eq!(
        last.iter().map(|d| d.event.event_id).collect::<Vec<_>>(),
        vec![a2]
    );
}

async fn unordered_routes_do_not_wait(f: &Fixture) {
    for n in 0..3 {
        f.store
            .append(&NewEvent::new(
                "payment.captured",
                "payment",
                "P",
                json!({ "n": n }),
            ))
            .await
            .expect("append");
    }
    fan_out(f, 10).await;
    let batch = claim(f, "alpha", 10).await;
    let per_route = |route: &str| batch.iter().filter(|d| d.route == route).count();
    assert_eq!(
        per_route("audit"),
        3,
        "ordering = none lets the entity's events run together"
    );
    assert_eq!(
        per_route("ledger"),
        1,
        "the ordered route takes one at a time"
    );
}

async fn a_lost_lease_in_a_batch_writes_nothing_for_it(f: &Fixture) {
    f.store
        .append_batch(&[order("A", 1), order("B", 1)])
        .await
        .expect("append");
    fan_out(f, 10).await;
    let batch = claim(f, "alpha", 10).await;
    assert_eq!(batch.len(), 2);
    let mut stale = Completion::for_claim(
        &batch[1],
        "alpha",
        Outcome::Delivered {
            receipt: None,
            emitted: vec![NewEvent::new("x.y", "x", "1", json!({}))],
        },
    );
    stale.attempt += 1;
    let results = f
        .store
        .complete(&[
            Completion::for_claim(&batch[0], "alpha", Outcome::delivered()),
            stale,
        ])
        .await
        .expect("complete");
    assert!(matches!(results[0], CompletionResult::Committed { .. }));
    assert_eq!(results[1], CompletionResult::LeaseLost);
    assert_eq!(f.count("SELECT count(*) FROM herald_attempts").await, 1);
    assert_eq!(
        f.count("SELECT count(*) FROM events WHERE event_type = 'x.y'")
            .await,
        0
    );
}

/// One batch carries every kind of outcome, and both routes of the payment events: each
/// event is settled from all of its deliveries, each attempt logged once, and only the
/// delivered and skipped keys enter the ledger.
async fn a_batch_of_mixed_outcomes_settles_each_event(f: &Fixture) {
    let mut events = Vec::new();
    for n in 0..40 {
        events.push(
            NewEvent::new(
                "payment.captured",
                "payment",
                format!("P{n}"),
                json!({ "n": n }),
            )
            .with_key(format!("pay-{n}")),
        );
    }
    let ids = f.store.append_batch(&events).await.expect("append");
    let fanned = fan_out(f, 100).await;
    assert_eq!(fanned.deliveries, 80);
    let batch = claim(f, "alpha", 100).await;
    assert_eq!(batch.len(), 80);
    // By event: n % 4 == 0 both delivered, 1 audit retries, 2 ledger dead, 3 audit skipped.
    let completions: Vec<Completion> = batch
        .iter()
        .map(|claimed| {
            let n = ids
                .iter()
                .position(|id| *id == claimed.event.event_id)
                .expect("claimed one of ours")
                % 4;
            let outcome = match (n, claimed.route.as_str()) {
                (1, "audit") => Outcome::Retry {
                    after: Duration::from_secs(60),
                    reason: "audit down".into(),
                },
                (2, "ledger") => Outcome::Dead {
                    reason: "ledger refused".into(),
                },
                (3, "audit") => Outcome::Skipped {
                    reason: "nothing to audit".into(),
                },
                _ => Outcome::delivered(),
            };
            Completion::for_claim(claimed, "alpha", outcome)
        })
        .collect();
    let results = f.store.complete(&completions).await.expect("complete");
    assert!(results
        .iter()
        .all(|r| matches!(r, CompletionResult::Committed { .. })));
    for (i, id) in ids.iter().enumerate() {
        let (status, reason) = status_of(f, *id).await;
        let expected = match i % 4 {
            1 => (
                EventStatus::Failed,
                Some("route audit: audit down".to_string()),
            ),
            2 => (
                EventStatus::Dead,
                Some("route ledger: ledger refused".to_string()),
            ),
            _ => (EventStatus::Success, None),
        };
        assert_eq!((status, reason), expected, "event {i}");
    }
    assert_eq!(f.count("SELECT count(*) FROM herald_attempts").await, 80);
    // Every delivered or skipped delivery: 80, less the 10 retries and the 10 dead.
    assert_eq!(f.count("SELECT count(*) FROM herald_idempotency").await, 60);
}

/// Two batches completing the two routes of the same events at the same time: whichever
/// commits last sees the other's rows, so every event ends SUCCESS (and neither batch
/// fails on a deadlock).
async fn concurrent_batches_on_the_same_events_both_count(f: &Fixture) {
    let events: Vec<NewEvent> = (0..50)
        .map(|n| NewEvent::new("payment.captured", "payment", format!("P{n}"), json!({})))
        .collect();
    let (ids, batch) = append_and_claim(f, &events).await;
    let (mut ledger, mut audit): (Vec<_>, Vec<_>) =
        batch.iter().partition(|claimed| claimed.route == "ledger");
    // Opposite orders, the classic deadlock shape.
    audit.reverse();
    let to_completions = |claims: Vec<&store::ClaimedDelivery>| -> Vec<Completion> {
        claims
            .into_iter()
            .map(|c| Completion::for_claim(c, "alpha", Outcome::delivered()))
            .collect()
    };
    ledger.sort_by_key(|c| c.event.event_id);
    let (ledger, audit) = (to_completions(ledger), to_completions(audit));
    let (first, second) = tokio::join!(f.store.complete(&ledger), f.store.complete(&audit));
    first.expect("ledger batch");
    second.expect("audit batch");
    assert_all_succeeded(f, &ids).await;
}

/// Append `events`, fan them out and claim every delivery as `alpha`.
async fn append_and_claim(
    f: &Fixture,
    events: &[NewEvent],
) -> (Vec<i64>, Vec<store::ClaimedDelivery>) {
    let ids = f.store.append_batch(events).await.expect("append");
    fan_out(f, 100).await;
    (ids, claim(f, "alpha", 100).await)
}

async fn assert_all_succeeded(f: &Fixture, ids: &[i64]) {
    for id in ids {
        assert_eq!(
            status_of(f, *id).await.0,
            EventStatus::Success,
            "event {id}"
        );
    }
}

/// The same outcomes written twice at once, in opposite orders, as a retried outcome
/// write can be while the first is still in flight: each outcome is recorded once, by
/// one of the two (the other finds the lease gone once the first commits), and neither
/// write fails on a deadlock. The events, each settled by whichever write closed its
/// delivery, end SUCCESS.
async fn the_same_outcomes_recorded_twice_at_once_neither_deadlocks(f: &Fixture) {
    let events: Vec<NewEvent> = (0..50).map(|n| order(&format!("T{n}"), n)).collect();
    let (ids, batch) = append_and_claim(f, &events).await;
    assert_eq!(batch.len(), 50);
    let forward: Vec<Completion> = batch
        .iter()
        .map(|c| Completion::for_claim(c, "alpha", Outcome::delivered()))
        .collect();
    let backward: Vec<Completion> = forward.iter().rev().cloned().collect();
    let (first, second) = tokio::join!(f.store.complete(&forward), f.store.complete(&backward));
    let committed = |results: Vec<CompletionResult>| {
        results
            .iter()
            .filter(|r| matches!(r, CompletionResult::Committed { .. }))
            .count()
    };
    let recorded =
        committed(first.expect("first write")) + committed(second.expect("second write"));
    assert_eq!(recorded, 50, "each outcome recorded exactly once");
    assert_eq!(f.count("SELECT count(*) FROM herald_attempts").await, 50);
    assert_all_succeeded(f, &ids).await;
}

/// Repeated producer keys inside one fan-out batch: the first event is delivered, the
/// later ones are DUPLICATEs of it.
async fn repeated_keys_within_one_fan_out_batch(f: &Fixture) {
    let events: Vec<NewEvent> = (0..6)
        .map(|n| order(&format!("K{n}"), n).with_key(format!("key-{}", n % 2)))
        .collect();
    let ids = f.store.append_batch(&events).await.expect("append");
    let report = fan_out(f, 100).await;
    assert_eq!((report.routed, report.duplicates), (2, 4));
    assert_eq!(status_of(f, ids[0]).await.0, EventStatus::Ready);
    assert_eq!(status_of(f, ids[1]).await.0, EventStatus::Ready);
    for (n, id) in ids.iter().enumerate().skip(2) {
        let (status, reason) = status_of(f, *id).await;
        assert_eq!(status, EventStatus::Duplicate);
        let holder = ids[n % 2];
        assert_eq!(
            reason.as_deref(),
            Some(
                format!(
                    "duplicate of event {holder} (idempotency_key 'key-{}')",
                    n % 2
                )
                .as_str()
            )
        );
    }
}

async fn release_returns_leases_without_spending_an_attempt(f: &Fixture) {
    f.store.append(&order("A", 1)).await.expect("append");
    fan_out(f, 10).await;
    let batch = claim(f, "alpha", 10).await;
    assert_eq!(
        f.store
            .release("beta", &[batch[0].delivery_id])
            .await
            .expect("release"),
        0
    );
    assert_eq!(
        f.store
            .release("alpha", &[batch[0].delivery_id])
            .await
            .expect("release"),
        1
    );
    let again = claim(f, "beta", 10).await;
    assert_eq!(again[0].attempt, 1, "a released lease was not an attempt");
}

async fn renewal_keeps_a_lease_alive_only_for_its_owner(f: &Fixture) {
    f.store.append(&order("A", 1)).await.expect("append");
    fan_out(f, 10).await;
    let short = ClaimRequest {
        owner: "alpha".into(),
        limit: 10,
        lease: Duration::ZERO,
        paused_routes: Vec::new(),
    };
    let batch = f.store.claim(&short).await.expect("claim");
    let ids = [batch[0].delivery_id];
    assert_eq!(
        f.store
            .renew_leases("beta", &ids, Duration::from_secs(60))
            .await
            .expect("renew"),
        0
    );
    assert_eq!(
        f.store
            .renew_leases("alpha", &ids, Duration::from_secs(60))
            .await
            .expect("renew"),
        1
    );
    assert!(
        claim(f, "beta", 10).await.is_empty(),
        "the renewed lease holds"
    );
    assert_eq!(
        f.store
            .renew_leases("alpha", &[], Duration::from_secs(60))
            .await
            .expect("renew"),
        0
    );
}

async fn instances_show_heartbeats_and_held_leases(f: &Fixture) {
    f.store
        .heartbeat("alpha", "0.1.0")
        .await
        .expect("heartbeat");
    f.store.heartbeat("beta", "0.1.0").await.expect("heartbeat");
    f.store
        .heartbeat("alpha", "0.1.1")
        .await
        .expect("second heartbeat");
    f.store
        .append_batch(&[order("A", 1), order("B", 1)])
        .await
        .expect("append");
    fan_out(f, 10).await;
    assert_eq!(claim(f, "alpha", 10).await.len(), 2);

    let seen = f
        .store
        .instances(Duration::from_secs(60))
        .await
        .expect("instances");
    let summary: Vec<_> = seen
        .iter()
        .map(|i| (i.instance_id.as_str(), i.version.as_str(), i.leases_held))
        .collect();
    assert_eq!(summary, vec![("alpha", "0.1.1", 2), ("beta", "0.1.0", 0)]);

    f.exec("UPDATE herald_instances SET started_at = '2020-01-01T00:00:00.000Z', last_seen = '2020-01-01T00:00:00.000Z' WHERE instance_id = 'beta'").await;
    let seen = f
        .store
        .instances(Duration::from_secs(60))
        .await
        .expect("instances");
    assert_eq!(seen.len(), 1, "an instance not seen lately is gone");
    f.store.deregister("alpha").await.expect("deregister");
    assert!(f
        .store
        .instances(Duration::from_secs(60))
        .await
        .expect("instances")
        .is_empty());
}

async fn backlog_counts_ready_events_and_waiting_retries(f: &Fixture) {
    assert_eq!(
        f.store.backlog().await.expect("backlog"),
        store::Backlog::default()
    );
    f.store
        .append_batch(&[order("A", 1), order("B", 1)])
        .await
        .expect("append");
    let backlog = f.store.backlog().await.expect("backlog");
    assert_eq!((backlog.ready_events, backlog.waiting_retry), (2, 0));
    fan_out(f, 10).await;
    // Fanned out, each with its delivery open: still READY.
    let backlog = f.store.backlog().await.expect("backlog");
    assert_eq!((backlog.ready_events, backlog.waiting_retry), (2, 0));
    let batch = claim(f, "alpha", 10).await;
    complete_one(
        f,
        &batch[0],
        "alpha",
        Outcome::Retry {
            after: Duration::from_secs(60),
            reason: "later".into(),
        },
    )
    .await;
    complete_one(f, &batch[1], "alpha", Outcome::delivered()).await;
    let backlog = f.store.backlog().await.expect("backlog");
    assert_eq!((backlog.ready_events, backlog.waiting_retry), (0, 1));
}

async fn list_filters_and_entity_history(f: &Fixture) {
    f.store
        .append_batch(&[
            order("A", 1),
            NewEvent::new("order.paid", "order", "A", json!({})),
            order("B", 1),
            NewEvent::new("user.created", "user", "u", json!({})),
            NewEvent::new("order.shipped", "order", "A", json!({})),
        ])
        .await
        .expect("append");
    fan_out(f, 100).await;

    let newest = f
        .store
        .list_events(&EventFilter {
            limit: 2,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(
        newest
            .iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>(),
        vec!["order.shipped", "user.created"]
    );
    let created = f
        .store
        .list_events(&EventFilter {
            event_type: Some("order.created".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(created.len(), 2);
    let skipped = f
        .store
        .list_events(&EventFilter {
            status: Some(EventStatus::Skipped),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].event_type, "user.created");

    let history = f.store.entity_history("order", "A").await.expect("history");
    assert_eq!(
        history
            .iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>(),
        vec!["order.created", "order.paid", "order.shipped"]
    );
    assert!(f
        .store
        .entity_history("order", "nope")
        .await
        .expect("history")
        .is_empty());
}

/// `{"pad": "xx…"}` of exactly `bytes` bytes, written the way Postgres prints jsonb, so
/// both backends measure the same size.
fn padded_json(bytes: usize) -> String {
    format!("{{\"pad\": \"{}\"}}", "x".repeat(bytes - 11))
}

const SEED: &str = "event_type, entity_type, entity_id, event_data";

/// Rows a careless or hostile producer can write: each is settled by itself, with a
/// reason naming what is wrong; fan-out never fails, a second pass finds nothing left,
/// every row can be listed and shown, and the good events (even of the same entity,
/// after a bad one) are delivered.
async fn hostile_rows_settle_one_by_one_and_the_rest_flows(f: &Fixture) {
    let request = FanOutRequest {
        max_event_bytes: 100,
        ..FanOutRequest::new(100)
    };
    let mut dead: Vec<(i64, String)> = Vec::new();
    let mut good: Vec<i64> = Vec::new();

    good.push(f.store.append(&order("o-1", 1)).await.expect("append"));
    let id = f
        .insert(SEED, "'order.created', 'order', 'o-1', NULL")
        .await;
    dead.push((id, "event_data is NULL".into()));
    let id = f
        .insert(
            SEED,
            &format!("'order.created', 'order', 'o-1', '{}'", padded_json(101)),
        )
        .await;
    dead.push((
        id,
        "event_data is 101 bytes, over the limit of 100 bytes ([dispatch] max_event_bytes)".into(),
    ));
    // Exactly at the limit is within it.
    good.push(
        f.insert(
            SEED,
            &format!("'order.created', 'order', 'o-1', '{}'", padded_json(100)),
        )
        .await,
    );
    let headers = "event_type, entity_type, entity_id, event_data, headers";
    let id = f
        .insert(
            headers,
            &format!(
                "'order.created', 'order', 'o-2', '{{}}', '{}'",
                padded_json(120)
            ),
        )
        .await;
    dead.push((
        id,
        "headers is 120 bytes, over the limit of 100 bytes ([dispatch] max_event_bytes)".into(),
    ));
    let id = f
        .insert(headers, "'order.created', 'order', 'o-2', '{}', '[1, 2]'")
        .await;
    dead.push((id, "headers is not a JSON object (found an array)".into()));
    // No headers at all, as SQL NULL or JSON null, is fine.
    good.push(
        f.insert(headers, "'order.created', 'order', 'o-2', '{}', NULL")
            .await,
    );
    good.push(
        f.insert(headers, "'order.created', 'order', 'o-2', '{}', 'null'")
            .await,
    );
    let unknown = f.insert(SEED, "'no.such.type', 'order', 'o-2', '{}'").await;
    // The routing and ordering keys are NOT NULL: the producer's INSERT itself fails.
    for column in ["event_type", "entity_type", "entity_id"] {
        let values = SEED
            .split(", ")
            .map(|c| match c {
                c if c == column => "NULL",
                "event_data" => "'{}'",
                _ => "'order.created'",
            })
            .collect::<Vec<_>>()
            .join(", ");
        let refused = f
            .try_exec(&format!("INSERT INTO events ({SEED}) VALUES ({values})"))
            .await;
        assert!(refused.is_err(), "NULL {column} was accepted");
    }

    if f.is_sqlite() {
        // SQLite keeps whatever bytes it is given in a TEXT column.
        let id = f
            .insert(SEED, "CAST(x'6f72ff' AS TEXT), 'order', 'o-3', '{}'")
            .await;
        dead.push((
            id,
            "event_type is not valid UTF-8 (invalid utf-8 sequence of 1 bytes from index 2)".into(),
        ));
        let id = f
            .insert(
                "event_type, entity_type, entity_id, event_data, headers, idempotency_key",
                "'order.created', 'order', CAST(x'ff' AS TEXT), CAST(x'7bfe7d' AS TEXT), \
                 'tenant=acme', CAST(x'c3' AS TEXT)",
            )
            .await;
        dead.push((
            id,
            [
                "entity_id is not valid UTF-8 (invalid utf-8 sequence of 1 bytes from index 0)",
                "idempotency_key is not valid UTF-8 (incomplete utf-8 byte sequence from index 0)",
                "headers is not valid JSON: expected ident at line 1 column 2",
                "event_data is not valid UTF-8 (invalid utf-8 sequence of 1 bytes from index 1)",
            ]
            .join("; "),
        ));
        let id = f
            .insert(SEED, "'order.created', 'order', 'o-3', '{\"total\": '")
            .await;
        dead.push((
            id,
            "event_data is not valid JSON: EOF while parsing a value at line 1 column 10".into(),
        ));
        let id = f
            .insert(
                "event_type, entity_type, entity_id, event_data, created_at",
                "'order.created', 'order', 'o-3', '{}', 'yesterday'",
            )
            .await;
        dead.push((id, "timestamp 'yesterday' is not ISO-8601".into()));
        // A BLOB holding UTF-8 text (a driver binding bytes) is read as that text.
        good.push(
            f.insert(SEED, "'order.created', 'order', 'o-3', x'7b7d'")
                .await,
        );
    } else {
        // Postgres refuses what jsonb cannot hold in the producer's own transaction.
        for data in ["'{\"total\": '", "'tenant=acme'"] {
            let refused = f
                .try_exec(&format!(
                    "INSERT INTO events ({SEED}) VALUES ('order.created', 'order', 'o-3', {data})"
                ))
                .await;
            assert!(refused.is_err(), "jsonb took {data}");
        }
    }
    // The last word of entity o-1: after its bad events, and still delivered.
    good.push(f.store.append(&order("o-1", 9)).await.expect("append"));

    let report = f.store.fan_out(&request, &router).await.expect("fan out");
    assert_eq!(report.malformed, dead.len(), "{report:?}");
    assert_eq!(report.skipped, 1, "{report:?}");
    assert_eq!(report.routed, good.len(), "{report:?}");
    let again = f.store.fan_out(&request, &router).await.expect("fan out");
    assert_eq!(again.events(), 0, "a second pass meets nothing: no loop");

    for (id, reason) in &dead {
        let (status, got) = status_of(f, *id).await;
        assert_eq!(status, EventStatus::Dead, "event {id}");
        assert_eq!(got.as_deref(), Some(reason.as_str()), "event {id}");
        let detail = f
            .store
            .event_detail(*id)
            .await
            .expect("detail")
            .expect("found");
        assert!(detail.deliveries.is_empty(), "event {id} has no delivery");
    }
    assert_eq!(
        status_of(f, unknown).await,
        (
            EventStatus::Skipped,
            Some("no route matches event_type 'no.such.type'".into())
        )
    );
    let listed = f
        .store
        .list_events(&EventFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("every row can be listed");
    assert_eq!(listed.len(), dead.len() + good.len() + 1);

    let mut delivered = Vec::new();
    loop {
        let claimed = claim(f, "a", 100).await;
        if claimed.is_empty() {
            break;
        }
        for delivery in claimed {
            assert!(good.contains(&delivery.event.event_id), "{delivery:?}");
            delivered.push(delivery.event.event_id);
            complete_one(f, &delivery, "a", Outcome::delivered()).await;
        }
    }
    delivered.sort_unstable();
    assert_eq!(delivered, good, "every good event, in each entity's order");
}

/// The characters that break hand-built SQL, in every text column the producer writes:
/// what is claimed is byte for byte what was written, and lookups by them find it.
async fn sql_meta_characters_round_trip(f: &Fixture) {
    let meta = "'\";--\\%_$1 ' OR '1'='1 /* */";
    // Postgres text cannot hold NUL; SQLite's can.
    let nul = if f.is_sqlite() { "\0" } else { "" };
    let mut event = NewEvent::new(
        format!("order.{meta}{nul}"),
        format!("type{meta}{nul}"),
        format!("id{meta}{nul}"),
        json!({ meta: format!("{meta}{nul}"), "n": [meta] }),
    )
    .with_target(format!("target{meta}"))
    .with_key(format!("key{meta}{nul}"));
    event.headers = Some(serde_json::Map::from_iter([(
        format!("h{meta}"),
        json!(format!("v{meta}{nul}")),
    )]));
    let id = f.store.append(&event).await.expect("append");
    let unrouted = f
        .store
        .append(&NewEvent::new(format!("x{meta}"), "t", "1", json!({})))
        .await
        .expect("append");

    let report = fan_out(f, 10).await;
    assert_eq!((report.routed, report.skipped), (1, 1), "{report:?}");
    assert_eq!(
        status_of(f, unrouted).await.1,
        Some(format!("no route matches event_type 'x{meta}'"))
    );
    let claimed = claim(f, "a", 10).await;
    assert_eq!(claimed.len(), 1);
    let got = &claimed[0].event;
    assert_eq!(got.event_id, id);
    assert_eq!(got.event_type, event.event_type);
    assert_eq!(got.entity_type, event.entity_type);
    assert_eq!(got.entity_id, event.entity_id);
    assert_eq!(got.event_target, event.event_target);
    assert_eq!(got.idempotency_key, event.idempotency_key);
    assert_eq!(claimed[0].idempotency_key, format!("key{meta}{nul}"));
    let data: serde_json::Value =
        serde_json::from_str(got.event_data.as_deref().unwrap_or_default()).expect("JSON");
    assert_eq!(data, event.event_data);
    let headers: serde_json::Value =
        serde_json::from_str(got.headers.as_deref().unwrap_or_default()).expect("JSON");
    assert_eq!(headers, json!(event.headers));

    let history = f
        .store
        .entity_history(&event.entity_type, &event.entity_id)
        .await
        .expect("history");
    assert_eq!(history.len(), 1);
    let by_type = f
        .store
        .list_events(&EventFilter {
            event_type: Some(event.event_type.clone()),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(by_type.len(), 1, "'%' and '_' match only themselves");
}

async fn migrate_is_idempotent_and_schema_checks_pass(f: &Fixture) {
    f.store.migrate().await.expect("second migrate");
    f.store.check_schema().await.expect("schema is current");
}

async fn a_quarantined_plugins_routes_are_left_unclaimed(f: &Fixture) {
    // payment.* goes to "ledger" and "audit": pausing "ledger" leaves "audit" flowing.
    f.store
        .append(&NewEvent::new(
            "payment.captured",
            "payment",
            "p1",
            json!({}),
        ))
        .await
        .expect("append");
    fan_out(f, 100).await;
    let paused = ClaimRequest {
        paused_routes: vec!["ledger".into()],
        ..claim_request("w", 10)
    };
    let claimed = f.store.claim(&paused).await.expect("claim");
    let routes: Vec<&str> = claimed.iter().map(|c| c.route.as_str()).collect();
    assert_eq!(routes, ["audit"]);
    assert!(f.store.claim(&paused).await.expect("claim").is_empty());
    let resumed = claim(f, "w", 10).await;
    assert_eq!(resumed.len(), 1);
    assert_eq!(resumed[0].route, "ledger");

    // The verdict: the first instance to reach it records it, the others find it there.
    assert!(f.store.quarantined().await.expect("list").is_empty());
    assert!(f
        .store
        .quarantine(
            "webhook",
            "10 consecutive faults; last: plugin trapped: x",
            10
        )
        .await
        .expect("quarantine"));
    assert!(!f
        .store
        .quarantine("webhook", "again", 11)
        .await
        .expect("quarantine again"));
    let listed = f.store.quarantined().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].plugin, "webhook");
    assert_eq!(listed[0].faults, 10);
    assert!(
        listed[0].reason.ends_with("plugin trapped: x"),
        "{listed:?}"
    );
    assert!(f.store.resume("webhook").await.expect("resume"));
    assert!(!f.store.resume("webhook").await.expect("resume twice"));
    assert!(f.store.quarantined().await.expect("list").is_empty());
}

// ---------------------------------------------------------------------------------------

/// Fan out with a grant to start what is due: (event, route) of each started delivery.
async fn fan_out_starting(f: &Fixture, grant: &ClaimRequest) -> Vec<store::ClaimedDelivery> {
    let (_, started) = f
        .store
        .fan_out_starting(&FanOutRequest::new(10), Some(grant), &router)
        .await
        .expect("fan out");
    assert!(started.queued.is_empty(), "queued with no room to queue");
    started.now
}

fn started_pairs(started: &[store::ClaimedDelivery]) -> HashSet<(i64, String)> {
    started
        .iter()
        .map(|d| (d.event.event_id, d.route.clone()))
        .collect()
}

async fn fan_out_starts_what_is_due_and_leaves_the_rest_to_claims(f: &Fixture) {
    let a1 = f.store.append(&order("A", 1)).await.expect("append");
    let a2 = f.store.append(&order("A", 2)).await.expect("append");
    let b1 = f.store.append(&order("B", 1)).await.expect("append");
    let p1 = f
        .store
        .append(&NewEvent::new(
            "payment.made",
            "payment",
            "P",
            json!({ "n": 7 }),
        ))
        .await
        .expect("append");

    let started = fan_out_starting(f, &claim_request("alpha", 10)).await;
    assert_eq!(
        started_pairs(&started),
        HashSet::from([
            (a1, "orders".to_string()),
            (b1, "orders".to_string()),
            (p1, "ledger".to_string()),
            (p1, "audit".to_string()),
        ]),
        "A's second event waits behind its first"
    );
    for delivery in &started {
        assert_eq!(delivery.attempt, 1);
        assert_eq!(
            delivery.idempotency_key,
            format!("herald-{}-{}", delivery.event.event_id, delivery.route)
        );
        assert_eq!(delivery.event.event_status, EventStatus::Ready);
        let data: serde_json::Value =
            serde_json::from_str(delivery.event.event_data.as_deref().expect("payload"))
                .expect("JSON payload");
        assert!(data.get("n").is_some(), "{data}");
        assert!(delivery.already_completed.is_none());
    }
    assert!(
        claim(f, "beta", 10).await.is_empty(),
        "started deliveries are leased; A's second waits"
    );

    let first_a = started
        .iter()
        .find(|d| d.event.event_id == a1)
        .expect("a1 started");
    assert!(matches!(
        complete_one(f, first_a, "alpha", Outcome::delivered()).await,
        CompletionResult::Committed { .. }
    ));
    let next = claim(f, "beta", 10).await;
    assert_eq!(
        next.iter().map(|d| d.event.event_id).collect::<Vec<_>>(),
        vec![a2]
    );

    // An open delivery from an earlier pass holds the entity's new event back too.
    let a3 = f.store.append(&order("A", 3)).await.expect("append");
    assert!(fan_out_starting(f, &claim_request("alpha", 10))
        .await
        .is_empty());
    complete_one(f, &next[0], "beta", Outcome::delivered()).await;
    let last = claim(f, "beta", 10).await;
    assert_eq!(
        last.iter().map(|d| d.event.event_id).collect::<Vec<_>>(),
        vec![a3]
    );
}

/// An event whose only delivery closes is settled from that delivery, with no read of the
/// event's deliveries: fan-out, which writes all of an event's deliveries at once, marks
/// such a delivery as alone, and the close returns the mark. An event with several
/// deliveries is settled from all of them, once all have closed.
///
/// The store never adds a delivery to an event after its fan-out; the test writes one by
/// hand beside an alone delivery, as only an operator could, to show that the settle does
/// not read it: read, the open delivery would keep the event from settling.
async fn an_event_whose_only_delivery_closes_is_settled_from_that_delivery(f: &Fixture) {
    let created = f.store.append(&order("o-1", 1)).await.expect("append");
    let paid = f
        .store
        .append(&NewEvent::new(
            "payment.captured",
            "order",
            "o-2",
            json!({}),
        ))
        .await
        .expect("append");
    fan_out(f, 100).await;
    let alone = |event_id: i64| {
        format!("SELECT count(*) FROM herald_deliveries WHERE event_id = {event_id} AND alone")
    };
    assert_eq!(f.count(&alone(created)).await, 1, "one route: alone");
    assert_eq!(f.count(&alone(paid)).await, 0, "two routes: not alone");

    let claimed = claim(f, "alpha", 10).await;
    assert_eq!(claimed.len(), 3, "every delivery is due");
    f.exec(&format!(
        "INSERT INTO herald_deliveries (event_id, route, entity_type, entity_id, ordered, \
           idempotency_key) VALUES ({created}, 'by-hand', 'order', 'o-1', false, 'by-hand')"
    ))
    .await;
    let (audit, others): (Vec<_>, Vec<_>) = claimed
        .iter()
        .partition(|c| c.event.event_id == paid && c.route == "audit");
    let delivered: Vec<Completion> = others
        .iter()
        .map(|c| Completion::for_claim(c, "alpha", Outcome::delivered()))
        .collect();
    f.store.complete(&delivered).await.expect("complete");
    assert_eq!(
        status_of(f, created).await.0,
        EventStatus::Success,
        "settled alone"
    );
    assert_eq!(
        status_of(f, paid).await.0,
        EventStatus::Ready,
        "one of two deliveries is still open"
    );
    let dead = Outcome::Dead {
        reason: "gone".into(),
    };
    complete_one(f, audit[0], "alpha", dead).await;
    assert_eq!(
        status_of(f, paid).await,
        (EventStatus::Dead, Some("route audit: gone".into())),
        "settled from both"
    );
}

/// The stored row of a claimed delivery, read with its event's detail.
async fn stored(f: &Fixture, claimed: &store::ClaimedDelivery) -> store::Delivery {
    let detail = f
        .store
        .event_detail(claimed.event.event_id)
        .await
        .expect("detail")
        .expect("event exists");
    detail
        .deliveries
        .into_iter()
        .find(|d| d.delivery_id == claimed.delivery_id)
        .expect("the event has the delivery")
}

/// A delivery fan-out leases is next due when its lease runs out (which keeps it out of
/// the claims' way while it runs), and at once when it is given back; closed, it is not
/// dated in the future.
async fn a_started_delivery_is_due_when_its_lease_ends_or_once_given_back(f: &Fixture) {
    let a1 = f.store.append(&order("A", 1)).await.expect("append");
    let b1 = f.store.append(&order("B", 1)).await.expect("append");
    let before = chrono::Utc::now();
    let started = fan_out_starting(f, &claim_request("alpha", 10)).await;
    assert_eq!(started.len(), 2);
    for leased in &started {
        let row = stored(f, leased).await;
        let lease_end = row.locked_until.expect("leased at fan-out");
        assert_eq!(row.next_attempt_at, lease_end, "due when the lease ends");
        assert!(
            row.next_attempt_at >= before + chrono::Duration::seconds(59),
            "{} is the lease's end, not the insert",
            row.next_attempt_at
        );
    }
    assert!(claim(f, "beta", 10).await.is_empty(), "both leases hold");

    let given_back = started
        .iter()
        .find(|d| d.event.event_id == a1)
        .expect("a1 started");
    assert_eq!(
        f.store
            .release("alpha", &[given_back.delivery_id])
            .await
            .expect("release"),
        1
    );
    let again = claim(f, "beta", 10).await;
    assert_eq!(
        again.iter().map(|d| d.delivery_id).collect::<Vec<_>>(),
        vec![given_back.delivery_id],
        "given back, it is due at once"
    );

    let kept = started
        .iter()
        .find(|d| d.event.event_id == b1)
        .expect("b1 started");
    complete_one(f, kept, "alpha", Outcome::delivered()).await;
    let closed = stored(f, kept).await;
    assert_eq!(closed.status, DeliveryStatus::Success);
    assert!(
        closed.next_attempt_at <= chrono::Utc::now(),
        "a closed delivery is not dated at its old lease's end: {}",
        closed.next_attempt_at
    );
}

async fn fan_out_starts_no_more_than_granted_and_nothing_paused(f: &Fixture) {
    let p1 = f
        .store
        .append(&NewEvent::new("payment.made", "payment", "P", json!({})))
        .await
        .expect("append");
    let c1 = f.store.append(&order("C", 1)).await.expect("append");
    let d1 = f.store.append(&order("D", 1)).await.expect("append");
    let grant = ClaimRequest {
        paused_routes: vec!["ledger".into()],
        ..claim_request("alpha", 2)
    };
    let started = fan_out_starting(f, &grant).await;
    assert_eq!(
        started_pairs(&started),
        HashSet::from([(p1, "audit".to_string()), (c1, "orders".to_string())])
    );
    let rest = claim(f, "beta", 10).await;
    assert_eq!(
        started_pairs(&rest),
        HashSet::from([(p1, "ledger".to_string()), (d1, "orders".to_string())])
    );
}

async fn a_started_delivery_knows_a_purged_events_completed_key(f: &Fixture) {
    let first = f
        .store
        .append(&order("A", 1).with_key("k-9"))
        .await
        .expect("append");
    let started = fan_out_starting(f, &claim_request("alpha", 10)).await;
    assert_eq!(started.len(), 1);
    complete_one(f, &started[0], "alpha", Outcome::delivered()).await;

    // Retention purged the event; the ledger outlives it.
    f.exec(&format!(
        "DELETE FROM herald_attempts WHERE event_id = {first}"
    ))
    .await;
    f.exec(&format!(
        "DELETE FROM herald_deliveries WHERE event_id = {first}"
    ))
    .await;
    f.exec(&format!("DELETE FROM events WHERE event_id = {first}"))
        .await;
    f.store
        .append(&order("A", 2).with_key("k-9"))
        .await
        .expect("append");
    let again = fan_out_starting(f, &claim_request("alpha", 10)).await;
    assert_eq!(again.len(), 1);
    let ledger = again[0].already_completed.as_ref().expect("ledger entry");
    assert_eq!(ledger.event_id, first);
    assert_eq!(ledger.idempotency_key, "k-9");
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let fixture = super::sqlite_fixture().await;
                    super::$name(&fixture).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(schema) =
                        herald_tests::PgSchema::create(concat!("store_", stringify!($name))).await
                    else {
                        return;
                    };
                    let fixture = super::postgres_fixture(&schema).await;
                    super::$name(&fixture).await;
                    drop(fixture);
                    schema.drop().await;
                }
            )*
        }
    };
}

on_both_backends!(
    append_one_and_read_it_back,
    an_event_whose_only_delivery_closes_is_settled_from_that_delivery,
    bulk_append_is_all_or_nothing,
    producer_inserts_only_the_seed_columns,
    fan_out_routes_skips_and_refuses_visibly,
    late_duplicate_of_an_already_handled_key,
    concurrent_claimers_never_share_a_delivery,
    a_live_lease_holds_and_an_expired_one_is_taken_over,
    a_zero_lease_expires_at_once,
    completion_writes_attempt_ledger_emits_and_status_together,
    a_completed_key_is_reported_on_a_later_claim,
    retry_waits_then_succeeds_with_every_attempt_logged,
    dead_is_final_and_listed,
    later_events_of_an_entity_wait_for_earlier_ones,
    redrive_sends_dead_deliveries_again,
    unordered_routes_do_not_wait,
    a_lost_lease_in_a_batch_writes_nothing_for_it,
    release_returns_leases_without_spending_an_attempt,
    list_filters_and_entity_history,
    renewal_keeps_a_lease_alive_only_for_its_owner,
    backlog_counts_ready_events_and_waiting_retries,
    instances_show_heartbeats_and_held_leases,
    migrate_is_idempotent_and_schema_checks_pass,
    a_batch_of_mixed_outcomes_settles_each_event,
    concurrent_batches_on_the_same_events_both_count,
    the_same_outcomes_recorded_twice_at_once_neither_deadlocks,
    repeated_keys_within_one_fan_out_batch,
    a_quarantined_plugins_routes_are_left_unclaimed,
    hostile_rows_settle_one_by_one_and_the_rest_flows,
    sql_meta_characters_round_trip,
    fan_out_starts_what_is_due_and_leaves_the_rest_to_claims,
    fan_out_starts_no_more_than_granted_and_nothing_paused,
    a_started_delivery_knows_a_purged_events_completed_key,
    a_started_delivery_is_due_when_its_lease_ends_or_once_given_back,
);
