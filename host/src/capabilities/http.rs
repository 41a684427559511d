//! The host side of a plugin's `http.send`.
//!
//! A plugin never touches a socket: it hands the host an [`OutboundRequest`] and the
//! host decides whether, where and how long to talk. Every route gets its own
//! [`HttpCapability`], and with it its own `reqwest::Client`, because the SSRF rules
//! are wired into the client itself (the DNS resolver and the redirect policy). A
//! check done only before `send` would be bypassed by a hostname that resolves to an
//! internal address, or by a redirect from an allowed host to a forbidden one.
//!
//! The order of checks in [`HttpCapability::send`] is deliberate: the request's shape,
//! then the allowlist, then the address rule for IP literals, and only then the
//! network. A refused request therefore never resolves a name or opens a connection.
//!
//! Header *values* are never logged and never appear in errors: plugins put API keys and
//! signatures in them. For the same reason only the host (not the path or query) of a URL
//! is logged or named in errors.
//!
//! # Allowed-host syntax
//!
//! `HOST[:PORT]`, where `HOST` is a domain (`api.example.com`), a wildcard
//! (`*.example.com`: any subdomain at any depth, not the apex), `*` (any host; the
//! private-address rule still applies), an IPv4 address or a bracketed IPv6 address
//! (`[::1]`), and `PORT` is a number or `*`. Without a port only the scheme's default
//! port (80 for http, 443 for https) is allowed, so allowing a host does not open its
//! admin ports too. Matching is case-insensitive and ignores a trailing dot.

use std::error::Error as StdError;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{redirect, Method};
use url::{Host, Url};

/// Redirects followed per request; the sixth is refused.
pub const MAX_REDIRECTS: usize = 5;

/// Request headers a plugin may not set. The host derives them from the URL and body,
/// or they govern the connection rather than the message; letting a plugin set `Host`
/// would also let it reach a different virtual host behind an allowed address.
/// They are rejected (not silently dropped) so a plugin author learns at once why the
/// request differs from what they wrote.
const FORBIDDEN_REQUEST_HEADERS: [&str; 9] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// Methods a plugin may use. CONNECT would tunnel past every rule here and TRACE echoes
/// request headers (secrets) back, so neither is offered.
const ALLOWED_METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// What one route's plugin may do over HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpPolicy {
    /// Route name, used only to make refusals say whose policy refused.
    pub route: String,
    /// See the module docs for the syntax. Empty means the route has no HTTP at all.
    pub allowed_hosts: Vec<String>,
    /// Permit loopback, private, link-local and other non-public targets.
    pub allow_private: bool,
    /// Used when the plugin asks for no timeout; capped by `max_timeout` too.
    pub default_timeout: Duration,
    /// Ceiling on any timeout a plugin asks for.
    pub max_timeout: Duration,
    pub max_request_body: usize,
    pub max_response_body: usize,
}

impl Default for HttpPolicy {
    /// A policy that allows nothing; fill in `route` and `allowed_hosts`.
    fn default() -> Self {
        Self {
            route: String::new(),
            allowed_hosts: Vec::new(),
            allow_private: false,
            default_timeout: Duration::from_secs(10),
            max_timeout: Duration::from_secs(30),
            max_request_body: 1024 * 1024,
            max_response_body: 4 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundRequest {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundResponse {
    pub status: u16,
    /// Lower-case names, in the order received; repeated headers stay separate entries.
    /// Values that are not UTF-8 are converted lossily.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Why `send` did not produce a response. Non-2xx responses are *not* failures: the
/// plugin decides what a 500 means.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpFailure {
    /// The route's policy forbids this destination.
    #[error("denied: {0}")]
    Denied(String),
    /// The request itself is malformed or over a limit; retrying will not help.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// No complete response within the effective timeout.
    #[error("timed out: no complete response within the time limit (the plugin's timeout or the route's default, capped by the route's maximum)")]
    Timeout,
    /// Name resolution, TCP or TLS failed.
    #[error("connection failed: {0}")]
    Connect(String),
    /// The response body exceeded the route's limit (the limit, in bytes).
    #[error("response body exceeds the route's limit of {0} bytes")]
    TooLarge(u64),
    #[error("http error: {0}")]
    Other(String),
}

/// A route's HTTP policy that cannot be put into effect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpConfigError {
    #[error("route '{route}': allowed host '{entry}' is invalid: {reason}")]
    InvalidAllowedHost {
        route: String,
        entry: String,
        reason: String,
    },
    #[error("route '{route}': {reason}")]
    InvalidLimit { route: String, reason: String },
    #[error("route '{route}': cannot build the HTTP client: {reason}")]
    Client { route: String, reason: String },
}

/// One route's outbound HTTP. Cheap to clone; clones share the connection pool.
#[derive(Clone)]
pub struct HttpCapability {
    inner: Arc<Inner>,
}

struct Inner {
    guard: Arc<Guard>,
    client: reqwest::Client,
    default_timeout: Duration,
    max_timeout: Duration,
    max_request_body: usize,
    max_response_body: usize,
}

impl fmt::Debug for HttpCapability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCapability")
            .field("route", &self.inner.guard.route)
            .field("allowed_hosts", &self.inner.guard.allowed)
            .field("allow_private", &self.inner.guard.allow_private)
            .finish_non_exhaustive()
    }
}

impl HttpCapability {
    pub fn new(policy: HttpPolicy) -> Result<Self, HttpConfigError> {
        let route = policy.route;
        let allowed = policy
            .allowed_hosts
            .iter()
            .map(|entry| {
                AllowedHost::parse(entry).map_err(|reason| HttpConfigError::InvalidAllowedHost {
                    route: route.clone(),
                    entry: entry.clone(),
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if policy.max_timeout.is_zero() || policy.default_timeout.is_zero() {
            return Err(HttpConfigError::InvalidLimit {
                route,
                reason: "HTTP timeouts must be greater than zero".to_owned(),
            });
        }

        let guard = Arc::new(Guard {
            route: route.clone(),
            allowed,
            allow_private: policy.allow_private,
        });

        let redirect_guard = Arc::clone(&guard);
        let client = reqwest::Client::builder()
            .dns_resolver(GuardedResolver {
                guard: Arc::clone(&guard),
            })
            .redirect(redirect::Policy::custom(
                move |attempt| match redirect_guard
                    .check_redirect(attempt.url(), attempt.previous())
                {
                    Ok(()) => attempt.follow(),
                    Err(failure) => attempt.error(Refused(failure)),
                },
            ))
            // A proxy would resolve names itself, out of reach of the guarded resolver.
            .no_proxy()
            // Referer would hand the previous URL (query string and all) to the next hop.
            .referer(false)
            .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|err| HttpConfigError::Client {
                route: route.clone(),
                reason: error_chain(&err),
            })?;

        Ok(Self {
            inner: Arc::new(Inner {
                guard,
                client,
                default_timeout: policy.default_timeout,
                max_timeout: policy.max_timeout,
                max_request_body: policy.max_request_body,
                max_response_body: policy.max_response_body,
            }),
        })
    }

    /// Performs one exchange under the route's policy. The timeout covers everything
    /// from name resolution to the last body byte, redirects included.
    pub async fn send(&self, request: OutboundRequest) -> Result<InboundResponse, HttpFailure> {
        let route = &self.inner.guard.route;
        let prepared = match self.prepare(request) {
            Ok(prepared) => prepared,
            Err(failure) => {
                // The failure text names the host where one is known, never header values.
                tracing::debug!(route = %route, error = %failure, "http.send refused");
                return Err(failure);
            }
        };
        let method = prepared.method.clone();
        let target = host_port(&prepared.url);

        let result = match tokio::time::timeout(prepared.timeout, self.exchange(prepared)).await {
            Ok(result) => result,
            Err(_elapsed) => Err(HttpFailure::Timeout),
        };

        match &result {
            Ok(response) => tracing::debug!(
                route = %route,
                method = %method,
                host = %target,
                status = response.status,
                "http.send completed"
            ),
            Err(failure) => tracing::debug!(
                route = %route,
                method = %method,
                host = %target,
                error = %failure,
                "http.send failed"
            ),
        }
        result
    }

    /// Everything that can be decided without the network, so a refused request costs
    /// no DNS query and no connection.
    fn prepare(&self, request: OutboundRequest) -> Result<Prepared, HttpFailure> {
        let inner = &self.inner;
        let method = parse_method(&request.method)?;
        let url = parse_url(&request.url)?;
        let headers = parse_headers(&request.headers)?;
        if request.body.len() > inner.max_request_body {
            return Err(HttpFailure::InvalidRequest(format!(
                "request body is {} bytes, over route '{}' limit of {} bytes",
                request.body.len(),
                inner.guard.route,
                inner.max_request_body
            )));
        }
        let timeout = match request.timeout {
            Some(requested) if requested.is_zero() => {
                return Err(HttpFailure::InvalidRequest(
                    "timeout must be greater than zero".to_owned(),
                ))
            }
            Some(requested) => requested,
            None => inner.default_timeout,
        }
        .min(inner.max_timeout);

        inner.guard.check_destination(&url)?;

        Ok(Prepared {
            method,
            url,
            headers,
            body: request.body,
            timeout,
        })
    }

    async fn exchange(&self, prepared: Prepared) -> Result<InboundResponse, HttpFailure> {
        let max_body = self.inner.max_response_body;
        let target = host_port(&prepared.url);
        let mut builder = self
            .inner
            .client
            .request(prepared.method, prepared.url)
            .headers(prepared.headers);
        if !prepared.body.is_empty() {
            builder = builder.body(prepared.body);
        }
        let mut response = builder.send().await.map_err(|err| classify(err, &target))?;

        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect();

        // An honest Content-Length lets us refuse before reading a byte; the streaming
        // check below still guards against a server that lies or sends none.
        let declared = response.content_length();
        if declared.is_some_and(|len| len > max_body as u64) {
            return Err(HttpFailure::TooLarge(max_body as u64));
        }
        let mut body = Vec::with_capacity(declared.map_or(0, |len| len as usize));
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|err| classify(err, &target))?
        {
            if body.len().saturating_add(chunk.len()) > max_body {
                return Err(HttpFailure::TooLarge(max_body as u64));
            }
            body.extend_from_slice(&chunk);
        }

        Ok(InboundResponse {
            status,
            headers,
            body,
        })
    }
}

struct Prepared {
    method: Method,
    url: Url,
    headers: HeaderMap,
    body: Vec<u8>,
    timeout: Duration,
}

fn parse_method(method: &str) -> Result<Method, HttpFailure> {
    let upper = method.to_ascii_uppercase();
    if !ALLOWED_METHODS.contains(&upper.as_str()) {
        return Err(HttpFailure::InvalidRequest(format!(
            "method '{method}' is not supported; use one of {}",
            ALLOWED_METHODS.join(", ")
        )));
    }
    Method::from_bytes(upper.as_bytes())
        .map_err(|_| HttpFailure::InvalidRequest(format!("method '{method}' is not valid")))
}

fn parse_url(raw: &str) -> Result<Url, HttpFailure> {
    // The URL itself is not echoed: its query string may carry a token.
    let url = Url::parse(raw)
        .map_err(|err| HttpFailure::InvalidRequest(format!("url is not valid: {err}")))?;
    match url.scheme() {
        "http" | "https" => {}
        other => {
            return Err(HttpFailure::InvalidRequest(format!(
                "url scheme '{other}' is not supported; use http or https"
            )))
        }
    }
    if url.host().is_none() {
        return Err(HttpFailure::InvalidRequest("url has no host".to_owned()));
    }
    Ok(url)
}

fn parse_headers(headers: &[(String, String)]) -> Result<HeaderMap, HttpFailure> {
    let mut map = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            HttpFailure::InvalidRequest(format!("header name '{name}' is not a valid name"))
        })?;
        if FORBIDDEN_REQUEST_HEADERS.contains(&header.as_str()) {
            return Err(HttpFailure::InvalidRequest(format!(
                "header '{name}' may not be set by a plugin: the host derives it from the url \
                 and body or it controls the connection"
            )));
        }
        let value = HeaderValue::from_str(value).map_err(|_| {
            HttpFailure::InvalidRequest(format!(
                "value of header '{name}' is not valid (control characters or non-visible bytes)"
            ))
        })?;
        map.append(header, value);
    }
    Ok(map)
}

/// `host:port` of a URL, for logs and messages; never the path or query.
fn host_port(url: &Url) -> String {
    let host = url.host_str().unwrap_or("");
    match url.port_or_known_default() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    }
}

/// Turns a reqwest error into a failure, preferring our own refusal if one is buried in
/// the chain (the resolver and redirect policy can only report through reqwest).
fn classify(err: reqwest::Error, target: &str) -> HttpFailure {
    let mut source: Option<&(dyn StdError + 'static)> = Some(&err);
    while let Some(current) = source {
        if let Some(Refused(failure)) = current.downcast_ref::<Refused>() {
            return failure.clone();
        }
        source = current.source();
    }
    if err.is_timeout() {
        return HttpFailure::Timeout;
    }
    // without_url: reqwest's message would otherwise include the full URL.
    let err = err.without_url();
    let detail = error_chain(&err);
    if err.is_connect() {
        HttpFailure::Connect(format!("{target}: {detail}"))
    } else {
        HttpFailure::Other(format!("{target}: {detail}"))
    }
}

fn error_chain(err: &dyn StdError) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(current) = source {
        let text = current.to_string();
        // hyper and reqwest often repeat the inner message in the outer one.
        if parts.last().is_none_or(|last| !last.contains(&text)) {
            parts.push(text);
        }
        source = current.source();
    }
    parts.join(": ")
}

/// Carries a policy decision through reqwest's boxed-error plumbing back to `classify`.
#[derive(Debug)]
struct Refused(HttpFailure);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl StdError for Refused {}

/// The destination rules of one route, shared by `send`, the resolver and the
/// redirect policy so all three judge by the same list.
#[derive(Debug)]
struct Guard {
    route: String,
    allowed: Vec<AllowedHost>,
    allow_private: bool,
}

impl Guard {
    fn check_destination(&self, url: &Url) -> Result<(), HttpFailure> {
        if self.allowed.is_empty() {
            return Err(HttpFailure::Denied(format!(
                "route '{}' allows no outbound HTTP (its allowed_hosts list is empty)",
                self.route
            )));
        }
        if !self.allowed.iter().any(|allowed| allowed.matches(url)) {
            let list = self
                .allowed
                .iter()
                .map(|allowed| allowed.entry.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(HttpFailure::Denied(format!(
                "{} is not in the allowed hosts of route '{}' ({list})",
                host_port(url),
                self.route
            )));
        }
        // Names are checked by the resolver once resolved; literals never reach it.
        let literal = match url.host() {
            Some(Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
            _ => None,
        };
        if let Some(ip) = literal {
            self.check_address(ip, None)?;
        }
        Ok(())
    }

    fn check_redirect(&self, next: &Url, previous: &[Url]) -> Result<(), HttpFailure> {
        // `previous` holds the original URL plus every hop already followed.
        if previous.len() > MAX_REDIRECTS {
            return Err(HttpFailure::Other(format!(
                "too many redirects: route '{}' follows at most {MAX_REDIRECTS}",
                self.route
            )));
        }
        let from = previous.last().map(host_port).unwrap_or_default();
        let refuse = |why: String| {
            HttpFailure::Denied(format!(
                "redirect from {from} to {} refused: {why}",
                host_port(next)
            ))
        };
        match next.scheme() {
            "http" | "https" => {}
            other => {
                return Err(refuse(format!(
                    "scheme '{other}' is not allowed; only http and https are"
                )))
            }
        }
        self.check_destination(next)
            .map_err(|failure| match failure {
                HttpFailure::Denied(why) => refuse(why),
                other => other,
            })
    }

    /// `name` is the hostname the address came from, so the message can say both.
    fn check_address(&self, ip: IpAddr, name: Option<&str>) -> Result<(), HttpFailure> {
        if self.allow_private {
            return Ok(());
        }
        match non_public_kind(ip) {
            None => Ok(()),
            Some(kind) => Err(HttpFailure::Denied(match name {
                Some(name) => format!(
                    "{name} resolves to {ip}, which is {kind}, and route '{}' does not allow \
                     private addresses",
                    self.route
                ),
                None => format!(
                    "{ip} is {kind} and route '{}' does not allow private addresses",
                    self.route
                ),
            })),
        }
    }
}

/// Why an address is not a public unicast destination, or `None` if it is.
fn non_public_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            // ::ffff:10.0.0.1 reaches 10.0.0.1 on a dual-stack socket.
            Some(v4) => non_public_v4(v4).map(|_| "an IPv4-mapped non-public address"),
            None => non_public_v6(v6),
        },
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_private() {
        Some("a private address")
    } else if ip.is_link_local() {
        Some("a link-local address")
    } else if ip.is_unspecified() || ip.octets()[0] == 0 {
        // Linux routes 0.0.0.0 (and lets 0/8 be assigned) to this host.
        Some("an unspecified ('this network') address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip.is_broadcast() {
        Some("a broadcast address")
    } else if is_cgnat(ip) {
        Some("a shared (CGNAT, 100.64.0.0/10) address")
    } else {
        None
    }
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_unspecified() {
        Some("an unspecified address")
    } else if ip.is_unique_local() {
        Some("a unique-local (private) address")
    } else if ip.is_unicast_link_local() {
        Some("a link-local address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else {
        None
    }
}

/// 100.64.0.0/10: carrier-grade NAT space, internal to the provider's network.
/// (std's `is_shared` is not stable yet.)
fn is_cgnat(ip: Ipv4Addr) -> bool {
    let [a, b, _, _] = ip.octets();
    a == 100 && (b & 0b1100_0000) == 0b0100_0000
}

/// Resolves with the system resolver, then refuses the whole name if any address is
/// non-public: a name that mixes public and private answers is either misconfigured or
/// a rebinding attempt, and silently dropping some answers would hide both.
struct GuardedResolver {
    guard: Arc<Guard>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(resolve_guarded(
            Arc::clone(&self.guard),
            name.as_str().to_owned(),
        ))
    }
}

type BoxError = Box<dyn StdError + Send + Sync>;

async fn resolve_guarded(guard: Arc<Guard>, host: String) -> Result<Addrs, BoxError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
        .await
        .map_err(|err| format!("cannot resolve {host}: {err}"))?
        .collect();
    for addr in &addrs {
        guard
            .check_address(addr.ip(), Some(&host))
            .map_err(Refused)?;
    }
    if addrs.is_empty() {
        return Err(format!("cannot resolve {host}: no addresses").into());
    }
    Ok(Box::new(addrs.into_iter()))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Any,
    /// Stored with its leading dot, so `.example.com` never matches `badexample.com`.
    Suffix(String),
    Domain(String),
    Ip(IpAddr),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortPattern {
    /// The scheme's default port only.
    Default,
    Exact(u16),
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct AllowedHost {
    entry: String,
    host: HostPattern,
    port: PortPattern,
}

impl AllowedHost {
    fn parse(entry: &str) -> Result<Self, String> {
        let trimmed = entry.trim();
        if trimmed.is_empty() {
            return Err("it is empty".to_owned());
        }
        if trimmed.contains('/') {
            return Err("write only the host and optional port, without scheme or path".to_owned());
        }
        let lower = trimmed.to_ascii_lowercase();

        let (host, port) = if let Some(rest) = lower.strip_prefix('[') {
            let (inside, after) = rest
                .split_once(']')
                .ok_or("an IPv6 address opened with '[' needs a closing ']'")?;
            let ip: Ipv6Addr = inside
                .parse()
                .map_err(|_| format!("'{inside}' is not an IPv6 address"))?;
            let port = match after {
                "" => None,
                _ => Some(
                    after
                        .strip_prefix(':')
                        .ok_or("only ':PORT' may follow ']'")?,
                ),
            };
            (HostPattern::Ip(IpAddr::V6(ip)), port)
        } else if let Ok(ip) = lower.parse::<Ipv6Addr>() {
            (HostPattern::Ip(IpAddr::V6(ip)), None)
        } else {
            let (host, port) = match lower.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (lower.as_str(), None),
            };
            (parse_host_pattern(host)?, port)
        };

        let port = match port {
            None => PortPattern::Default,
            Some("*") => PortPattern::Any,
            Some(port) => match port.parse::<u16>() {
                Ok(0) | Err(_) => {
                    return Err(format!("'{port}' is not a port (1-65535 or '*')"));
                }
                Ok(port) => PortPattern::Exact(port),
            },
        };
        Ok(Self {
            entry: trimmed.to_owned(),
            host,
            port,
        })
    }

    fn matches(&self, url: &Url) -> bool {
        let port_ok = match self.port {
            // The url crate drops an explicit default port, so `None` means default.
            PortPattern::Default => url.port().is_none(),
            PortPattern::Exact(port) => url.port_or_known_default() == Some(port),
            PortPattern::Any => true,
        };
        if !port_ok {
            return false;
        }
        match (&self.host, url.host()) {
            (HostPattern::Any, Some(_)) => true,
            // The url crate already lower-cases http(s) hosts; this only guards that.
            (HostPattern::Domain(want), Some(Host::Domain(got))) => {
                normalize_domain(got).eq_ignore_ascii_case(want)
            }
            (HostPattern::Suffix(suffix), Some(Host::Domain(got))) => normalize_domain(got)
                .to_ascii_lowercase()
                .ends_with(suffix.as_str()),
            (HostPattern::Ip(want), Some(Host::Ipv4(got))) => *want == IpAddr::V4(got),
            (HostPattern::Ip(want), Some(Host::Ipv6(got))) => *want == IpAddr::V6(got),
            _ => false,
        }
    }
}

fn parse_host_pattern(host: &str) -> Result<HostPattern, String> {
    if host == "*" {
        return Ok(HostPattern::Any);
    }
    if let Some(suffix) = host.strip_prefix("*.") {
        return match parse_host(suffix)? {
            HostPattern::Domain(domain) => Ok(HostPattern::Suffix(format!(".{domain}"))),
            _ => Err("a wildcard must be followed by a domain, not an address".to_owned()),
        };
    }
    if host.contains('*') {
        return Err("'*' may only appear as a leading '*.' or as the whole host".to_owned());
    }
    parse_host(host)
}

/// Parses with the same rules as URLs, so `2130706433` here means what it means there.
fn parse_host(host: &str) -> Result<HostPattern, String> {
    match Host::parse(host) {
        Ok(Host::Domain(domain)) => Ok(HostPattern::Domain(normalize_domain(&domain).to_owned())),
        Ok(Host::Ipv4(ip)) => Ok(HostPattern::Ip(IpAddr::V4(ip))),
        Ok(Host::Ipv6(ip)) => Ok(HostPattern::Ip(IpAddr::V6(ip))),
        Err(err) => Err(format!("'{host}' is not a host name: {err}")),
    }
}

/// `api.example.com.` and `api.example.com` are the same DNS name.
fn normalize_domain(domain: &str) -> &str {
    domain.strip_suffix('.').unwrap_or(domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(entry: &str) -> AllowedHost {
        match AllowedHost::parse(entry) {
            Ok(parsed) => parsed,
            Err(reason) => panic!("'{entry}' should parse: {reason}"),
        }
    }

    fn url(raw: &str) -> Url {
        match Url::parse(raw) {
            Ok(url) => url,
            Err(err) => panic!("'{raw}' should parse: {err}"),
        }
    }

    fn guard(entries: &[&str], allow_private: bool) -> Guard {
        Guard {
            route: "r".to_owned(),
            allowed: entries.iter().map(|entry| allowed(entry)).collect(),
            allow_private,
        }
    }

    #[test]
    fn exact_host_matches_case_insensitively_on_default_port_only() {
        let entry = allowed("API.Example.com");
        assert!(entry.matches(&url("https://api.example.com/x")));
        assert!(entry.matches(&url("http://API.EXAMPLE.COM/")));
        assert!(entry.matches(&url("https://api.example.com:443/")));
        assert!(entry.matches(&url("https://api.example.com./")));
        assert!(!entry.matches(&url("https://api.example.com:8443/")));
        assert!(!entry.matches(&url("http://api.example.com:443/")));
        assert!(!entry.matches(&url("https://other.example.com/")));
        assert!(!entry.matches(&url("https://api.example.com.evil.net/")));
    }

    #[test]
    fn explicit_and_any_port() {
        let exact = allowed("api.example.com:8443");
        assert!(exact.matches(&url("https://api.example.com:8443/")));
        assert!(!exact.matches(&url("https://api.example.com/")));
        let https_default = allowed("api.example.com:443");
        assert!(https_default.matches(&url("https://api.example.com/")));
        let any = allowed("api.example.com:*");
        assert!(any.matches(&url("http://api.example.com:1/")));
        assert!(any.matches(&url("https://api.example.com/")));
    }

    #[test]
    fn wildcard_matches_subdomains_at_any_depth_but_not_the_apex() {
        let entry = allowed("*.example.com");
        assert!(entry.matches(&url("https://a.example.com/")));
        assert!(entry.matches(&url("https://a.b.EXAMPLE.com/")));
        assert!(!entry.matches(&url("https://example.com/")));
        assert!(!entry.matches(&url("https://badexample.com/")));
        assert!(!entry.matches(&url("https://a.example.com.evil.net/")));
        let star = allowed("*");
        assert!(star.matches(&url("https://anything.test/")));
        assert!(star.matches(&url("http://10.0.0.1/")));
        assert!(!star.matches(&url("http://anything.test:8080/")));
        assert!(allowed("*:*").matches(&url("http://anything.test:8080/")));
    }

    #[test]
    fn ip_literal_entries() {
        assert!(allowed("127.0.0.1:8080").matches(&url("http://127.0.0.1:8080/")));
        assert!(!allowed("127.0.0.1:8080").matches(&url("http://127.0.0.2:8080/")));
        // The URL parser's IPv4 shorthand lands on the same address.
        assert!(allowed("127.0.0.1:8080").matches(&url("http://2130706433:8080/")));
        assert!(allowed("[::1]:9000").matches(&url("http://[::1]:9000/")));
        assert!(allowed("[0:0::1]:9000").matches(&url("http://[::1]:9000/")));
        assert!(allowed("::1").matches(&url("http://[::1]/")));
        assert!(!allowed("127.0.0.1:8080").matches(&url("http://[::ffff:127.0.0.1]:8080/")));
    }

    #[test]
    fn malformed_entries_are_refused_with_a_reason() {
        for (entry, needle) in [
            ("", "empty"),
            ("https://api.example.com", "without scheme"),
            ("api.example.com/path", "without scheme or path"),
            ("api.example.com:0", "not a port"),
            ("api.example.com:http", "not a port"),
            ("api.*.com", "'*' may only"),
            ("*api.example.com", "'*' may only"),
            ("*.127.0.0.1", "not an address"),
            ("[::1", "closing ']'"),
            ("[::1]9000", "':PORT'"),
            ("[nonsense]:1", "not an IPv6 address"),
            ("bad host.com", "not a host name"),
        ] {
            match AllowedHost::parse(entry) {
                Ok(parsed) => panic!("'{entry}' should be refused, got {parsed:?}"),
                Err(reason) => assert!(reason.contains(needle), "'{entry}': {reason}"),
            }
        }
    }

    #[test]
    fn non_public_addresses_are_classified() {
        for (ip, kind) in [
            ("10.0.0.1", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("127.0.0.1", "loopback"),
            ("127.1.2.3", "loopback"),
            ("169.254.169.254", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("100.64.0.1", "CGNAT"),
            ("100.127.255.255", "CGNAT"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fc00::1", "unique-local"),
            ("fd12:3456::1", "unique-local"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("::ffff:10.0.0.1", "IPv4-mapped"),
            ("::ffff:127.0.0.1", "IPv4-mapped"),
            ("::ffff:169.254.169.254", "IPv4-mapped"),
        ] {
            let parsed: IpAddr = match ip.parse() {
                Ok(parsed) => parsed,
                Err(err) => panic!("{ip}: {err}"),
            };
            match non_public_kind(parsed) {
                Some(found) => assert!(found.contains(kind), "{ip}: {found}"),
                None => panic!("{ip} should be non-public"),
            }
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "100.63.255.255",
            "100.128.0.1",
            "172.32.0.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            let parsed: IpAddr = match ip.parse() {
                Ok(parsed) => parsed,
                Err(err) => panic!("{ip}: {err}"),
            };
            assert_eq!(non_public_kind(parsed), None, "{ip} should be public");
        }
    }

    #[test]
    fn destination_check_names_the_address_and_the_rule() {
        let strict = guard(&["127.0.0.1:8080", "169.254.169.254"], false);
        match strict.check_destination(&url("http://2130706433:8080/")) {
            Err(HttpFailure::Denied(why)) => assert_eq!(
                why,
                "127.0.0.1 is a loopback address and route 'r' does not allow private addresses"
            ),
            other => panic!("expected Denied, got {other:?}"),
        }
        let open = guard(&["127.0.0.1:8080"], true);
        assert_eq!(
            open.check_destination(&url("http://127.0.0.1:8080/")),
            Ok(())
        );
    }

    #[test]
    fn redirect_hops_are_judged_like_first_requests() {
        let previous = [url("https://api.example.com/start")];
        let strict = guard(&["api.example.com", "169.254.169.254"], false);

        // Allowlisted, yet still refused: the private rule applies to every hop.
        match strict.check_redirect(&url("http://169.254.169.254/latest/"), &previous) {
            Err(HttpFailure::Denied(why)) => {
                assert!(
                    why.starts_with(
                        "redirect from api.example.com:443 to 169.254.169.254:80 refused: "
                    ),
                    "{why}"
                );
                assert!(why.contains("link-local"), "{why}");
            }
            other => panic!("expected Denied, got {other:?}"),
        }
        match strict.check_redirect(&url("https://evil.test/"), &previous) {
            Err(HttpFailure::Denied(why)) => {
                assert!(
                    why.contains("evil.test:443 is not in the allowed hosts"),
                    "{why}"
                )
            }
            other => panic!("expected Denied, got {other:?}"),
        }
        match strict.check_redirect(&url("ftp://api.example.com/"), &previous) {
            Err(HttpFailure::Denied(why)) => assert!(why.contains("scheme 'ftp'"), "{why}"),
            other => panic!("expected Denied, got {other:?}"),
        }
        assert_eq!(
            strict.check_redirect(&url("https://api.example.com/next"), &previous),
            Ok(())
        );

        let chain: Vec<Url> = (0..=MAX_REDIRECTS)
            .map(|hop| url(&format!("https://api.example.com/{hop}")))
            .collect();
        assert_eq!(
            strict.check_redirect(
                &url("https://api.example.com/last"),
                &chain[..MAX_REDIRECTS]
            ),
            Ok(())
        );
        match strict.check_redirect(&url("https://api.example.com/last"), &chain) {
            Err(HttpFailure::Other(why)) => assert!(why.contains("too many redirects"), "{why}"),
            other => panic!("expected Other, got {other:?}"),
        }
    }

    #[test]
    fn capability_refuses_bad_config() {
        let policy = HttpPolicy {
            route: "r".to_owned(),
            allowed_hosts: vec!["https://api.example.com".to_owned()],
            ..HttpPolicy::default()
        };
        match HttpCapability::new(policy) {
            Err(err) => assert_eq!(
                err.to_string(),
                "route 'r': allowed host 'https://api.example.com' is invalid: write only the \
                 host and optional port, without scheme or path"
            ),
            Ok(_) => panic!("config should be refused"),
        }
        let policy = HttpPolicy {
            route: "r".to_owned(),
            max_timeout: Duration::ZERO,
            ..HttpPolicy::default()
        };
        assert!(HttpCapability::new(policy).is_err());
    }
}
