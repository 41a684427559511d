//! Outbound HTTP, done by the host, only to the destinations the route allows.
//!
//! ```no_run
//! use herald_sdk::prelude::*;
//!
//! # fn demo() -> Result<(), HttpError> {
//! let response = http::send(
//!     Request::post("https://example.com/hooks")
//!         .header("Idempotency-Key", "k-1")
//!         .json(serde_json::json!({ "hello": "world" })),
//! )?;
//! assert!(response.is_success());
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::event::find_header;

/// An HTTP request. Build it with [`Request::post`] (or [`Request::new`]) and the
/// chained setters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Capped by the route's limit; the route's default when `None`.
    pub timeout: Option<Duration>,
    /// A problem found while building (e.g. a value that would not serialize), reported
    /// by [`send`] so the builder can stay a plain chain.
    build_error: Option<String>,
}

impl Request {
    pub fn new(method: impl Into<String>, url: impl Into<String>) -> Self {
        Self {
            method: method.into(),
            url: url.into(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout: None,
            build_error: None,
        }
    }

    pub fn get(url: impl Into<String>) -> Self {
        Self::new("GET", url)
    }

    pub fn post(url: impl Into<String>) -> Self {
        Self::new("POST", url)
    }

    pub fn put(url: impl Into<String>) -> Self {
        Self::new("PUT", url)
    }

    /// Appends a header (an existing one of the same name is kept).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Serializes `value` as the body and sets `Content-Type: application/json` unless a
    /// content type was set already. Should `value` not serialize, [`send`] returns
    /// [`HttpError::InvalidRequest`] without sending anything.
    pub fn json(mut self, value: impl Serialize) -> Self {
        match serde_json::to_vec(&value) {
            Ok(body) => self.body = body,
            Err(err) => self.build_error = Some(format!("JSON body: {err}")),
        }
        if self.get_header("content-type").is_none() {
            self.headers
                .push(("Content-Type".into(), "application/json".into()));
        }
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The first header with this name, case-insensitively.
    pub fn get_header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The body as text, invalid UTF-8 replaced; meant for tests and logs.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An HTTP response: any status, including 4xx and 5xx. Only failures to get a response
/// at all are [`HttpError`]s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// A response with this status, no headers and no body; mostly for scripting
    /// [`crate::testing::Harness`].
    pub fn new(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The first header with this name, case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The body as text, invalid UTF-8 replaced.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

/// Why no response came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// The route does not allow this destination (host not listed, or a private
    /// address); the message says which. A configuration problem: retrying won't help.
    Denied(String),
    /// Bad method, URL or header.
    InvalidRequest(String),
    Timeout,
    /// DNS, connect or TLS failure.
    Connect(String),
    /// The response body exceeded the host's cap (bytes).
    TooLarge(u64),
    Other(String),
}

impl HttpError {
    /// Whether a later attempt may succeed: timeouts, connection failures and other
    /// errors of the way there, as opposed to a request the route or the URL forbids.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            HttpError::Timeout | HttpError::Connect(_) | HttpError::Other(_)
        )
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Denied(why) => write!(f, "denied by the route: {why}"),
            HttpError::InvalidRequest(why) => write!(f, "invalid request: {why}"),
            HttpError::Timeout => f.write_str("timed out"),
            HttpError::Connect(why) => write!(f, "connection failed: {why}"),
            HttpError::TooLarge(cap) => write!(f, "response body larger than {cap} bytes"),
            HttpError::Other(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for HttpError {}

/// Sends the request through the host and waits for the response.
pub fn send(request: Request) -> Result<Response, HttpError> {
    if let Some(why) = &request.build_error {
        return Err(HttpError::InvalidRequest(why.clone()));
    }
    crate::backend::http_send(request)
}
