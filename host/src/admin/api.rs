//! The JSON API under `/api`: events, dead letters and redrive, routes, plugins and
//! instances. Errors are `{"error": "..."}` with a status that says whose fault it is.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::AdminState;
use crate::config::{Ordering, RouteConfig};
use crate::runtime::hot_reload::{put_in_service, refuse};
use crate::runtime::versions::{valid_plugin_name, PluginDir};
use crate::store::{
    DeliveryFilter, DeliveryStatus, EventFilter, EventStatus, RedriveSelection, StoreError,
};

/// The most rows one list request returns.
const MAX_LIMIT: u32 = 1000;

/// The largest plugin upload accepted; a bigger body is refused before it is read whole.
const MAX_PLUGIN_BYTES: usize = 64 << 20;

pub(super) fn router() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/events", get(list_events))
        .route("/events/{id}", get(show_event))
        .route("/history/{entity_type}/{entity_id}", get(history))
        .route("/deliveries/dead", get(dead_letters))
        .route("/deliveries/redrive", post(redrive))
        .route("/routes", get(routes))
        .route("/plugins", get(plugins))
        .route(
            "/plugins/{name}",
            put(upload_plugin).layer(DefaultBodyLimit::max(MAX_PLUGIN_BYTES)),
        )
        .route("/plugins/{name}/rollback", post(rollback_plugin))
        .route("/plugins/{name}/resume", post(resume_plugin))
        .route("/instances", get(instances))
}

/// A route as the API shows it: its shape, never its config values (they hold secrets).
#[derive(Debug, Clone, Serialize)]
pub struct RouteSummary {
    pub name: String,
    pub event_types: Vec<String>,
    pub target: Option<String>,
    pub plugin: String,
    pub ordered: bool,
    pub allowed_hosts: Vec<String>,
    pub time_limit_ms: u128,
    pub memory_limit_mb: u32,
    pub max_attempts: u32,
}

impl RouteSummary {
    pub fn of(route: &RouteConfig) -> Self {
        RouteSummary {
            name: route.name.clone(),
            event_types: route.event_types.clone(),
            target: route.target.clone(),
            plugin: route.plugin.clone(),
            ordered: route.ordering == Ordering::Entity,
            allowed_hosts: route.allowed_hosts.clone(),
            time_limit_ms: route.time_limit.as_millis(),
            memory_limit_mb: route.memory_limit_mb,
            max_attempts: route.retry.max_attempts,
        }
    }
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, err.to_string())
    }
}

impl From<serde_json::Error> for ApiError {
    fn from(err: serde_json::Error) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

fn limit(requested: Option<u32>) -> u32 {
    requested.unwrap_or(50).clamp(1, MAX_LIMIT)
}

#[derive(Deserialize)]
struct EventsQuery {
    status: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    limit: Option<u32>,
    before: Option<i64>,
}

async fn list_events(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<EventsQuery>,
) -> ApiResult {
    let status = query
        .status
        .as_deref()
        .map(str::parse::<EventStatus>)
        .transpose()
        .map_err(|err| ApiError(StatusCode::BAD_REQUEST, err.to_string()))?;
    let events = state
        .store
        .list_events(&EventFilter {
            status,
            event_type: query.event_type,
            before_id: query.before,
            limit: limit(query.limit),
            ..EventFilter::default()
        })
        .await?;
    let events = events
        .iter()
        .map(|e| e.to_json())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(Value::Array(events)))
}

async fn show_event(State(state): State<Arc<AdminState>>, Path(id): Path<i64>) -> ApiResult {
    match state.store.event_detail(id).await? {
        Some(detail) => Ok(Json(detail.to_json()?)),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("event {id} not found"),
        )),
    }
}

async fn history(
    State(state): State<Arc<AdminState>>,
    Path((entity_type, entity_id)): Path<(String, String)>,
) -> ApiResult {
    let events = state.store.entity_history(&entity_type, &entity_id).await?;
    let events = events
        .iter()
        .map(|e| e.to_json())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(Value::Array(events)))
}

#[derive(Deserialize)]
struct DeadQuery {
    route: Option<String>,
    limit: Option<u32>,
}

async fn dead_letters(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<DeadQuery>,
) -> ApiResult {
    let dead = state
        .store
        .list_deliveries(&DeliveryFilter {
            status: Some(DeliveryStatus::Dead),
            route: query.route,
            limit: limit(query.limit),
        })
        .await?;
    Ok(Json(serde_json::to_value(dead)?))
}

/// Exactly one of the three, as in `herald deliveries redrive`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RedriveRequest {
    delivery_id: Option<i64>,
    route: Option<String>,
    #[serde(default)]
    all: bool,
}

async fn redrive(
    State(state): State<Arc<AdminState>>,
    Json(request): Json<RedriveRequest>,
) -> ApiResult {
    let chosen = usize::from(request.delivery_id.is_some())
        + usize::from(request.route.is_some())
        + usize::from(request.all);
    if chosen != 1 {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "give exactly one of delivery_id, route or all: true".into(),
        ));
    }
    let redriven = state
        .store
        .redrive(&RedriveSelection {
            delivery_id: request.delivery_id,
            route: request.route,
        })
        .await?;
    Ok(Json(json!({ "redriven": redriven })))
}

async fn routes(State(state): State<Arc<AdminState>>) -> ApiResult {
    Ok(Json(serde_json::to_value(&state.routes)?))
}

async fn plugins(State(state): State<Arc<AdminState>>) -> ApiResult {
    let Some(registry) = &state.plugins else {
        return Ok(Json(Value::Array(Vec::new())));
    };
    let quarantined = state.store.quarantined().await?;
    let plugins: Vec<Value> = registry
        .names()
        .iter()
        .filter_map(|name| registry.get(name))
        .map(|plugin| {
            json!({
                "name": plugin.name,
                "version": plugin.version,
                "declared_name": plugin.info.name,
                "declared_version": plugin.info.version,
                "event_types": plugin.info.event_types,
                "routes": state.routes.iter().filter(|r| r.plugin == plugin.name).map(|r| r.name.clone()).collect::<Vec<_>>(),
                "quarantine": quarantined.iter().find(|q| q.plugin == plugin.name),
            })
        })
        .collect();
    Ok(Json(Value::Array(plugins)))
}

#[derive(Deserialize)]
struct InstancesQuery {
    /// Seconds; instances last seen longer ago are gone.
    within_secs: Option<u64>,
}

async fn instances(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<InstancesQuery>,
) -> ApiResult {
    let within = Duration::from_secs(query.within_secs.unwrap_or(120));
    let instances = state.store.instances(within).await?;
    Ok(Json(serde_json::to_value(instances)?))
}

/// `PUT /api/plugins/NAME` with the component as the body: checked (it must compile,
/// link and describe itself), then put in service and installed in the plugin directory.
/// Anything wrong changes nothing.
async fn upload_plugin(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    let (Some(deploys), Some(registry)) = (&state.deploys, &state.plugins) else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "this server does not take plugin uploads".into(),
        ));
    };
    if !valid_plugin_name(&name) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("'{name}' is not a plugin name (lowercase letters, digits, '-' and '_')"),
        ));
    }
    if !body.starts_with(b"\0asm") {
        return Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the body is not WebAssembly (no \\0asm header)".into(),
        ));
    }
    let plugin = match deploys.runtime.load_bytes(&name, body.to_vec()).await {
        Ok(plugin) => plugin,
        Err(err) => {
            let reason = err.to_string();
            refuse(&name, &reason);
            return Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, reason));
        }
    };
    let dir = PluginDir::new(&deploys.plugins_dir);
    dir.install(&name, &body)
        .map_err(|err| ApiError(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()))?;
    let version = plugin.version.clone();
    let previous = put_in_service(registry, &dir, plugin, &body);
    Ok(Json(
        json!({ "plugin": name, "version": version, "previous": previous }),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RollbackRequest {
    to: Option<String>,
}

/// `POST /api/plugins/NAME/rollback` (optionally `{"to": "HASH"}`): the previous version
/// goes back into the plugin directory; the watcher of each instance deploys it.
async fn rollback_plugin(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
    body: Option<Json<RollbackRequest>>,
) -> ApiResult {
    let Some(deploys) = &state.deploys else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "this server does not manage plugins".into(),
        ));
    };
    let request = body.map(|Json(r)| r).unwrap_or_default();
    let version = PluginDir::new(&deploys.plugins_dir)
        .rollback(&name, request.to.as_deref())
        .map_err(|err| ApiError(StatusCode::BAD_REQUEST, err.to_string()))?;
    Ok(Json(json!({ "plugin": name, "version": version })))
}

/// `POST /api/plugins/NAME/resume`: lift a quarantine; the routes claim again within a
/// second on every instance.
async fn resume_plugin(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> ApiResult {
    if state.store.resume(&name).await? {
        Ok(Json(json!({ "plugin": name, "resumed": true })))
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("plugin '{name}' is not quarantined"),
        ))
    }
}
