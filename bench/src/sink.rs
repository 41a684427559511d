//! A lean webhook receiver on loopback: answers 200 at once (keep-alive, as hyper does by
//! default), counts requests, and when asked records the arrival instant of each event
//! by the `seq` the benchmark put in its payload.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::serve::ListenerExt;
use serde::Deserialize;
use tokio::task::JoinHandle;

#[derive(Default)]
struct SinkState {
    requests: AtomicU64,
    /// Record `(seq, arrival)` per request; off for the drains, where only the count matters.
    record: bool,
    arrivals: Mutex<Vec<(i64, Instant)>>,
}

pub struct Sink {
    pub address: SocketAddr,
    state: Arc<SinkState>,
    task: JoinHandle<()>,
}

impl Sink {
    /// Serve on a free loopback port; `record` keeps each event's arrival instant.
    pub async fn start(record: bool) -> anyhow::Result<Sink> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a loopback port for the sink")?;
        let address = listener.local_addr().context("the sink's address")?;
        // As receivers behind nginx and most HTTP servers run: a response is sent when
        // written, not held back until the previous one is acknowledged.
        let listener = listener.tap_io(|stream| {
            if let Err(err) = stream.set_nodelay(true) {
                eprintln!("sink: cannot set TCP_NODELAY: {err}");
            }
        });
        let state = Arc::new(SinkState {
            record,
            ..SinkState::default()
        });
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                eprintln!("sink stopped: {err}");
            }
        });
        Ok(Sink {
            address,
            state,
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.address)
    }

    /// `127.0.0.1:PORT`, as a route's `allowed_hosts` names it.
    pub fn host(&self) -> String {
        self.address.to_string()
    }

    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// The first arrival of each `seq` seen so far.
    pub fn arrivals(&self) -> HashMap<i64, Instant> {
        let arrivals = match self.state.arrivals.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut first = HashMap::with_capacity(arrivals.len());
        for (seq, at) in arrivals.iter() {
            first.entry(*seq).or_insert(*at);
        }
        first
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The part of the webhook plugin's JSON body the sink reads.
#[derive(Deserialize)]
struct Delivery {
    data: Payload,
}

#[derive(Deserialize)]
struct Payload {
    seq: i64,
}

async fn receive(State(state): State<Arc<SinkState>>, body: Bytes) -> StatusCode {
    let now = Instant::now();
    state.requests.fetch_add(1, Ordering::Relaxed);
    if state.record {
        if let Ok(delivery) = serde_json::from_slice::<Delivery>(&body) {
            let mut arrivals = match state.arrivals.lock() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            arrivals.push((delivery.data.seq, now));
        }
    }
    StatusCode::OK
}
