//! The webhook receiver under test, on loopback (axum, keep-alive): it fails on purpose,
//! deduplicates by idempotency key the way a careful receiver does, and records every
//! request.
//!
//! Each request draws its fate from one seeded RNG: a share answer 500, a share time out,
//! a share answer 429 with `Retry-After: 1`, the rest 200. A time-out applies the effect
//! first and then holds the request past the client's time-out: the effect happened but
//! its acknowledgement was lost, which is exactly the case idempotency keys exist for. A
//! key already applied is answered 200 without applying it again.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The shares of requests that fail, each way.
#[derive(Debug, Clone)]
pub struct Failures {
    pub server_error: f64,
    pub time_out: f64,
    pub throttle: f64,
    /// How long a timed-out request is held: past the route's HTTP time-out.
    pub hold: Duration,
}

/// What the sink did with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 200, effect applied (first time for this key).
    Applied,
    /// 200, key applied before: nothing applied again.
    AlreadyApplied,
    /// 500, nothing applied.
    ServerError,
    /// Held past the client's time-out; `applied` when this request applied the effect.
    TimedOut { applied: bool },
    /// 429 with `Retry-After: 1`, nothing applied.
    Throttled,
    /// No idempotency key, event id or entity: answered 400 (a Herald bug).
    Unreadable,
}

#[derive(Debug, Clone)]
pub struct Request {
    pub key: String,
    pub event_id: i64,
    pub entity: String,
    /// Since the sink started.
    pub at: Duration,
    pub answer: Answer,
}

/// One effect, in the order the sink applied them.
#[derive(Debug, Clone)]
pub struct Application {
    pub key: String,
    pub event_id: i64,
    pub entity: String,
}

struct Ledger {
    rng: StdRng,
    requests: Vec<Request>,
    applications: Vec<Application>,
    /// Keys applied; the dedup.
    applied: HashSet<String>,
}

struct Shared {
    failures: Failures,
    started: Instant,
    ledger: Mutex<Ledger>,
    /// Effects applied so far; the run's progress, which faults are scheduled by.
    applied: watch::Sender<u64>,
}

pub struct Sink {
    pub address: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

/// What the run reads at the end.
pub struct Snapshot {
    pub requests: Vec<Request>,
    pub applications: Vec<Application>,
}

impl Sink {
    pub async fn start(seed: u64, failures: Failures) -> anyhow::Result<Sink> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a loopback port for the sink")?;
        let address = listener.local_addr().context("the sink's address")?;
        let shared = Arc::new(Shared {
            failures,
            started: Instant::now(),
            ledger: Mutex::new(Ledger {
                rng: StdRng::seed_from_u64(seed),
                requests: Vec::new(),
                applications: Vec::new(),
                applied: Default::default(),
            }),
            applied: watch::Sender::new(0),
        });
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                eprintln!("herald-chaos: the sink stopped: {err}");
            }
        });
        Ok(Sink {
            address,
            shared,
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.address)
    }

    /// Effects applied so far, as a watch to wait on.
    pub fn progress(&self) -> watch::Receiver<u64> {
        self.shared.applied.subscribe()
    }

    pub fn applied(&self) -> u64 {
        *self.shared.applied.borrow()
    }

    pub fn snapshot(&self) -> Snapshot {
        let ledger = lock(&self.shared.ledger);
        Snapshot {
            requests: ledger.requests.clone(),
            applications: ledger.applications.clone(),
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(ledger: &Mutex<Ledger>) -> MutexGuard<'_, Ledger> {
    ledger
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The parts of the webhook plugin's request the sink reads.
struct Delivery {
    key: String,
    event_id: i64,
    entity: String,
}

fn read_delivery(headers: &HeaderMap, body: &[u8]) -> Option<Delivery> {
    let key = headers.get("idempotency-key")?.to_str().ok()?.to_string();
    let json: serde_json::Value = serde_json::from_slice(body).ok()?;
    Some(Delivery {
        key,
        event_id: json["id"].as_i64()?,
        entity: json["entity"]["id"].as_str()?.to_string(),
    })
}

impl Shared {
    /// Decide, apply and record, all under one lock, so the order of applications is
    /// the order of the records.
    fn answer(&self, headers: &HeaderMap, body: &[u8]) -> Answer {
        let delivery = read_delivery(headers, body);
        let mut ledger = lock(&self.ledger);
        let Some(delivery) = delivery else {
            ledger.requests.push(Request {
                key: String::new(),
                event_id: 0,
                entity: String::new(),
                at: self.started.elapsed(),
                answer: Answer::Unreadable,
            });
            return Answer::Unreadable;
        };
        let roll: f64 = ledger.rng.random();
        let failures = &self.failures;
        let answer = if roll < failures.server_error {
            Answer::ServerError
        } else if roll < failures.server_error + failures.time_out {
            Answer::TimedOut {
                applied: apply(&mut ledger, &delivery),
            }
        } else if roll < failures.server_error + failures.time_out + failures.throttle {
            Answer::Throttled
        } else if apply(&mut ledger, &delivery) {
            Answer::Applied
        } else {
            Answer::AlreadyApplied
        };
        let applied = ledger.applications.len() as u64;
        ledger.requests.push(Request {
            key: delivery.key,
            event_id: delivery.event_id,
            entity: delivery.entity,
            at: self.started.elapsed(),
            answer,
        });
        drop(ledger);
        self.applied.send_if_modified(|count| {
            let changed = *count != applied;
            *count = applied;
            changed
        });
        answer
    }
}

/// Apply the effect unless this key was applied before; whether it was applied now.
fn apply(ledger: &mut Ledger, delivery: &Delivery) -> bool {
    if !ledger.applied.insert(delivery.key.clone()) {
        return false;
    }
    ledger.applications.push(Application {
        key: delivery.key.clone(),
        event_id: delivery.event_id,
        entity: delivery.entity.clone(),
    });
    true
}

async fn receive(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    match shared.answer(&headers, &body) {
        Answer::Applied | Answer::AlreadyApplied => StatusCode::OK.into_response(),
        Answer::ServerError => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        Answer::Throttled => {
            (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")]).into_response()
        }
        Answer::Unreadable => (
            StatusCode::BAD_REQUEST,
            "no idempotency key, event id or entity",
        )
            .into_response(),
        Answer::TimedOut { .. } => {
            // The client gives up first and closes the connection, which drops this
            // future; the answer below only goes out if it did not.
            tokio::time::sleep(shared.failures.hold).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
    }
}

/// Counts of the sink's answers, and what the repeats were caused by.
#[derive(Debug, Default)]
pub struct Tally {
    pub requests: usize,
    /// Distinct events the requests were for.
    pub events_requested: usize,
    /// Distinct entities they belonged to.
    pub entities_requested: usize,
    /// From the first request to the last.
    pub span: Duration,
    pub applied: usize,
    pub already_applied: usize,
    pub server_errors: usize,
    pub time_outs: usize,
    pub time_outs_applied: usize,
    pub throttled: usize,
    pub unreadable: usize,
    /// Requests for a key already applied (answered 200 or failed again) whose key had
    /// timed out before: the retry a lost acknowledgement causes.
    pub repeats_after_time_out: usize,
    /// Requests for a key already applied that never timed out: the outcome was lost
    /// otherwise (an instance killed after the effect, a Postgres restart while the
    /// outcome was being recorded, a lease taken over).
    pub repeats_after_lost_outcome: usize,
}

pub fn tally(requests: &[Request]) -> Tally {
    let mut tally = Tally {
        requests: requests.len(),
        events_requested: requests
            .iter()
            .filter(|r| r.answer != Answer::Unreadable)
            .map(|r| r.event_id)
            .collect::<HashSet<_>>()
            .len(),
        entities_requested: requests
            .iter()
            .filter(|r| r.answer != Answer::Unreadable)
            .map(|r| r.entity.as_str())
            .collect::<HashSet<_>>()
            .len(),
        span: match (requests.first(), requests.last()) {
            (Some(first), Some(last)) => last.at.saturating_sub(first.at),
            _ => Duration::ZERO,
        },
        ..Tally::default()
    };
    let mut applied_before: HashSet<&str> = HashSet::new();
    let mut timed_out_before: HashSet<&str> = HashSet::new();
    for request in requests {
        let key = request.key.as_str();
        if applied_before.contains(key) && request.answer != Answer::Unreadable {
            if timed_out_before.contains(key) {
                tally.repeats_after_time_out += 1;
            } else {
                tally.repeats_after_lost_outcome += 1;
            }
        }
        match request.answer {
            Answer::Applied => tally.applied += 1,
            Answer::AlreadyApplied => tally.already_applied += 1,
            Answer::ServerError => tally.server_errors += 1,
            Answer::TimedOut { applied } => {
                tally.time_outs += 1;
                if applied {
                    tally.time_outs_applied += 1;
                }
                timed_out_before.insert(key);
            }
            Answer::Throttled => tally.throttled += 1,
            Answer::Unreadable => tally.unreadable += 1,
        }
        if matches!(
            request.answer,
            Answer::Applied | Answer::TimedOut { applied: true }
        ) {
            applied_before.insert(key);
        }
    }
    tally
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(key: &str, answer: Answer) -> Request {
        Request {
            key: key.into(),
            event_id: 1,
            entity: "e-1".into(),
            at: Duration::ZERO,
            answer,
        }
    }

    #[test]
    fn repeats_are_told_apart_by_what_came_before() {
        let requests = [
            request("k1", Answer::TimedOut { applied: true }),
            request("k1", Answer::AlreadyApplied),
            request("k2", Answer::Applied),
            request("k2", Answer::AlreadyApplied),
            request("k3", Answer::ServerError),
            request("k3", Answer::Applied),
        ];
        let tally = tally(&requests);
        assert_eq!(tally.repeats_after_time_out, 1);
        assert_eq!(tally.repeats_after_lost_outcome, 1);
        assert_eq!(tally.applied, 2);
        assert_eq!(tally.time_outs_applied, 1);
        assert_eq!(tally.server_errors, 1);
    }
}
