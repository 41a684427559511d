//! Postgres-only behaviour: interleaved producer commits and several Herald instances,
//! each with its own connection pool, on one database.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use herald::store::postgres::{outcome_batches, plans};
use herald::store::{
    self, ClaimRequest, ClaimedDelivery, Completion, CompletionResult, EventHead, EventStatus,
    EventStore, FanOutRequest, FanOutStarts, NewEvent, OpenOptions, Outcome, RoutePlan,
    WakeUpRequest,
};
use herald_tests::PgSchema;
use serde_json::json;
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection};

fn orders_route(_: &EventHead) -> Vec<RoutePlan> {
    vec![RoutePlan::ordered("orders")]
}

/// A store of one instance, with the batch ledger on (migration 0013): every test here
/// runs with it, the conformance suite without.
async fn instance(schema: &PgSchema) -> Arc<dyn EventStore> {
    let options = OpenOptions {
        batch_ledger: true,
        ..OpenOptions::default()
    };
    let store = store::open(&schema.url, options)
        .await
        .expect("open postgres store");
    store.migrate().await.expect("migrate");
    Arc::from(store)
}

async fn deliver_everything(store: &dyn EventStore, owner: &str) -> Vec<i64> {
    store
        .fan_out(&FanOutRequest::new(1000), &orders_route)
        .await
        .expect("fan out");
    let request = ClaimRequest {
        owner: owner.into(),
        limit: 100,
        lease: Duration::from_secs(60),
        paused_routes: Vec::new(),
    };
    let claimed = store.claim(&request).await.expect("claim");
    let completions: Vec<Completion> = claimed
        .iter()
        .map(|c| Completion::for_claim(c, owner, Outcome::delivered()))
        .collect();
    let results = store.complete(&completions).await.expect("complete");
    assert!(results
        .iter()
        .all(|r| matches!(r, CompletionResult::Committed { .. })));
    claimed.iter().map(|c| c.event.event_id).collect()
}

fn grant(owner: &str, limit: u32) -> ClaimRequest {
    ClaimRequest {
        owner: owner.into(),
        limit,
        lease: Duration::from_secs(60),
        paused_routes: Vec::new(),
    }
}

async fn fan_out_as(
    store: &dyn EventStore,
    owner: &str,
    start: u32,
    queue_behind: u32,
) -> FanOutStarts {
    let request = FanOutRequest {
        queue_behind,
        ..FanOutRequest::new(100)
    };
    let (_, starts) = store
        .fan_out_starting(&request, Some(&grant(owner, start)), &orders_route)
        .await
        .expect("fan out");
    starts
}

fn event_ids(deliveries: &[ClaimedDelivery]) -> Vec<i64> {
    deliveries.iter().map(|d| d.event.event_id).collect()
}

async fn append_order(store: &dyn EventStore, entity: &str) -> i64 {
    let event = NewEvent::new("order.created", "order", entity, json!({}));
    store.append(&event).await.expect("append")
}

/// Fan-out leases a new delivery behind a lane whose every open delivery its owner holds,
/// and says which one it waits for; a lane anyone else holds, or that waits for a claim,
/// is left to claims, and so is everything past the room it was given.
#[tokio::test]
async fn fan_out_queues_new_deliveries_behind_lanes_their_owner_holds() {
    let Some(schema) = PgSchema::create("store_pg_queue_behind_lanes").await else {
        return;
    };
    let store = instance(&schema).await;
    let unleased = append_order(&*store, "W").await;
    store
        .fan_out(&FanOutRequest::new(100), &orders_route)
        .await
        .expect("fan out without a grant");
    let held = append_order(&*store, "A").await;
    let other = append_order(&*store, "V").await;
    let first = fan_out_as(&*store, "alpha", 10, 0).await;
    assert_eq!(event_ids(&first.now), vec![held, other]);
    assert!(first.queued.is_empty());
    let held_id = first.now[0].delivery_id;

    // No slot free (start limit 0), room to queue 3.
    let a2 = append_order(&*store, "A").await;
    let a3 = append_order(&*store, "A").await;
    let w2 = append_order(&*store, "W").await;
    let c1 = append_order(&*store, "C").await;
    let v2 = append_order(&*store, "V").await;
    let queued = fan_out_as(&*store, "alpha", 0, 3).await;
    assert!(queued.now.is_empty());
    let order: Vec<(i64, Option<i64>)> = queued
        .queued
        .iter()
        .map(|q| (q.delivery.event.event_id, q.behind))
        .collect();
    let a2_id = queued.queued[0].delivery.delivery_id;
    assert_eq!(
        order,
        vec![(a2, Some(held_id)), (a3, Some(a2_id)), (c1, None)],
        "A queues behind its held delivery, then behind its own batch; W waits for a \
         claim; C is due at once; V is past the room"
    );
    assert!(queued.queued.iter().all(|q| q.delivery.attempt == 1));

    // Another instance leases nothing behind alpha's lanes.
    let a4 = append_order(&*store, "A").await;
    let beta = fan_out_as(&*store, "beta", 10, 10).await;
    assert!(beta.now.is_empty() && beta.queued.is_empty(), "{beta:?}");

    // Queued leases are not claimable: beta's claim takes only the lanes' heads that
    // no one holds (W's first; V's second waits behind alpha's first).
    let claimed = store.claim(&grant("beta", 100)).await.expect("claim");
    assert_eq!(event_ids(&claimed), vec![unleased]);
    let _ = (w2, v2, a4);
    schema.drop().await;
}

/// The classic outbox bug: a relay that remembers "highest id processed" skips an event
/// whose transaction took its id early but committed after a higher id was processed.
#[tokio::test]
async fn an_event_committed_after_a_higher_id_was_delivered_is_still_delivered() {
    let Some(schema) = PgSchema::create("store_pg_outbox_late_commit").await else {
        return;
    };
    let store = instance(&schema).await;

    let mut slow_producer = PgConnection::connect(&schema.url)
        .await
        .expect("producer connection");
    let mut slow_tx = slow_producer.begin().await.expect("begin");
    let late_id: i64 = sqlx::query_scalar(
        "INSERT INTO events (event_type, entity_type, entity_id, event_data) \
         VALUES ('order.created', 'order', 'late', '{}') RETURNING event_id",
    )
    .fetch_one(&mut *slow_tx)
    .await
    .expect("insert in the slow transaction");

    let early_id = store
        .append(&NewEvent::new("order.created", "order", "early", json!({})))
        .await
        .expect("append");
    assert!(
        late_id < early_id,
        "the slow transaction holds the lower id"
    );
    assert_eq!(deliver_everything(&*store, "relay").await, vec![early_id]);

    slow_tx.commit().await.expect("late commit");
    assert_eq!(deliver_everything(&*store, "relay").await, vec![late_id]);
    for id in [late_id, early_id] {
        let detail = store
            .event_detail(id)
            .await
            .expect("detail")
            .expect("found");
        assert_eq!(
            detail.event.event_status,
            EventStatus::Success,
            "event {id}"
        );
        assert_eq!(detail.attempts.len(), 1, "event {id} delivered once");
    }
    drop(store);
    schema.drop().await;
}

/// Two instances with their own pools race to fan out and claim the same backlog: every
/// delivery is created once and claimed by exactly one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_a_backlog_without_double_claims() {
    let Some(schema) = PgSchema::create("store_pg_two_instances").await else {
        return;
    };
    let a = instance(&schema).await;
    let b = instance(&schema).await;
    let events: Vec<NewEvent> = (0..400)
        .map(|n| {
            NewEvent::new(
                "order.created",
                "order",
                format!("o-{}", n % 50),
                json!({ "n": n }),
            )
        })
        .collect();
    a.append_batch(&events).await.expect("append");

    let run = |store: Arc<dyn EventStore>, owner: &'static str| {
        tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut idle_rounds = 0;
            while idle_rounds < 3 {
                store
                    .fan_out(&FanOutRequest::new(64), &orders_route)
                    .await
                    .expect("fan out");
                let request = ClaimRequest {
                    owner: owner.into(),
                    limit: 16,
                    lease: Duration::from_secs(60),
                    paused_routes: Vec::new(),
                };
                let claimed = store.claim(&request).await.expect("claim");
                if claimed.is_empty() {
                    idle_rounds += 1;
                    tokio::task::yield_now().await;
                    continue;
                }
                idle_rounds = 0;
                let completions: Vec<Completion> = claimed
                    .iter()
                    .map(|c| Completion::for_claim(c, owner, Outcome::delivered()))
                    .collect();
                store.complete(&completions).await.expect("complete");
                mine.extend(claimed.iter().map(|c| c.delivery_id));
            }
            mine
        })
    };
    let (from_a, from_b) = tokio::join!(run(a.clone(), "a"), run(b.clone(), "b"));
    let (from_a, from_b) = (from_a.expect("instance a"), from_b.expect("instance b"));

    let all: HashSet<i64> = from_a.iter().chain(from_b.iter()).copied().collect();
    assert_eq!(
        all.len(),
        from_a.len() + from_b.len(),
        "no delivery claimed by both"
    );
    let remaining = a
        .list_events(&store::EventFilter {
            status: Some(EventStatus::Ready),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("list");
    assert!(remaining.is_empty(), "left READY: {remaining:?}");
    assert_eq!(all.len(), 400, "one delivery per event, each delivered");
    drop((a, b));
    schema.drop().await;
}

/// The insert trigger notifies listeners once an instance asked: a waiting dispatcher
/// wakes without polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_wakes_a_listener() {
    let Some(schema) = PgSchema::create("store_pg_notify").await else {
        return;
    };
    let store = instance(&schema).await;
    let wake = Arc::new(tokio::sync::Notify::new());
    assert!(store
        .watch_new_events(Arc::downgrade(&wake))
        .await
        .expect("listen"));
    assert_ne!(
        store.request_wake_ups().await.expect("ask"),
        WakeUpRequest::Unneeded
    );
    let woken = wake.notified();

    let mut producer = PgConnection::connect(&schema.url).await.expect("producer");
    sqlx::query(
        "INSERT INTO events (event_type, entity_type, entity_id, event_data) \
         VALUES ('order.created', 'order', '1', '{}')",
    )
    .execute(&mut producer)
    .await
    .expect("insert");
    tokio::time::timeout(Duration::from_secs(10), woken)
        .await
        .expect("the listener was woken by the insert");
    drop(store);
    schema.drop().await;
}

/// The next notification on `herald_events` that `producer` (a backend pid) sent; other
/// tests' producers share the database and the channel.
async fn next_notification_from(listener: &mut PgListener, producer: i32) -> String {
    loop {
        let notification = tokio::time::timeout(Duration::from_secs(30), listener.recv())
            .await
            .expect("a notification within 30s")
            .expect("listener");
        if i64::from(notification.process_id()) == i64::from(producer) {
            return notification.payload().to_owned();
        }
    }
}

/// Ask for wake-ups as an instance does; whether no producer that may have missed the
/// request is still in flight.
async fn request_settled(herald: &mut PgConnection) -> bool {
    sqlx::query_scalar("SELECT herald_request_wake_ups()")
        .fetch_one(herald)
        .await
        .expect("request")
}

async fn insert_order(producer: &mut PgConnection) {
    sqlx::query(
        "INSERT INTO events (event_type, entity_type, entity_id, event_data) \
         VALUES ('order.created', 'order', '1', '{}')",
    )
    .execute(&mut *producer)
    .await
    .expect("insert");
}

/// Producers send a wake-up only between an instance's request and the fan-out that
/// stops it: an insert then commits without taking Postgres's cluster-wide notify lock.
/// (A marker NOTIFY sent after the insert arrives first when the insert sent none:
/// notifications arrive in commit order.)
#[tokio::test]
async fn producers_send_wake_ups_only_while_an_instance_asks() {
    let Some(schema) = PgSchema::create("store_pg_wake_ups").await else {
        return;
    };
    let store = instance(&schema).await;
    let mut listener = PgListener::connect(&schema.url).await.expect("listener");
    listener.listen("herald_events").await.expect("listen");
    let mut producer = PgConnection::connect(&schema.url).await.expect("producer");
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut producer)
        .await
        .expect("pid");
    let marker = |text: &'static str| format!("NOTIFY herald_events, '{text}'");

    // Nobody asked yet (the state after migrating).
    insert_order(&mut producer).await;
    sqlx::raw_sql(&marker("after an insert nobody asked about"))
        .execute(&mut producer)
        .await
        .expect("marker");
    assert_eq!(
        next_notification_from(&mut listener, pid).await,
        "after an insert nobody asked about",
        "an insert sent a wake-up nobody asked for"
    );

    assert_ne!(
        store.request_wake_ups().await.expect("ask"),
        WakeUpRequest::Unneeded
    );
    insert_order(&mut producer).await;
    assert_eq!(next_notification_from(&mut listener, pid).await, "");

    let stop = FanOutRequest {
        stop_wake_ups: true,
        ..FanOutRequest::new(100)
    };
    store.fan_out(&stop, &orders_route).await.expect("fan out");
    insert_order(&mut producer).await;
    sqlx::raw_sql(&marker("after the unannounced insert"))
        .execute(&mut producer)
        .await
        .expect("marker");
    assert_eq!(
        next_notification_from(&mut listener, pid).await,
        "after the unannounced insert",
        "an insert sent a wake-up after fan-out stopped them"
    );

    // A fan-out that does not stop them leaves a request standing.
    assert_ne!(
        store.request_wake_ups().await.expect("ask"),
        WakeUpRequest::Unneeded
    );
    store
        .fan_out(&FanOutRequest::new(100), &orders_route)
        .await
        .expect("fan out");
    insert_order(&mut producer).await;
    assert_eq!(
        next_notification_from(&mut listener, pid).await,
        "",
        "an insert sent no wake-up though an instance asked"
    );
    drop(store);
    schema.drop().await;
}

/// An instance that asks for wake-ups while a producer that read "not asked" is still in
/// flight must not take its last look before that producer ends: the producer's events
/// would then be announced by nothing. The request says so until the producer commits.
#[tokio::test]
async fn a_request_for_wake_ups_is_settled_only_once_producers_that_missed_it_end() {
    let Some(schema) = PgSchema::create("store_pg_wake_up_race").await else {
        return;
    };
    let store = instance(&schema).await;
    let stop = FanOutRequest {
        stop_wake_ups: true,
        ..FanOutRequest::new(100)
    };
    store.fan_out(&stop, &orders_route).await.expect("fan out");

    let mut producer = PgConnection::connect(&schema.url).await.expect("producer");
    let mut in_flight = producer.begin().await.expect("begin");
    insert_order(&mut in_flight).await;
    let mut herald = PgConnection::connect(&schema.url).await.expect("herald");
    for _ in 0..3 {
        assert!(
            !request_settled(&mut herald).await,
            "settled while a producer that missed the request is in flight"
        );
    }
    in_flight.commit().await.expect("commit");
    // Other tests' producers share the lock's key (the database is shared): wait them out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !request_settled(&mut herald).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not settled within 30s of the producer's commit"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The look that follows finds the producer's event.
    let report = store
        .fan_out(&FanOutRequest::new(100), &orders_route)
        .await
        .expect("fan out");
    assert_eq!(report.events(), 1);
    drop(store);
    schema.drop().await;
}

/// Every node of a plan (`EXPLAIN (FORMAT JSON)`'s `Plan`), depth first.
fn plan_nodes<'p>(node: &'p serde_json::Value, nodes: &mut Vec<&'p serde_json::Value>) {
    nodes.push(node);
    for child in node["Plans"].as_array().into_iter().flatten() {
        plan_nodes(child, nodes);
    }
}

/// The scans of a plan that could read a whole table: a sequential scan, or an index scan
/// without a condition on the index (a walk over all of it), as (node, index or table).
fn unbounded_scans(plan: &serde_json::Value) -> Vec<(String, String)> {
    let mut nodes = Vec::new();
    plan_nodes(plan, &mut nodes);
    nodes
        .into_iter()
        .filter_map(|node| {
            let kind = node["Node Type"].as_str().unwrap_or_default();
            let on = node["Index Name"]
                .as_str()
                .or(node["Relation Name"].as_str())
                .unwrap_or_default();
            let index_scan = matches!(kind, "Index Scan" | "Index Only Scan" | "Bitmap Index Scan");
            (kind == "Seq Scan" || (index_scan && node.get("Index Cond").is_none()))
                .then(|| (kind.to_owned(), on.to_owned()))
        })
        .collect()
}

/// Prepare `statement` as `name` and return its plan as `EXPLAIN (options…, FORMAT JSON)`
/// gives it for `arguments` (SQL literals; `None` plans it with every parameter NULL).
async fn explain_prepared(
    conn: &mut PgConnection,
    name: &str,
    statement: &str,
    arguments: Option<&str>,
    options: &[&str],
) -> serde_json::Value {
    sqlx::raw_sql(&format!("PREPARE {name} AS {statement}"))
        .execute(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("prepare {name}: {e}"));
    let arguments = match arguments {
        Some(arguments) => arguments.to_owned(),
        None => {
            let parameters: i32 = sqlx::query_scalar(
                "SELECT cardinality(parameter_types) FROM pg_prepared_statements WHERE name = $1",
            )
            .bind(name)
            .fetch_one(&mut *conn)
            .await
            .expect("parameter count");
            vec!["NULL"; usize::try_from(parameters).expect("count")].join(", ")
        }
    };
    let options = [options, &["FORMAT JSON"]].concat().join(", ");
    sqlx::query_scalar(&format!("EXPLAIN ({options}) EXECUTE {name}({arguments})"))
        .fetch_one(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("explain {name}: {e}"))
}

/// The unbounded scans of `statement`'s plan (see [`explain_prepared`]).
async fn unbounded_scans_of(
    conn: &mut PgConnection,
    name: &str,
    statement: &str,
    arguments: Option<&str>,
) -> Vec<(String, String)> {
    let plan = explain_prepared(conn, name, statement, arguments, &[]).await;
    unbounded_scans(&plan[0]["Plan"])
}

/// Walks that are meant: the fan-out queue holds only the new events, in order, and the
/// walk stops at the batch limit; whether any delivery is open stops at the first entry
/// of the open deliveries' index; the claims table holds only open claims (migration
/// 0013), and is read whole.
const BOUNDED_WALKS: &[(&str, &str)] = &[
    ("take_new_events", "herald_fan_out_queue_pkey"),
    ("take_new_events", "herald_deliveries_lane"),
    ("take_new_events", "herald_claims"),
    ("lane_items", "herald_claims"),
    ("lane_items", "herald_deliveries_lane"),
];

/// A store migrated in `schema`, and a connection of its own inside a transaction begun
/// as fan-out and outcomes begin theirs.
async fn in_a_planned_once_transaction(schema: &PgSchema) -> (Arc<dyn EventStore>, PgConnection) {
    let store = instance(schema).await;
    let mut conn = PgConnection::connect(&schema.url)
        .await
        .expect("plan connection");
    sqlx::raw_sql(plans::PLAN_ONCE)
        .execute(&mut conn)
        .await
        .expect("begin as fan-out and outcomes do");
    (store, conn)
}

/// Fan-out and outcome statements are planned once per connection and the plan kept
/// (plans.rs): a plan made while the tables were empty must still be led by the ids,
/// lanes and keys each statement names once the tables are large.
#[tokio::test]
async fn statements_planned_once_reach_tables_only_through_what_they_name() {
    let Some(schema) = PgSchema::create("store_pg_plans").await else {
        return;
    };
    let (store, mut conn) = in_a_planned_once_transaction(&schema).await;
    let mut offenders = Vec::new();
    for (name, statement) in plans::planned_once() {
        let found = unbounded_scans_of(&mut conn, name, statement, None).await;
        offenders.extend(
            found
                .into_iter()
                .filter(|(_, on)| !BOUNDED_WALKS.contains(&(name, on.as_str())))
                .map(|(kind, on)| format!("{name}: {kind} on {on}")),
        );
    }
    assert!(
        offenders.is_empty(),
        "plans made on empty tables that read a whole table or index: {offenders:#?}"
    );
    drop(conn);
    drop(store);
    schema.drop().await;
}

/// Fan-out's take turns each event's payload and headers into text once, in a node of
/// its own, not once per use in the scan of `events`: there, two lengths and the value
/// each ran `jsonb`'s output function again (history, twenty-seventh refresh).
#[tokio::test]
async fn the_take_turns_each_payload_into_text_once() {
    let Some(schema) = PgSchema::create("store_pg_take_text").await else {
        return;
    };
    let (store, mut conn) = in_a_planned_once_transaction(&schema).await;
    let plan = explain_prepared(
        &mut conn,
        "take",
        herald::store::postgres::claims::TAKE_NEW_EVENTS.as_str(),
        Some("500, 1, 1048576, false, 'owner'"),
        &["VERBOSE"],
    )
    .await;
    let mut nodes = Vec::new();
    plan_nodes(&plan[0]["Plan"], &mut nodes);
    let outputs = |node: &serde_json::Value| -> Vec<String> {
        node["Output"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|column| column.as_str().map(str::to_owned))
            .collect()
    };
    let events_scans: Vec<Vec<String>> = nodes
        .iter()
        .filter(|node| node["Relation Name"] == "events")
        .map(|node| outputs(node))
        .collect();
    assert_eq!(events_scans.len(), 1, "one scan of events: {plan:#}");
    assert!(
        events_scans[0]
            .iter()
            .all(|column| !column.contains("::text")),
        "the scan of events converts to text itself: {:?}",
        events_scans[0]
    );
    let converting: Vec<Vec<String>> = nodes
        .iter()
        .map(|node| outputs(node))
        .filter(|columns| {
            columns.iter().any(|c| c == "(e.event_data)::text")
                && columns.iter().any(|c| c == "(e.headers)::text")
        })
        .collect();
    assert_eq!(
        converting.len(),
        1,
        "one node turns payload and headers into text: {plan:#}"
    );
    drop(conn);
    drop(store);
    schema.drop().await;
}

/// An event inserted inside a fan-out or outcome transaction (an emitted event, a dead
/// notice) runs the event trigger, whose read of the wake-up sequence can only be a
/// sequential scan; priced as a disabled one, it must still not be compiled by JIT.
#[tokio::test]
async fn statements_in_planned_once_transactions_are_not_compiled() {
    let Some(schema) = PgSchema::create("store_pg_no_jit").await else {
        return;
    };
    let (store, mut conn) = in_a_planned_once_transaction(&schema).await;
    let (plan,): (serde_json::Value,) = sqlx::query_as(
        "EXPLAIN (ANALYZE, FORMAT JSON) SELECT last_value FROM herald_wake_ups_requested",
    )
    .fetch_one(&mut conn)
    .await
    .expect("explain the trigger's read");
    let top = &plan[0];
    assert!(
        top["Plan"]["Total Cost"].as_f64().unwrap_or(0.0) > 1e9,
        "the read is priced as a disabled scan, which is what tempted JIT: {top}"
    );
    assert!(top.get("JIT").is_none(), "compiled by JIT: {}", top["JIT"]);
    drop(conn);
    drop(store);
    schema.drop().await;
}

/// A claim learns whether each claimed delivery's key is done by one probe of the ledger
/// and one of the delivery's attempts, never by reading either whole: both grow for as
/// long as Herald runs. Planned as a claim is, with the ledger, the attempts log and the
/// open deliveries at sizes where a plan may prefer to hash a whole table.
#[tokio::test]
async fn a_claim_probes_the_ledger_and_attempts_log_instead_of_reading_them() {
    let Some(schema) = PgSchema::create("store_pg_claim_plan").await else {
        return;
    };
    let store = instance(&schema).await;
    let mut conn = PgConnection::connect(&schema.url)
        .await
        .expect("plan connection");
    sqlx::raw_sql(
        "INSERT INTO events (event_type, entity_type, entity_id, event_data) \
           SELECT 'order.created', 'order', (g % 500)::text, '{}' \
           FROM generate_series(1, 2000) g; \
         INSERT INTO herald_deliveries (event_id, route, entity_type, entity_id, ordered, \
           idempotency_key) \
           SELECT event_id, 'orders', entity_type, entity_id, true, \
             'herald-' || event_id || '-orders' FROM events; \
         INSERT INTO herald_attempts (delivery_id, event_id, route, attempt, outcome, \
           instance, started_at, duration_us) \
           SELECT 100000 + g, 100000 + g, 'orders', 1, 'DELIVERED', 'earlier', now(), 1 \
           FROM generate_series(1, 30000) g; \
         INSERT INTO herald_idempotency (route, idempotency_key, event_id, outcome) \
           SELECT 'orders', 'key-' || g, 100000 + g, 'DELIVERED' \
           FROM generate_series(1, 30000) g; \
         ANALYZE events; ANALYZE herald_deliveries; ANALYZE herald_attempts; \
         ANALYZE herald_idempotency;",
    )
    .execute(&mut conn)
    .await
    .expect("tables of a running Herald");
    let found = unbounded_scans_of(
        &mut conn,
        "claim",
        &plans::CLAIM_DELIVERIES,
        Some("'planner', 60, 500, '{}'::text[]"),
    )
    .await;
    let whole: Vec<String> = found
        .into_iter()
        .filter(|(_, on)| on.starts_with("herald_attempts") || on.starts_with("herald_idempotency"))
        .map(|(kind, on)| format!("{kind} on {on}"))
        .collect();
    assert_eq!(
        whole,
        Vec::<String>::new(),
        "the claim reads the ledger or attempts log whole"
    );
    drop(conn);
    drop(store);
    schema.drop().await;
}

/// A delivery that succeeds writes index entries only where the drain needs them
/// (migration 0009): besides the two keys, every index of the deliveries holds open or
/// failed ones only, and no index of the attempts names the event. An event's attempts
/// are still read by index, through its deliveries, beside a large attempts log.
#[tokio::test]
async fn a_delivered_event_writes_no_index_entry_only_operators_read() {
    let Some(schema) = PgSchema::create("store_pg_lean_indexes").await else {
        return;
    };
    let store = instance(&schema).await;
    let mut conn = PgConnection::connect(&schema.url)
        .await
        .expect("operator connection");
    let indexes = "SELECT i.indexrelid::regclass::text FROM pg_index i \
         WHERE i.indrelid = $1::regclass AND NOT i.indisunique AND i.indpred IS NULL \
         ORDER BY 1";
    let unconditional: Vec<String> = sqlx::query_scalar(indexes)
        .bind("herald_deliveries")
        .fetch_all(&mut conn)
        .await
        .expect("indexes of the deliveries");
    assert_eq!(
        unconditional,
        Vec::<String>::new(),
        "indexes every delivered delivery writes into"
    );
    let naming_the_event: Vec<String> = sqlx::query_scalar(
        "SELECT i.indexrelid::regclass::text FROM pg_index i \
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
         WHERE i.indrelid = 'herald_attempts'::regclass AND a.attname = 'event_id'",
    )
    .fetch_all(&mut conn)
    .await
    .expect("indexes of the attempts");
    assert_eq!(naming_the_event, Vec::<String>::new());
    let attempt_indexes: Vec<(bool, Vec<String>)> = sqlx::query_as(
        "SELECT i.indisprimary, array_agg(a.attname::text ORDER BY k.n) FROM pg_index i \
         CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) \
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
         WHERE i.indrelid = 'herald_attempts'::regclass \
         GROUP BY i.indexrelid, i.indisprimary",
    )
    .fetch_all(&mut conn)
    .await
    .expect("indexes of the attempts");
    assert_eq!(
        attempt_indexes,
        vec![(
            true,
            vec!["delivery_id".to_string(), "attempt_id".to_string()]
        )],
        "every attempt row writes into one index, keyed by its delivery"
    );

    sqlx::raw_sql(
        "INSERT INTO events (event_type, entity_type, entity_id, event_data) \
           SELECT 'order.created', 'order', g::text, '{}' FROM generate_series(1, 2000) g; \
         INSERT INTO herald_deliveries (event_id, route, entity_type, entity_id, ordered, \
           idempotency_key, status) \
           SELECT event_id, 'orders', entity_type, entity_id, true, \
             'herald-' || event_id || '-orders', 'SUCCESS' FROM events; \
         INSERT INTO herald_attempts (delivery_id, event_id, route, attempt, outcome, \
           instance, started_at, duration_us) \
           SELECT d.delivery_id, d.event_id, 'orders', n, 'RETRY', 'earlier', now(), 1 \
           FROM herald_deliveries d, generate_series(1, 15) n; \
         ANALYZE events; ANALYZE herald_deliveries; ANALYZE herald_attempts;",
    )
    .execute(&mut conn)
    .await
    .expect("tables of a running Herald");
    let found = unbounded_scans_of(
        &mut conn,
        "attempts",
        outcome_batches::EVENT_ATTEMPTS,
        Some("1000"),
    )
    .await;
    assert_eq!(found, Vec::new(), "an event's attempts read whole tables");
    let detail = store
        .event_detail(1000)
        .await
        .expect("event detail")
        .expect("the event exists");
    assert_eq!(
        detail.attempts.len(),
        15,
        "the event's attempts, through its delivery"
    );
    drop(conn);
    drop(store);
    schema.drop().await;
}

/// An outcome's status change on its event is a HOT update (no index entry written) only
/// while no index of `events` names `event_status`, in its columns or its condition, and
/// the pages keep room for the new version (migration 0007; docs/benchmarks-history.md,
/// the refresh of 2026-12-01).
#[tokio::test]
async fn the_status_of_an_event_changes_without_writing_its_indexes() {
    let Some(schema) = PgSchema::create("store_pg_hot_status").await else {
        return;
    };
    let store = instance(&schema).await;
    let mut conn = PgConnection::connect(&schema.url)
        .await
        .expect("connection");
    let naming_status: Vec<String> = sqlx::query_scalar(
        "SELECT i.indexrelid::regclass::text FROM pg_index i \
         WHERE i.indrelid = 'events'::regclass AND (\
           EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = i.indrelid \
             AND a.attnum = ANY (i.indkey) AND a.attname = 'event_status') \
           OR coalesce(pg_get_expr(i.indpred, i.indrelid), '') LIKE '%event_status%' \
           OR coalesce(pg_get_expr(i.indexprs, i.indrelid), '') LIKE '%event_status%') \
         ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .expect("indexes of events");
    assert_eq!(
        naming_status,
        Vec::<String>::new(),
        "indexes naming the status"
    );
    let options: Option<Vec<String>> =
        sqlx::query_scalar("SELECT reloptions FROM pg_class WHERE oid = 'events'::regclass")
            .fetch_one(&mut conn)
            .await
            .expect("options of events");
    assert!(
        options
            .unwrap_or_default()
            .iter()
            .any(|o| o.starts_with("fillfactor=")),
        "events keeps room in its pages for the status change"
    );
    drop(conn);
    drop(store);
    schema.drop().await;
}

/// Fan-out takes new events off a queue the producer's insert fills (migration 0008): it
/// writes nothing into the `events` row, whose only later write is the outcome's HOT
/// status change. Every way of inserting queues the event: one row, many rows in one
/// statement, COPY, and a logical replication subscriber's apply (replica role).
#[tokio::test]
async fn fan_out_leaves_the_event_row_as_the_producer_wrote_it() {
    let Some(schema) = PgSchema::create("store_pg_fan_out_queue").await else {
        return;
    };
    let store = instance(&schema).await;
    let mut conn = PgConnection::connect(&schema.url)
        .await
        .expect("producer connection");
    sqlx::raw_sql(
        "INSERT INTO events (event_type, entity_type, entity_id, event_data) \
         VALUES ('order.created', 'order', 'single', '{}'); \
         INSERT INTO events (event_type, entity_type, entity_id, event_data) \
         VALUES ('order.created', 'order', 'many-1', '{}'), \
                ('order.created', 'order', 'many-2', '{}')",
    )
    .execute(&mut conn)
    .await
    .expect("producer inserts");
    let mut copy = conn
        .copy_in_raw("COPY events (event_type, entity_type, entity_id, event_data) FROM STDIN")
        .await
        .expect("copy in");
    copy.send(b"order.created\torder\tcopied\t{}\n".as_slice())
        .await
        .expect("copy row");
    copy.finish().await.expect("copy done");
    // As a logical replication subscriber applies rows: ordinary triggers do not fire.
    sqlx::raw_sql(
        "SET session_replication_role = replica; \
         INSERT INTO events (event_type, entity_type, entity_id, event_data) \
         VALUES ('order.created', 'order', 'replicated', '{}'); \
         SET session_replication_role = origin",
    )
    .execute(&mut conn)
    .await
    .expect("replicated insert");

    let versions = "SELECT event_id, xmin::text || ctid::text FROM events ORDER BY event_id";
    let before: Vec<(i64, String)> = sqlx::query_as(versions)
        .fetch_all(&mut conn)
        .await
        .expect("row versions before");
    assert_eq!(before.len(), 5);
    let report = store
        .fan_out(&FanOutRequest::new(1000), &orders_route)
        .await
        .expect("fan out");
    assert_eq!(report.events(), 5, "every insert queued its events");
    let after: Vec<(i64, String)> = sqlx::query_as(versions)
        .fetch_all(&mut conn)
        .await
        .expect("row versions after");
    assert_eq!(after, before, "fan-out wrote into the events rows");
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM herald_fan_out_queue")
        .fetch_one(&mut conn)
        .await
        .expect("queue length");
    assert_eq!(queued, 0, "fan-out took the events off the queue");
    let second = store
        .fan_out(&FanOutRequest::new(1000), &orders_route)
        .await
        .expect("fan out again");
    assert_eq!(second.events(), 0, "an event is fanned out once");
    drop(conn);
    drop(store);
    schema.drop().await;
}

/// Retention: deleting events deletes their deliveries and attempts (migration 0006 does
/// it by statement triggers instead of per-row foreign keys), and nothing else.
#[tokio::test]
async fn deleting_events_deletes_their_deliveries_and_attempts() {
    let Some(schema) = PgSchema::create("store_pg_retention").await else {
        return;
    };
    let store = instance(&schema).await;
    let mut ids = Vec::new();
    for entity in ["a", "b"] {
        let event = NewEvent::new("order.created", "order", entity, json!({}));
        ids.push(store.append(&event).await.expect("append"));
    }
    let delivered = deliver_everything(&*store, "relay").await;
    assert_eq!(delivered.len(), 2);

    let mut conn = PgConnection::connect(&schema.url)
        .await
        .expect("operator connection");
    sqlx::query("DELETE FROM events WHERE event_id = $1")
        .bind(ids[0])
        .execute(&mut conn)
        .await
        .expect("purge one event");
    let left = |table: &'static str| {
        format!("SELECT array_agg(DISTINCT event_id ORDER BY event_id) FROM {table}")
    };
    for table in ["herald_deliveries", "herald_attempts"] {
        let events: Vec<i64> = sqlx::query_scalar(&left(table))
            .fetch_one(&mut conn)
            .await
            .expect("what is left");
        assert_eq!(events, vec![ids[1]], "{table} after purging {}", ids[0]);
    }
    drop(conn);
    drop(store);
    schema.drop().await;
}

// --- The batch ledger (migration 0013): claim items and outcome batches ---------------

/// Run `sql` on its own connection and return its one column, row by row.
async fn column<T>(schema: &PgSchema, sql: &str) -> Vec<T>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    let mut conn = PgConnection::connect(&schema.url).await.expect("connect");
    sqlx::query_scalar(sql)
        .fetch_all(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Run `sql` on its own connection and return its one integer.
async fn scalar(schema: &PgSchema, sql: &str) -> i64 {
    match column(schema, sql).await[..] {
        [value] => value,
        ref rows => panic!("{sql}: one row expected, got {rows:?}"),
    }
}

async fn execute(schema: &PgSchema, sql: &str) {
    let mut conn = PgConnection::connect(&schema.url).await.expect("connect");
    sqlx::query(sql)
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn complete_as(
    store: &dyn EventStore,
    claimed: &ClaimedDelivery,
    owner: &str,
    outcome: Outcome,
) -> CompletionResult {
    let completion = Completion::for_claim(claimed, owner, outcome);
    let mut results = store.complete(&[completion]).await.expect("complete");
    results.pop().expect("one result")
}

/// Deliveries fan-out starts are leased as claim items, not delivery rows, and one closed
/// at its first attempt is recorded in an outcome batch, not the attempts log; every
/// reader sees both shapes as it saw rows.
#[tokio::test]
async fn claim_items_and_outcome_batches_read_as_deliveries_and_attempts() {
    let Some(schema) = PgSchema::create("store_pg_batch_ledger_readers").await else {
        return;
    };
    let store = instance(&schema).await;
    let a = append_order(&*store, "A").await;
    let b = append_order(&*store, "B").await;
    let started = fan_out_as(&*store, "alpha", 10, 0).await.now;
    assert_eq!(event_ids(&started), vec![a, b]);
    assert!(started.iter().all(|d| d.delivery_id < 0), "claim items");
    assert_eq!(
        scalar(&schema, "SELECT count(*) FROM herald_deliveries").await,
        0
    );
    assert_eq!(
        scalar(&schema, "SELECT count(*) FROM herald_claims").await,
        1
    );

    store.heartbeat("alpha", "test").await.expect("heartbeat");
    let instances = store
        .instances(Duration::from_secs(60))
        .await
        .expect("instances");
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0].leases_held, 2);
    assert_eq!(store.backlog().await.expect("backlog").ready_events, 2);
    let open = store
        .event_detail(a)
        .await
        .expect("detail")
        .expect("event a");
    assert_eq!(open.deliveries.len(), 1);
    assert_eq!(open.deliveries[0].delivery_id, started[0].delivery_id);
    assert_eq!(open.deliveries[0].status, store::DeliveryStatus::Pending);
    assert_eq!(open.deliveries[0].locked_by.as_deref(), Some("alpha"));
    assert!(open.attempts.is_empty());

    let receipt = Outcome::Delivered {
        receipt: Some("HTTP 204".into()),
        emitted: Vec::new(),
    };
    assert!(matches!(
        complete_as(&*store, &started[0], "alpha", receipt).await,
        CompletionResult::Committed { .. }
    ));
    assert_eq!(
        scalar(&schema, "SELECT count(*) FROM herald_outcome_batches").await,
        1
    );
    assert_eq!(
        scalar(&schema, "SELECT count(*) FROM herald_attempts").await,
        0
    );
    let done = store
        .event_detail(a)
        .await
        .expect("detail")
        .expect("event a");
    assert_eq!(done.event.event_status, EventStatus::Success);
    assert_eq!(done.deliveries.len(), 1);
    assert_eq!(done.deliveries[0].status, store::DeliveryStatus::Success);
    assert_eq!(done.deliveries[0].locked_by, None);
    assert_eq!(done.attempts.len(), 1);
    let attempt = &done.attempts[0];
    assert_eq!(attempt.delivery_id, started[0].delivery_id);
    assert_eq!(attempt.attempt, 1);
    assert_eq!(attempt.outcome, store::AttemptOutcome::Delivered);
    assert_eq!(attempt.detail.as_deref(), Some("HTTP 204"));
    assert_eq!(attempt.instance, "alpha");

    assert_eq!(store.backlog().await.expect("backlog").ready_events, 1);
    let listed = |status| store::DeliveryFilter {
        status,
        route: None,
        limit: 0,
    };
    let succeeded = store
        .list_deliveries(&listed(Some(store::DeliveryStatus::Success)))
        .await
        .expect("list");
    assert_eq!(
        succeeded.iter().map(|d| d.event_id).collect::<Vec<_>>(),
        vec![a]
    );
    let pending = store
        .list_deliveries(&listed(Some(store::DeliveryStatus::Pending)))
        .await
        .expect("list");
    assert_eq!(
        pending.iter().map(|d| d.event_id).collect::<Vec<_>>(),
        vec![b]
    );
    assert_eq!(
        store
            .list_deliveries(&listed(None))
            .await
            .expect("list")
            .len(),
        2
    );
    drop(store);
    schema.drop().await;
}

/// A claim whose lease ran out is recovered by the next claim of any instance: its open
/// items become deliveries under their own ids, the late owner's outcome is refused, and
/// the claim is gone.
#[tokio::test]
async fn an_expired_claim_is_recovered_by_any_claim_and_its_late_outcome_is_lost() {
    let Some(schema) = PgSchema::create("store_pg_batch_ledger_recovery").await else {
        return;
    };
    let alpha = instance(&schema).await;
    let beta = instance(&schema).await;
    let a = append_order(&*alpha, "A").await;
    let started = fan_out_as(&*alpha, "alpha", 10, 0).await.now;
    assert_eq!(event_ids(&started), vec![a]);
    assert!(beta
        .claim(&grant("beta", 10))
        .await
        .expect("claim")
        .is_empty());

    execute(
        &schema,
        "UPDATE herald_claims SET locked_until = created_at",
    )
    .await;
    let taken = beta.claim(&grant("beta", 10)).await.expect("claim");
    assert_eq!(event_ids(&taken), vec![a]);
    assert_eq!(
        taken[0].delivery_id, started[0].delivery_id,
        "the item's own id"
    );
    assert_eq!(taken[0].attempt, 2);
    assert_eq!(
        scalar(&schema, "SELECT count(*) FROM herald_claims").await,
        0
    );

    assert_eq!(
        complete_as(&*alpha, &started[0], "alpha", Outcome::delivered()).await,
        CompletionResult::LeaseLost
    );
    assert!(matches!(
        complete_as(&*beta, &taken[0], "beta", Outcome::delivered()).await,
        CompletionResult::Committed { .. }
    ));
    let detail = beta.event_detail(a).await.expect("detail").expect("event");
    assert_eq!(detail.event.event_status, EventStatus::Success);
    let attempts: Vec<(i32, &str)> = detail
        .attempts
        .iter()
        .map(|a| (a.attempt, a.instance.as_str()))
        .collect();
    assert_eq!(
        attempts,
        vec![(2, "beta")],
        "alpha's late outcome left no trace"
    );
    drop((alpha, beta));
    schema.drop().await;
}

/// An item whose first attempt fails becomes a delivery row, in the same transaction as
/// its outcome, and retries from there like any delivery.
#[tokio::test]
async fn a_failed_claim_item_becomes_a_delivery_row_and_retries() {
    let Some(schema) = PgSchema::create("store_pg_batch_ledger_retry").await else {
        return;
    };
    let store = instance(&schema).await;
    let a = append_order(&*store, "A").await;
    let started = fan_out_as(&*store, "alpha", 10, 0).await.now;
    let retry = Outcome::Retry {
        after: Duration::ZERO,
        reason: "HTTP 503".into(),
    };
    assert!(matches!(
        complete_as(&*store, &started[0], "alpha", retry).await,
        CompletionResult::Committed { .. }
    ));
    assert_eq!(
        scalar(
            &schema,
            "SELECT count(*) FROM herald_deliveries WHERE status = 'RETRY' AND delivery_id < 0"
        )
        .await,
        1
    );
    assert_eq!(store.backlog().await.expect("backlog").waiting_retry, 1);
    let again = store.claim(&grant("beta", 10)).await.expect("claim");
    assert_eq!(event_ids(&again), vec![a]);
    assert_eq!(again[0].attempt, 2);
    complete_as(&*store, &again[0], "beta", Outcome::delivered()).await;
    let detail = store.event_detail(a).await.expect("detail").expect("event");
    assert_eq!(detail.event.event_status, EventStatus::Success);
    let outcomes: Vec<store::AttemptOutcome> = detail.attempts.iter().map(|a| a.outcome).collect();
    assert_eq!(
        outcomes,
        vec![
            store::AttemptOutcome::Retry,
            store::AttemptOutcome::Delivered
        ]
    );
    assert_eq!(
        scalar(&schema, "SELECT count(*) FROM herald_outcome_batches").await,
        0
    );
    drop(store);
    schema.drop().await;
}

/// An entity's open claim item holds its later events back from every other instance:
/// from their fan-out (read from the claims table) and from their claims.
#[tokio::test]
async fn another_owners_claim_item_holds_its_lane_back() {
    let Some(schema) = PgSchema::create("store_pg_batch_ledger_order").await else {
        return;
    };
    let alpha = instance(&schema).await;
    let beta = instance(&schema).await;
    append_order(&*alpha, "A").await;
    let first = fan_out_as(&*alpha, "alpha", 10, 0).await.now;
    let a2 = append_order(&*beta, "A").await;
    let b1 = append_order(&*beta, "B").await;
    let by_beta = fan_out_as(&*beta, "beta", 10, 10).await;
    assert_eq!(
        event_ids(&by_beta.now),
        vec![b1],
        "A's second waits behind alpha's item"
    );
    assert!(by_beta.queued.is_empty());
    assert!(beta
        .claim(&grant("beta", 10))
        .await
        .expect("claim")
        .is_empty());

    complete_as(&*alpha, &first[0], "alpha", Outcome::delivered()).await;
    let next = beta.claim(&grant("beta", 10)).await.expect("claim");
    assert_eq!(event_ids(&next), vec![a2]);
    drop((alpha, beta));
    schema.drop().await;
}

/// Fan-out begins each pass's transaction as the pass before commits, and a lease is
/// measured from its transaction's start: a pass that comes long after the one before
/// must not lease from that moment, but from its own.
#[tokio::test]
async fn a_pass_long_after_the_last_leases_from_its_own_start() {
    let Some(schema) = PgSchema::create("store_pg_fan_out_kept_tx").await else {
        return;
    };
    let alpha = instance(&schema).await;
    append_order(&*alpha, "A").await;
    assert_eq!(fan_out_as(&*alpha, "alpha", 10, 0).await.now.len(), 1);
    // Past the time a transaction begun by that pass's commit may be used (20 ms).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before: Vec<String> = column(&schema, "SELECT now()::text").await;
    let b1 = append_order(&*alpha, "B").await;
    assert_eq!(
        event_ids(&fan_out_as(&*alpha, "alpha", 10, 0).await.now),
        vec![b1]
    );
    let leased_since = format!(
        "SELECT count(*) FROM herald_claims WHERE created_at >= '{}'::timestamptz \
           AND locked_until >= '{}'::timestamptz + interval '60 seconds'",
        before[0], before[0]
    );
    assert_eq!(
        scalar(&schema, &leased_since).await,
        1,
        "the second pass's claim is leased from its own start"
    );
    drop(alpha);
    schema.drop().await;
}

/// An instance with the batch ledger off that has never seen a claim row (just started, or
/// its fan-out found the lock taken every time) still does not claim a row behind another
/// instance's open item.
#[tokio::test]
async fn an_instance_with_the_ledger_off_claims_nothing_behind_an_item() {
    let Some(schema) = PgSchema::create("store_pg_batch_ledger_off_order").await else {
        return;
    };
    let alpha = instance(&schema).await;
    append_order(&*alpha, "A").await;
    let first = fan_out_as(&*alpha, "alpha", 10, 0).await.now;
    assert_eq!(first.len(), 1);
    assert!(first[0].delivery_id < 0, "leased as a claim item");
    let second = append_order(&*alpha, "A").await;
    // Fanned out without a grant: a delivery row, due, waiting for a claim.
    let unstarted = fan_out_as(&*alpha, "alpha", 0, 0).await;
    assert!(unstarted.now.is_empty() && unstarted.queued.is_empty());

    let beta: Arc<dyn EventStore> = Arc::from(
        store::open(&schema.url, OpenOptions::default())
            .await
            .expect("open postgres store"),
    );
    assert!(
        beta.claim(&grant("beta", 10))
            .await
            .expect("claim")
            .is_empty(),
        "A's second waits behind alpha's item"
    );
    complete_as(&*alpha, &first[0], "alpha", Outcome::delivered()).await;
    let next = beta.claim(&grant("beta", 10)).await.expect("claim");
    assert_eq!(event_ids(&next), vec![second]);
    drop((alpha, beta));
    schema.drop().await;
}

/// An outcome is recorded once: sent again (its first commit's answer was lost), or for an
/// item this instance has since given back, it finds the item no longer open and is
/// refused, with nothing written twice.
#[tokio::test]
async fn an_item_is_recorded_once_and_not_after_it_was_given_back() {
    let Some(schema) = PgSchema::create("store_pg_batch_ledger_once").await else {
        return;
    };
    let store = instance(&schema).await;
    append_order(&*store, "A").await;
    let b = append_order(&*store, "B").await;
    let started = fan_out_as(&*store, "alpha", 10, 0).await.now;
    let emits = || Outcome::Delivered {
        receipt: None,
        emitted: vec![NewEvent::new("order.noted", "note", "n", json!({}))],
    };
    assert!(matches!(
        complete_as(&*store, &started[0], "alpha", emits()).await,
        CompletionResult::Committed { .. }
    ));
    assert_eq!(
        complete_as(&*store, &started[0], "alpha", emits()).await,
        CompletionResult::LeaseLost,
        "sent again"
    );
    assert_eq!(
        scalar(&schema, "SELECT count(*) FROM herald_attempt_records").await,
        1
    );
    assert_eq!(
        scalar(
            &schema,
            "SELECT count(*) FROM events WHERE event_type = 'order.noted'"
        )
        .await,
        1,
        "the emitted event once"
    );

    let given_back = &started[1];
    assert_eq!(given_back.event.event_id, b);
    assert_eq!(
        store
            .release("alpha", &[given_back.delivery_id])
            .await
            .expect("release"),
        1
    );
    assert_eq!(
        complete_as(&*store, given_back, "alpha", Outcome::delivered()).await,
        CompletionResult::LeaseLost
    );
    let detail = store
        .event_detail(b)
        .await
        .expect("detail")
        .expect("event b");
    assert_eq!(detail.event.event_status, EventStatus::Ready);
    assert!(detail.attempts.is_empty());
    assert_eq!(
        scalar(&schema, "SELECT count(*) FROM herald_delivery_records").await,
        2,
        "one delivery per event, in one shape each"
    );
    drop(store);
    schema.drop().await;
}

/// An outcome records its item as the claim wrote it, whether the store handle recording
/// it made the claim (it remembers the items) or not (it reads them from the claim).
#[tokio::test]
async fn an_item_is_recorded_as_its_claim_wrote_it_through_any_store_handle() {
    let Some(schema) = PgSchema::create("store_pg_batch_ledger_handles").await else {
        return;
    };
    let made_it = instance(&schema).await;
    let another = instance(&schema).await;
    for entity in ["A", "B"] {
        let mut event = NewEvent::new("order.created", "order", entity, json!({}));
        event.idempotency_key = Some(format!("order-{entity}"));
        made_it.append(&event).await.expect("append");
    }
    let started = fan_out_as(&*made_it, "alpha", 10, 0).await.now;
    assert_eq!(started.len(), 2);
    let as_claimed: Vec<String> = column(
        &schema,
        "SELECT concat_ws('/', u.event_id, u.route, u.ordered, u.key, c.created_at) \
         FROM herald_claims c CROSS JOIN LATERAL \
           unnest(c.event_ids, c.routes, c.ordered, c.idempotency_keys) \
           AS u(event_id, route, ordered, key) ORDER BY u.event_id",
    )
    .await;
    for (store, delivery) in [(&made_it, &started[0]), (&another, &started[1])] {
        assert!(matches!(
            complete_as(&**store, delivery, "alpha", Outcome::delivered()).await,
            CompletionResult::Committed { .. }
        ));
    }
    let as_recorded: Vec<String> = column(
        &schema,
        "SELECT concat_ws('/', u.event_id, u.route, u.ordered, u.key, u.leased_at) \
         FROM herald_outcome_batches b CROSS JOIN LATERAL \
           unnest(b.event_ids, b.routes, b.ordered, b.idempotency_keys, b.leased_at) \
           AS u(event_id, route, ordered, key, leased_at) ORDER BY u.event_id",
    )
    .await;
    assert_eq!(as_recorded, as_claimed);
    assert_eq!(
        column::<String>(
            &schema,
            "SELECT concat_ws('/', route, idempotency_key, event_id, outcome) \
             FROM herald_idempotency ORDER BY event_id"
        )
        .await,
        as_claimed
            .iter()
            .map(|item| {
                let [event_id, route, _, key, _] = item.splitn(5, '/').collect::<Vec<_>>()[..]
                else {
                    panic!("{item}")
                };
                format!("{route}/{key}/{event_id}/DELIVERED")
            })
            .collect::<Vec<_>>(),
        "each key in the ledger once, under its route and event"
    );
    drop((made_it, another));
    schema.drop().await;
}

/// A claim's lease covers all its items, so renewing it for the items an instance still
/// holds first turns those it no longer holds into delivery rows, under the lease they
/// had: that lease then runs out and another instance takes them, instead of the claim
/// keeping them for as long as a sibling runs.
#[tokio::test]
async fn renewing_a_claim_hands_the_items_not_held_to_rows() {
    let Some(schema) = PgSchema::create("store_pg_batch_ledger_renew").await else {
        return;
    };
    let alpha = instance(&schema).await;
    let beta = instance(&schema).await;
    append_order(&*alpha, "A").await;
    let b = append_order(&*alpha, "B").await;
    let started = fan_out_as(&*alpha, "alpha", 10, 0).await.now;
    let (held, dropped) = (&started[0], &started[1]);
    assert_eq!(dropped.event.event_id, b);
    let lease_end = |id: i64| {
        format!(
            "SELECT extract(epoch FROM locked_until)::bigint FROM herald_delivery_records \
             WHERE delivery_id = {id}"
        )
    };
    let before = scalar(&schema, &lease_end(dropped.delivery_id)).await;
    assert_eq!(
        alpha
            .renew_leases("alpha", &[held.delivery_id], Duration::from_secs(600))
            .await
            .expect("renew"),
        1
    );
    assert_eq!(
        scalar(
            &schema,
            &format!(
                "SELECT count(*) FROM herald_deliveries WHERE delivery_id = {} \
                 AND locked_by = 'alpha'",
                dropped.delivery_id
            )
        )
        .await,
        1,
        "the item given up is a row, still under alpha's lease"
    );
    assert_eq!(
        scalar(&schema, &lease_end(dropped.delivery_id)).await,
        before
    );
    assert!(scalar(&schema, &lease_end(held.delivery_id)).await >= before + 500);

    execute(
        &schema,
        &format!(
            "UPDATE herald_deliveries SET locked_until = created_at, next_attempt_at = created_at \
             WHERE delivery_id = {}",
            dropped.delivery_id
        ),
    )
    .await;
    let taken = beta.claim(&grant("beta", 10)).await.expect("claim");
    assert_eq!(event_ids(&taken), vec![b]);
    assert_eq!(taken[0].attempt, 2);
    drop((alpha, beta));
    schema.drop().await;
}
