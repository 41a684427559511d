//! `webhook`: POSTs each event to one HTTP endpoint, the way Svix-style receivers
//! expect it.
//!
//! # Config
//!
//! | key | | |
//! |---|---|---|
//! | `url` | required | the endpoint |
//! | `secret` | optional, secret | `whsec_<base64>`; when set, every request is signed ([Standard Webhooks](https://www.standardwebhooks.com)) |
//! | `timeout_ms` | optional | request timeout; the route's default when unset (the route's limit caps it) |
//!
//! # Request
//!
//! `POST <url>` with a JSON body in the Standard Webhooks payload shape (`type`,
//! `timestamp`, `data`) plus what identifies the event in the store:
//!
//! ```json
//! {
//!   "id": 42,
//!   "type": "order.created",
//!   "timestamp": "2024-05-01T12:00:00.250Z",
//!   "entity": { "type": "order", "id": "o-1" },
//!   "target": "billing",
//!   "data": { "...": "the event's payload, as the producer wrote it" }
//! }
//! ```
//!
//! `timestamp` is when the producer wrote the event; `target` is `null` when the
//! producer named none. This shape rather than a CloudEvents envelope because it is
//! what Standard Webhooks receivers parse, and it goes with `Content-Type:
//! application/json`; plugins that want CloudEvents have `herald_sdk::cloudevents`.
//!
//! Headers: `Content-Type: application/json`, `Idempotency-Key` and `webhook-id` (both
//! the delivery's idempotency key, stable across retries so the receiver can drop
//! repeats), `webhook-timestamp` (the host's clock at this attempt, Unix seconds) and,
//! with a secret, `webhook-signature`.
//!
//! # Outcomes
//!
//! | answer | outcome |
//! |---|---|
//! | 2xx | delivered, receipt `HTTP <status>` |
//! | 410 Gone | dead: the receiver asks us to stop |
//! | 408, 429, 5xx | retry, after `Retry-After` (seconds or HTTP date) when given |
//! | timeout, connection failure, other transport errors | retry |
//! | response over the host's size cap | retry: the receiver may not have processed it, and a repeat is safe because it dedups on `webhook-id` |
//! | any other status (other 4xx, 1xx, 3xx) | dead, with the status and up to 200 characters of the body |
//! | destination denied by the route, invalid URL | dead: a configuration problem no retry fixes |
//! | missing `url`, bad `secret` or `timeout_ms` | dead, likewise |

use std::time::{Duration, UNIX_EPOCH};

use herald_sdk::prelude::*;
use herald_sdk::webhooks::{self, Secret};
use serde_json::json;

/// Characters of a response body kept in a dead letter's reason: enough to read the
/// receiver's error message, short enough for a log line.
const EXCERPT_CHARS: usize = 200;

pub struct Webhook;

impl Plugin for Webhook {
    fn describe() -> PluginInfo {
        PluginInfo::new("webhook", env!("CARGO_PKG_VERSION"))
            .event_type("*")
            .config(ConfigKey::required("url", "The endpoint to POST events to."))
            .config(
                ConfigKey::optional(
                    "secret",
                    "Standard Webhooks signing secret (whsec_<base64>); requests are signed when set.",
                )
                .secret(),
            )
            .config(ConfigKey::optional(
                "timeout_ms",
                "Request timeout in milliseconds; the route's default when unset.",
            ))
    }

    fn handle(event: Event) -> Outcome {
        let settings = match Settings::from_config() {
            Ok(settings) => settings,
            Err(reason) => return Outcome::dead(reason),
        };
        match http::send(request(&event, &settings)) {
            Ok(response) => outcome_of_response(&response, event.now_ms),
            Err(error) => outcome_of_error(error),
        }
    }
}

herald_sdk::export_plugin!(Webhook);

/// The route's config, checked before anything is sent.
struct Settings {
    url: String,
    secret: Option<Secret>,
    timeout: Option<Duration>,
}

impl Settings {
    fn from_config() -> Result<Self, String> {
        let url = config::require("url").map_err(|err| err.to_string())?;
        // An empty secret (e.g. an unset environment variable) is an error, not "no
        // signing": a receiver that verifies would reject every request anyway.
        let secret = match config::get("secret") {
            Some(text) => {
                Some(Secret::parse(&text).map_err(|err| format!("config key `secret`: {err}"))?)
            }
            None => None,
        };
        let timeout = match config::parse::<u32>("timeout_ms").map_err(|err| err.to_string())? {
            Some(0) => return Err("config key `timeout_ms`: must be at least 1".into()),
            Some(ms) => Some(Duration::from_millis(ms.into())),
            None => None,
        };
        Ok(Self {
            url,
            secret,
            timeout,
        })
    }
}

fn request(event: &Event, settings: &Settings) -> Request {
    let payload = json!({
        "id": event.id,
        "type": event.event_type,
        "timestamp": event.created_at_rfc3339(),
        "entity": { "type": event.entity_type, "id": event.entity_id },
        "target": event.target,
        "data": event.data_json(),
    });
    let timestamp_secs = event.now_ms.div_euclid(1000);
    let mut request = Request::post(&settings.url)
        .json(payload)
        .header("Idempotency-Key", &event.idempotency_key)
        .header("webhook-id", &event.idempotency_key)
        .header("webhook-timestamp", timestamp_secs.to_string());
    if let Some(secret) = &settings.secret {
        let signature = webhooks::sign(
            secret,
            &event.idempotency_key,
            timestamp_secs,
            &request.body,
        );
        request = request.header("webhook-signature", signature);
    }
    if let Some(timeout) = settings.timeout {
        request = request.timeout(timeout);
    }
    request
}

fn outcome_of_response(response: &Response, now_ms: i64) -> Outcome {
    let status = response.status;
    let reason = || match excerpt(&response.body) {
        excerpt if excerpt.is_empty() => format!("HTTP {status}"),
        excerpt => format!("HTTP {status}: {excerpt}"),
    };
    match status {
        200..=299 => Outcome::delivered_with(format!("HTTP {status}")),
        410 => Outcome::dead(format!("{} (the receiver asks us to stop)", reason())),
        408 | 429 | 500..=599 => match retry_after(response, now_ms) {
            Some(after) => Outcome::retry_after(after, reason()),
            None => Outcome::retry(reason()),
        },
        _ => Outcome::dead(reason()),
    }
}

fn outcome_of_error(error: HttpError) -> Outcome {
    match error {
        HttpError::Denied(_) | HttpError::InvalidRequest(_) => Outcome::dead(format!(
            "{error} (check the route's `url` and allowed hosts)"
        )),
        HttpError::TooLarge(_) => Outcome::retry(format!(
            "{error}; the receiver may not have processed the event"
        )),
        HttpError::Timeout | HttpError::Connect(_) | HttpError::Other(_) => {
            Outcome::retry(error.to_string())
        }
    }
}

/// How long `Retry-After` asks us to wait: delay-seconds or an HTTP date, the latter
/// measured from the host's clock. `None` when absent or unreadable (the route's backoff
/// then decides).
fn retry_after(response: &Response, now_ms: i64) -> Option<Duration> {
    let value = response.header("retry-after")?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at_ms = httpdate::parse_http_date(value)
        .ok()?
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_millis();
    let now_ms = u128::try_from(now_ms).unwrap_or(0);
    let wait_ms = u64::try_from(at_ms.saturating_sub(now_ms)).unwrap_or(u64::MAX);
    Some(Duration::from_millis(wait_ms))
}

/// The start of a body as one line of at most [`EXCERPT_CHARS`] characters.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= EXCERPT_CHARS {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(EXCERPT_CHARS - 1).collect();
    cut.push('…');
    cut
}
