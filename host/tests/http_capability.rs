//! The http capability against real servers on loopback.
//!
//! Loopback is itself a private address, so every test that expects a response sets
//! `allow_private: true`; the tests that expect a private-address refusal set it false.
//! "No connection was made" is proved with a raw listener whose accept queue must stay
//! empty, "no request was made" with a request counter on the axum server.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{AppendHeaders, IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use herald::capabilities::http::{
    HttpCapability, HttpFailure, HttpPolicy, InboundResponse, OutboundRequest,
};

const BIG_BODY: usize = 64 * 1024;

/// Upper bound on any single exchange in these tests, so a regression that makes a
/// refusal hang fails the test instead of stalling the suite.
const GUARD: Duration = Duration::from_secs(10);

struct Server {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The allowlist entry for exactly this server.
    fn entry(&self) -> String {
        self.addr.to_string()
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn count(State(hits): State<Arc<AtomicUsize>>, request: Request, next: Next) -> Response {
    hits.fetch_add(1, Ordering::SeqCst);
    next.run(request).await
}

async fn hello() -> impl IntoResponse {
    (
        AppendHeaders([("x-reply", "first"), ("x-reply", "second")]),
        "hello from the sink",
    )
}

/// Replies with what it received, so the test can see what actually went on the wire.
async fn echo(headers: HeaderMap, request: Request) -> Response {
    let method = request.method().to_string();
    let plugin_header = headers
        .get("x-plugin")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("<missing>")
        .to_owned();
    let body = match axum::body::to_bytes(request.into_body(), usize::MAX).await {
        Ok(body) => body,
        Err(_) => return StatusCode::BAD_REQUEST.into_response(),
    };
    (
        [("x-echo-method", method), ("x-echo-plugin", plugin_header)],
        body,
    )
        .into_response()
}

async fn redirect(Query(query): Query<HashMap<String, String>>) -> Response {
    match query.get("to") {
        Some(to) => (StatusCode::FOUND, [(header::LOCATION, to.clone())]).into_response(),
        None => StatusCode::BAD_REQUEST.into_response(),
    }
}

async fn redirect_loop() -> impl IntoResponse {
    (StatusCode::FOUND, [(header::LOCATION, "/loop")])
}

async fn big() -> Vec<u8> {
    vec![b'x'; BIG_BODY]
}

/// Chunked and never ending: only a streaming cap can stop reading it.
async fn endless() -> Body {
    let chunk = bytes::Bytes::from(vec![b'y'; 4096]);
    Body::from_stream(futures_util::stream::repeat_with(move || {
        Ok::<_, std::io::Error>(chunk.clone())
    }))
}

/// Never answers: the only way out is the client's timeout.
async fn slow() -> &'static str {
    std::future::pending::<()>().await;
    "unreachable"
}

async fn failing() -> impl IntoResponse {
    (StatusCode::INTERNAL_SERVER_ERROR, "sink is down")
}

async fn start_server(bind: &str) -> std::io::Result<Server> {
    let listener = tokio::net::TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let hits = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/hello", get(hello))
        .route("/echo", any(echo))
        .route("/redirect", get(redirect))
        .route("/loop", get(redirect_loop))
        .route("/big", get(big))
        .route("/endless", get(endless))
        .route("/slow", get(slow))
        .route("/failing", get(failing))
        .layer(middleware::from_fn_with_state(Arc::clone(&hits), count));
    tokio::spawn(async move {
        // The server lives as long as the test's runtime; an error ends it early and
        // shows up as a connection failure in the test that needed it.
        let _ = axum::serve(listener, app).await;
    });
    Ok(Server { addr, hits })
}

async fn server() -> Server {
    match start_server("127.0.0.1:0").await {
        Ok(server) => server,
        Err(err) => panic!("cannot bind a loopback test server: {err}"),
    }
}

/// A bare listener nobody accepts from: if anything connects, the connection waits in
/// the kernel's accept queue and `assert_untouched` finds it.
struct Sentinel {
    listener: StdTcpListener,
}

impl Sentinel {
    fn bind(addr: &str) -> Option<Self> {
        let listener = StdTcpListener::bind(addr).ok()?;
        listener.set_nonblocking(true).ok()?;
        Some(Self { listener })
    }

    fn addr(&self) -> SocketAddr {
        match self.listener.local_addr() {
            Ok(addr) => addr,
            Err(err) => panic!("sentinel has no address: {err}"),
        }
    }

    fn assert_untouched(&self) {
        match self.listener.accept() {
            Err(err) if err.kind() == ErrorKind::WouldBlock => {}
            Ok((_, peer)) => panic!("a connection reached the sentinel from {peer}"),
            Err(err) => panic!("sentinel accept failed: {err}"),
        }
    }
}

fn policy(allowed: &[String]) -> HttpPolicy {
    HttpPolicy {
        route: "test-route".to_owned(),
        allowed_hosts: allowed.to_vec(),
        allow_private: true,
        default_timeout: Duration::from_secs(5),
        max_timeout: Duration::from_secs(5),
        max_request_body: 1024,
        max_response_body: 1024,
    }
}

fn capability(policy: HttpPolicy) -> HttpCapability {
    match HttpCapability::new(policy) {
        Ok(capability) => capability,
        Err(err) => panic!("policy should be accepted: {err}"),
    }
}

fn get_request(url: impl Into<String>) -> OutboundRequest {
    OutboundRequest {
        method: "GET".to_owned(),
        url: url.into(),
        headers: Vec::new(),
        body: Vec::new(),
        timeout: None,
    }
}

async fn send(
    capability: &HttpCapability,
    request: OutboundRequest,
) -> Result<InboundResponse, HttpFailure> {
    match tokio::time::timeout(GUARD, capability.send(request)).await {
        Ok(result) => result,
        Err(_) => panic!("send did not finish within {GUARD:?}"),
    }
}

fn ok(result: Result<InboundResponse, HttpFailure>) -> InboundResponse {
    match result {
        Ok(response) => response,
        Err(failure) => panic!("expected a response, got: {failure}"),
    }
}

/// Asserts a Denied whose message contains every needle, and returns the message.
fn denied(result: Result<InboundResponse, HttpFailure>, needles: &[&str]) -> String {
    match result {
        Err(failure @ HttpFailure::Denied(_)) => {
            let message = failure.to_string();
            for needle in needles {
                assert!(
                    message.contains(needle),
                    "'{needle}' missing from: {message}"
                );
            }
            message
        }
        Err(other) => panic!("expected Denied, got: {other:?}"),
        Ok(response) => panic!("expected Denied, got status {}", response.status),
    }
}

fn invalid(result: Result<InboundResponse, HttpFailure>, needle: &str) {
    match result {
        Err(HttpFailure::InvalidRequest(message)) => {
            assert!(
                message.contains(needle),
                "'{needle}' missing from: {message}"
            )
        }
        Err(other) => panic!("expected InvalidRequest, got: {other:?}"),
        Ok(response) => panic!("expected InvalidRequest, got status {}", response.status),
    }
}

fn header_values<'a>(response: &'a InboundResponse, name: &str) -> Vec<&'a str> {
    response
        .headers
        .iter()
        .filter(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
        .collect()
}

#[tokio::test]
async fn allowed_host_returns_status_headers_and_body() {
    let server = server().await;
    let http = capability(policy(&[server.entry()]));

    let response = ok(send(&http, get_request(server.url("/hello"))).await);

    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"hello from the sink");
    assert_eq!(header_values(&response, "x-reply"), ["first", "second"]);
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn method_headers_and_body_reach_the_server() {
    let server = server().await;
    let http = capability(policy(&[server.entry()]));
    let request = OutboundRequest {
        method: "put".to_owned(),
        url: server.url("/echo"),
        headers: vec![("X-Plugin".to_owned(), "secret-token".to_owned())],
        // Exactly at the request-body limit: allowed.
        body: vec![b'z'; 1024],
        timeout: None,
    };

    let response = ok(send(&http, request).await);

    assert_eq!(response.status, 200);
    assert_eq!(header_values(&response, "x-echo-method"), ["PUT"]);
    assert_eq!(header_values(&response, "x-echo-plugin"), ["secret-token"]);
    assert_eq!(response.body, vec![b'z'; 1024]);
}

#[tokio::test]
async fn error_statuses_are_responses_not_failures() {
    let server = server().await;
    let http = capability(policy(&[server.entry()]));

    let response = ok(send(&http, get_request(server.url("/failing"))).await);

    assert_eq!(response.status, 500);
    assert_eq!(response.body, b"sink is down");
}

#[tokio::test]
async fn host_outside_the_allowlist_is_denied_before_any_connection() {
    let server = server().await;
    let sentinel = Sentinel::bind("127.0.0.1:0").unwrap_or_else(|| panic!("cannot bind"));
    let http = capability(policy(&[server.entry()]));

    denied(
        send(&http, get_request(format!("http://{}/", sentinel.addr()))).await,
        &[
            &sentinel.addr().to_string(),
            "is not in the allowed hosts of route 'test-route'",
        ],
    );
    // The allowlist compares names as written, never what they resolve to.
    let other_port = format!("http://localhost:{}/hello", server.addr.port());
    denied(
        send(&http, get_request(other_port)).await,
        &["localhost:", "not in the allowed hosts"],
    );

    sentinel.assert_untouched();
    assert_eq!(server.hits(), 0);
}

#[tokio::test]
async fn empty_allowlist_denies_everything() {
    let server = server().await;
    let http = capability(policy(&[]));

    denied(
        send(&http, get_request(server.url("/hello"))).await,
        &["route 'test-route' allows no outbound HTTP", "empty"],
    );
    assert_eq!(server.hits(), 0);
}

#[tokio::test]
async fn loopback_literal_is_denied_without_allow_private() {
    let sentinel = Sentinel::bind("127.0.0.1:0").unwrap_or_else(|| panic!("cannot bind"));
    let http = capability(HttpPolicy {
        allow_private: false,
        ..policy(&[sentinel.addr().to_string()])
    });

    let message = denied(
        send(&http, get_request(format!("http://{}/", sentinel.addr()))).await,
        &[],
    );

    assert_eq!(
        message,
        "denied: 127.0.0.1 is a loopback address and route 'test-route' does not allow \
         private addresses"
    );
    sentinel.assert_untouched();
}

#[tokio::test]
async fn hostname_resolving_to_loopback_is_denied_naming_the_address() {
    let server = server().await;
    let entry = format!("localhost:{}", server.addr.port());
    let url = format!("http://localhost:{}/hello", server.addr.port());

    let strict = capability(HttpPolicy {
        allow_private: false,
        ..policy(std::slice::from_ref(&entry))
    });
    let message = denied(
        send(&strict, get_request(url.clone())).await,
        &[
            "localhost resolves to",
            "loopback",
            "does not allow private",
        ],
    );
    assert!(
        message.contains("127.0.0.1") || message.contains("::1"),
        "the address is missing from: {message}"
    );
    assert_eq!(server.hits(), 0);

    // The same name passes the resolver once private targets are allowed.
    let open = capability(policy(&[entry]));
    assert_eq!(ok(send(&open, get_request(url)).await).status, 200);
}

#[tokio::test]
async fn metadata_and_private_literals_are_denied_immediately() {
    let http = capability(HttpPolicy {
        allow_private: false,
        // Long enough that an actual connection attempt would trip GUARD.
        default_timeout: Duration::from_secs(60),
        max_timeout: Duration::from_secs(60),
        ..policy(&[
            "169.254.169.254".to_owned(),
            "10.0.0.1".to_owned(),
            "100.64.0.1".to_owned(),
            "[::ffff:10.0.0.1]".to_owned(),
        ])
    });

    denied(
        send(
            &http,
            get_request("http://169.254.169.254/latest/meta-data/"),
        )
        .await,
        &[
            "169.254.169.254 is a link-local address",
            "route 'test-route'",
        ],
    );
    denied(
        send(&http, get_request("http://10.0.0.1/")).await,
        &["10.0.0.1 is a private address", "route 'test-route'"],
    );
    denied(
        send(&http, get_request("http://100.64.0.1/")).await,
        &["100.64.0.1 is a shared (CGNAT"],
    );
    denied(
        send(&http, get_request("http://[::ffff:10.0.0.1]/")).await,
        &["::ffff:10.0.0.1 is an IPv4-mapped non-public address"],
    );
}

#[tokio::test]
async fn ipv6_loopback_is_denied_without_allow_private() {
    let server = start_server("[::1]:0").await.ok();
    let port = server.as_ref().map_or(9000, |server| server.addr.port());
    let entry = format!("[::1]:{port}");
    let url = format!("http://[::1]:{port}/hello");

    let strict = capability(HttpPolicy {
        allow_private: false,
        ..policy(std::slice::from_ref(&entry))
    });
    denied(
        send(&strict, get_request(url.clone())).await,
        &[
            "::1 is a loopback address",
            "does not allow private addresses",
        ],
    );

    // Where the host has IPv6 loopback, prove the same target works when allowed and
    // that the refusal above made no request.
    if let Some(server) = server {
        assert_eq!(server.hits(), 0);
        let open = capability(policy(&[entry]));
        assert_eq!(ok(send(&open, get_request(url)).await).status, 200);
        assert_eq!(server.hits(), 1);
    }
}

fn redirect_to(server: &Server, target: &str) -> String {
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("to", target)
        .finish();
    server.url(&format!("/redirect?{query}"))
}

#[tokio::test]
async fn redirect_within_allowed_hosts_is_followed() {
    let first = server().await;
    let second = server().await;
    let http = capability(policy(&[first.entry(), second.entry()]));

    let response = ok(send(
        &http,
        get_request(redirect_to(&first, &second.url("/hello"))),
    )
    .await);

    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"hello from the sink");
    assert_eq!((first.hits(), second.hits()), (1, 1));
}

#[tokio::test]
async fn redirect_to_a_host_outside_the_allowlist_is_refused() {
    let first = server().await;
    let outsider = server().await;
    let http = capability(policy(&[first.entry()]));

    denied(
        send(
            &http,
            get_request(redirect_to(&first, &outsider.url("/hello"))),
        )
        .await,
        &[
            &format!("redirect from {} to {} refused", first.addr, outsider.addr),
            "is not in the allowed hosts of route 'test-route'",
        ],
    );
    assert_eq!(first.hits(), 1);
    assert_eq!(outsider.hits(), 0);
}

#[tokio::test]
async fn redirect_to_the_metadata_address_is_refused() {
    let first = server().await;
    let http = capability(policy(&[first.entry()]));

    denied(
        send(
            &http,
            get_request(redirect_to(
                &first,
                "http://169.254.169.254/latest/meta-data/",
            )),
        )
        .await,
        &["redirect from", "to 169.254.169.254:80 refused"],
    );
}

#[tokio::test]
async fn redirect_to_another_scheme_is_refused() {
    let first = server().await;
    let http = capability(policy(&[first.entry()]));

    denied(
        send(
            &http,
            get_request(redirect_to(&first, "ftp://127.0.0.1/file")),
        )
        .await,
        &["refused: scheme 'ftp' is not allowed"],
    );
}

#[tokio::test]
async fn redirect_loops_stop_after_five_hops() {
    let server = server().await;
    let http = capability(policy(&[server.entry()]));

    match send(&http, get_request(server.url("/loop"))).await {
        Err(HttpFailure::Other(message)) => {
            assert!(message.contains("too many redirects"), "{message}")
        }
        other => panic!("expected too many redirects, got {other:?}"),
    }
    // The original request plus five followed redirects.
    assert_eq!(server.hits(), 6);
}

#[tokio::test]
async fn response_over_the_cap_is_too_large() {
    let server = server().await;
    let http = capability(policy(&[server.entry()]));

    assert_eq!(
        send(&http, get_request(server.url("/big"))).await,
        Err(HttpFailure::TooLarge(1024))
    );
    // No Content-Length and no end: only the streaming check can stop this one.
    assert_eq!(
        send(&http, get_request(server.url("/endless"))).await,
        Err(HttpFailure::TooLarge(1024))
    );

    // Exactly at the cap is fine.
    let roomy = capability(HttpPolicy {
        max_response_body: BIG_BODY,
        ..policy(&[server.entry()])
    });
    assert_eq!(
        ok(send(&roomy, get_request(server.url("/big"))).await)
            .body
            .len(),
        BIG_BODY
    );
}

#[tokio::test]
async fn request_body_over_the_cap_is_invalid_and_not_sent() {
    let server = server().await;
    let http = capability(policy(&[server.entry()]));
    let request = OutboundRequest {
        method: "POST".to_owned(),
        body: vec![0; 1025],
        ..get_request(server.url("/echo"))
    };

    invalid(
        send(&http, request).await,
        "request body is 1025 bytes, over route 'test-route' limit of 1024 bytes",
    );
    assert_eq!(server.hits(), 0);
}

#[tokio::test]
async fn slow_server_times_out() {
    let server = server().await;

    // The plugin's own timeout.
    let http = capability(policy(&[server.entry()]));
    let request = OutboundRequest {
        timeout: Some(Duration::from_millis(200)),
        ..get_request(server.url("/slow"))
    };
    assert_eq!(send(&http, request).await, Err(HttpFailure::Timeout));

    // The route's default, when the plugin asks for none.
    let short_default = capability(HttpPolicy {
        default_timeout: Duration::from_millis(200),
        ..policy(&[server.entry()])
    });
    assert_eq!(
        send(&short_default, get_request(server.url("/slow"))).await,
        Err(HttpFailure::Timeout)
    );

    // A plugin asking for an hour still gets the route's maximum.
    let short_max = capability(HttpPolicy {
        max_timeout: Duration::from_millis(200),
        ..policy(&[server.entry()])
    });
    let greedy = OutboundRequest {
        timeout: Some(Duration::from_secs(3600)),
        ..get_request(server.url("/slow"))
    };
    assert_eq!(send(&short_max, greedy).await, Err(HttpFailure::Timeout));
}

#[tokio::test]
async fn malformed_requests_are_invalid() {
    let server = server().await;
    let http = capability(HttpPolicy {
        allowed_hosts: vec!["*:*".to_owned()],
        ..policy(&[])
    });

    invalid(
        send(&http, get_request("not a url")).await,
        "url is not valid",
    );
    invalid(
        send(&http, get_request("ftp://127.0.0.1/file")).await,
        "url scheme 'ftp' is not supported; use http or https",
    );
    invalid(
        send(&http, get_request("file:///etc/passwd")).await,
        "url scheme 'file' is not supported",
    );
    invalid(
        send(
            &http,
            OutboundRequest {
                method: "CONNECT".to_owned(),
                ..get_request(server.url("/hello"))
            },
        )
        .await,
        "method 'CONNECT' is not supported",
    );
    invalid(
        send(
            &http,
            OutboundRequest {
                timeout: Some(Duration::ZERO),
                ..get_request(server.url("/hello"))
            },
        )
        .await,
        "timeout must be greater than zero",
    );
    assert_eq!(server.hits(), 0);
}

#[tokio::test]
async fn connection_headers_are_rejected_without_leaking_values() {
    let server = server().await;
    let http = capability(policy(&[server.entry()]));

    for name in ["Host", "Content-Length", "Transfer-Encoding", "Connection"] {
        let request = OutboundRequest {
            headers: vec![(name.to_owned(), "internal.example".to_owned())],
            ..get_request(server.url("/hello"))
        };
        match send(&http, request).await {
            Err(HttpFailure::InvalidRequest(message)) => {
                assert!(message.contains(&format!("header '{name}' may not be set")));
                assert!(!message.contains("internal.example"), "{message}");
            }
            other => panic!("{name}: expected InvalidRequest, got {other:?}"),
        }
    }
    let bad_value = OutboundRequest {
        headers: vec![("x-token".to_owned(), "secret\nvalue".to_owned())],
        ..get_request(server.url("/hello"))
    };
    match send(&http, bad_value).await {
        Err(HttpFailure::InvalidRequest(message)) => {
            assert!(message.contains("value of header 'x-token'"), "{message}");
            assert!(!message.contains("secret"), "{message}");
        }
        other => panic!("expected InvalidRequest, got {other:?}"),
    }
    assert_eq!(server.hits(), 0);
}

#[tokio::test]
async fn refused_connection_is_a_connect_failure() {
    // Bind then drop, so the port is (almost certainly) closed.
    let addr = match StdTcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(addr) => addr,
        Err(err) => panic!("cannot bind: {err}"),
    };
    let http = capability(policy(&[addr.to_string()]));

    match send(&http, get_request(format!("http://{addr}/"))).await {
        Err(HttpFailure::Connect(message)) => {
            assert!(message.starts_with(&addr.to_string()), "{message}")
        }
        other => panic!("expected Connect, got {other:?}"),
    }
}
