//! The admin endpoints. Health is open (for probes); everything under `/api` needs the
//! token when one is set.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use super::auth::require_token;
use super::AdminState;

pub(super) fn router(state: Arc<AdminState>) -> Router {
    let api = Router::new()
        .route("/instances", get(instances))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .nest("/api", api)
        .with_state(state)
}

/// Ready when the store answers with a current schema.
async fn ready(State(state): State<Arc<AdminState>>) -> Response {
    match state.store.check_schema().await {
        Ok(()) => "ready\n".into_response(),
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {err}\n"),
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
struct InstancesQuery {
    /// Seconds; instances last seen longer ago are gone.
    within_secs: Option<u64>,
}

async fn instances(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<InstancesQuery>,
) -> Response {
    let within = Duration::from_secs(query.within_secs.unwrap_or(120));
    match state.store.instances(within).await {
        Ok(instances) => Json(instances).into_response(),
        Err(err) => (StatusCode::SERVICE_UNAVAILABLE, err.to_string()).into_response(),
    }
}
