//! The admin endpoints. Health is open (for probes); everything under `/api` needs the
//! token when one is set.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::auth::require_token;
use super::AdminState;

pub(super) fn router(state: Arc<AdminState>) -> Router {
    let api = super::api::router().route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        require_token,
    ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route(
            "/metrics",
            get(metrics).route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                require_token,
            )),
        )
        .nest("/api", api)
        .layer(axum::middleware::from_fn(close_after_refused_body))
        .with_state(state)
}

/// A request refused before its body was read (no token, too big, bad name) leaves the
/// rest of that body on the connection, so hyper closes it after answering. Saying so in
/// the response keeps a keep-alive client from sending its next request into a socket
/// that is about to close, which it would see as a broken connection, not our answer.
async fn close_after_refused_body(request: Request, next: Next) -> Response {
    let carries_body = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .is_some_and(|length| length != "0")
        || request.headers().contains_key(header::TRANSFER_ENCODING);
    let mut response = next.run(request).await;
    if carries_body && (response.status().is_client_error() || response.status().is_server_error())
    {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Ready when the store answers with a current schema and every route's plugin is in
/// service.
async fn ready(State(state): State<Arc<AdminState>>) -> Response {
    if let Err(err) = state.store.check_schema().await {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {err}\n"),
        )
            .into_response();
    }
    if let Some(registry) = &state.plugins {
        if let Some(route) = state
            .routes
            .iter()
            .find(|r| registry.get(&r.plugin).is_none())
        {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "not ready: plugin '{}' of route '{}' is not loaded\n",
                    route.plugin, route.name
                ),
            )
                .into_response();
        }
    }
    "ready\n".into_response()
}

/// Prometheus metrics. Behind the token when one is set, like `/api`: the series name
/// every route and plugin and show their traffic; scrapers send it as a bearer token.
async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    match crate::metrics::render(state.store.as_ref()).await {
        Some(text) => (
            [(
                axum::http::header::CONTENT_TYPE,
                crate::metrics::CONTENT_TYPE,
            )],
            text,
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics unavailable: another metrics recorder is installed in this process\n",
        )
            .into_response(),
    }
}
