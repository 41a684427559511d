//! A real HTTP server on loopback standing in for a webhook receiver: it records every
//! request, answers from a script (then 200), and counts effects once per idempotency
//! key, the way a well-behaved receiver deduplicates.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16),
    /// A status with one extra header, e.g. 429 with `Retry-After`.
    WithHeader(u16, &'static str, String),
    WithBody(u16, String),
    /// Never answer: the client's time-out fires.
    Hang,
}

#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    pub status: u16,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

#[derive(Default)]
struct SinkState {
    requests: Vec<Recorded>,
    script: VecDeque<Reply>,
    /// Idempotency key → 2xx answers given for it. A deduplicating receiver applies the
    /// effect once per key, so the number of keys is the number of effects; a count above
    /// one is a repeat the receiver absorbed.
    accepted: HashMap<String, usize>,
}

#[derive(Clone)]
pub struct Sink {
    /// `http://127.0.0.1:PORT`
    pub base_url: String,
    pub address: String,
    state: Arc<Mutex<SinkState>>,
    changed: Arc<tokio::sync::Notify>,
}

fn lock(state: &Mutex<SinkState>) -> MutexGuard<'_, SinkState> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Sink {
    pub async fn start() -> Sink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port for the sink");
        let address = listener.local_addr().expect("sink address").to_string();
        let sink = Sink {
            base_url: format!("http://{address}"),
            address,
            state: Arc::default(),
            changed: Arc::default(),
        };
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(sink.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        sink
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// The next requests get these answers, in order; after them, 200.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        lock(&self.state).script.extend(replies);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.state).requests.clone()
    }

    /// 2xx answers per idempotency key: its keys are the effects applied.
    pub fn accepted(&self) -> HashMap<String, usize> {
        lock(&self.state).accepted.clone()
    }

    /// Wait until at least `n` requests arrived; panics after `limit` with what did.
    pub async fn wait_for(&self, n: usize, limit: Duration) -> Vec<Recorded> {
        let wait = async {
            loop {
                let notified = self.changed.notified();
                let requests = self.requests();
                if requests.len() >= n {
                    return requests;
                }
                notified.await;
            }
        };
        match tokio::time::timeout(limit, wait).await {
            Ok(requests) => requests,
            Err(_) => panic!(
                "sink got {} request(s) within {limit:?}, expected {n}",
                self.requests().len()
            ),
        }
    }
}

async fn receive(
    State(sink): State<Sink>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let reply = lock(&sink.state).script.pop_front();
    if let Some(Reply::Hang) = reply {
        std::future::pending::<()>().await;
    }
    let (status, extra, text) = match reply {
        Some(Reply::Status(code)) => (code, None, String::new()),
        Some(Reply::WithHeader(code, name, value)) => (code, Some((name, value)), String::new()),
        Some(Reply::WithBody(code, text)) => (code, None, text),
        Some(Reply::Hang) | None => (200, None, String::new()),
    };
    let headers: HashMap<String, String> = headers
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_string(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    {
        let mut state = lock(&sink.state);
        if (200..300).contains(&status) {
            if let Some(key) = headers.get("idempotency-key") {
                *state.accepted.entry(key.clone()).or_default() += 1;
            }
        }
        state.requests.push(Recorded {
            method: method.to_string(),
            path: uri.path().to_string(),
            headers,
            body: body.to_vec(),
            status,
        });
    }
    sink.changed.notify_waiters();
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match extra {
        Some((name, value)) => (code, [(name, value)], text).into_response(),
        None => (code, text).into_response(),
    }
}

/// What a receiver saw of webhook deliveries (JSON bodies with `id` and `entity.id`, as
/// the webhook plugin sends them), in arrival order.
pub struct Arrivals {
    pub ids: HashSet<i64>,
    /// Requests for an event that had arrived before (redeliveries).
    pub repeats: usize,
    /// Events that arrived after a later event of the same entity.
    pub order_violations: Vec<String>,
}

impl Arrivals {
    pub fn distinct(&self) -> usize {
        self.ids.len()
    }
}

pub fn arrivals(requests: &[Recorded]) -> Arrivals {
    let mut ids = HashSet::new();
    let mut repeats = 0;
    let mut latest: HashMap<String, i64> = HashMap::new();
    let mut order_violations = Vec::new();
    for request in requests {
        let body = request.json();
        let (Some(id), Some(entity)) = (body["id"].as_i64(), body["entity"]["id"].as_str()) else {
            order_violations.push(format!("unreadable delivery: {body}"));
            continue;
        };
        if !ids.insert(id) {
            repeats += 1;
        }
        // A repeat of the entity's latest event (a redelivery after a crash) is fine;
        // anything earlier than what already arrived overtook it.
        let last = latest.entry(entity.to_string()).or_insert(id);
        if id < *last {
            order_violations.push(format!("{entity}: event {id} arrived after {last}"));
        }
        *last = (*last).max(id);
    }
    Arrivals {
        ids,
        repeats,
        order_violations,
    }
}
