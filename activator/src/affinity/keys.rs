//! Which affinity ids a request carries: the policy read from `activator.knative.dev/*`
//! annotations, and the extraction of session and flow ids from headers, query parameters,
//! path segments and cookies.
//!
//! Annotations are parsed once per topology change, never per request. A malformed annotation
//! is ignored with one log line and a metric.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use http::header::{self, HeaderName};

use crate::headers::{DEFAULT_FLOW, DEFAULT_SESSION};
use crate::pins::{Lifetime, MAX_LIFETIME, PinKey, PinKind};

pub const ANNOTATION_PREFIX: &str = "activator.knative.dev/";
/// Longest id accepted, in bytes.
pub const MAX_ID_BYTES: usize = 1024;
pub const DEFAULT_TTL: Duration = Duration::from_secs(600);

/// Where an id is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Source {
    Header(HeaderName),
    Query(String),
    /// 1-based: in `/incr/abc`, segment 2 is `abc`.
    PathSegment(NonZeroUsize),
    Cookie(String),
}

/// What one revision's (or service's) annotations say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Annotated {
    session: Vec<Source>,
    flow: Vec<Source>,
    ttl: Option<Duration>,
    max_age: Option<Duration>,
    /// `sticky-session-cookie-secure`: the session cookie is sent over HTTPS only.
    cookie_secure: Option<bool>,
}

impl Annotated {
    /// Reads the activator's annotations, reporting each one it has to ignore to `rejected`
    /// with the reason.
    pub fn parse(annotations: &BTreeMap<String, String>, rejected: &mut dyn FnMut(&str, String)) -> Self {
        let mut out = Annotated::default();
        for (key, value) in annotations {
            let Some(name) = key.strip_prefix(ANNOTATION_PREFIX) else { continue };
            let value = value.trim();
            let (kind, what) = if let Some(what) = name.strip_prefix("sticky-session-") {
                (Some(PinKind::Session), what)
            } else if let Some(what) = name.strip_prefix("sticky-revision-") {
                (Some(PinKind::Flow), what)
            } else {
                (None, name)
            };
            let source = match (kind, what) {
                (Some(_), "header-name") => {
                    HeaderName::try_from(value).map(Source::Header).map_err(|_| "not a valid header name")
                }
                (Some(_), "query-parameter") if !value.is_empty() => Ok(Source::Query(value.to_owned())),
                (Some(_), "query-parameter") => Err("empty"),
                (Some(_), "path-segment") => {
                    value.parse().map(Source::PathSegment).map_err(|_| "not a path segment number (1-based)")
                }
                (Some(PinKind::Session), "cookie-name") if is_cookie_name(value) => {
                    Ok(Source::Cookie(value.to_owned()))
                }
                (Some(PinKind::Session), "cookie-name") => Err("not a valid cookie name"),
                (None, "sticky-ttl" | "sticky-max-age") => {
                    let Some(mut d) = humantime::parse_duration(value).ok().filter(|d| !d.is_zero()) else {
                        rejected(key, format!("{value:?} is not a positive duration such as 600s"));
                        continue;
                    };
                    if d > MAX_LIFETIME {
                        let max = humantime::format_duration(MAX_LIFETIME);
                        rejected(key, format!("{value:?} is longer than the longest pin lifetime, {max}; using {max}"));
                        d = MAX_LIFETIME;
                    }
                    if what == "sticky-ttl" {
                        out.ttl = Some(d)
                    } else {
                        out.max_age = Some(d)
                    }
                    continue;
                }
                (Some(PinKind::Session), "cookie-secure") => {
                    match value.to_ascii_lowercase().as_str() {
                        "true" => out.cookie_secure = Some(true),
                        "false" => out.cookie_secure = Some(false),
                        _ => rejected(key, format!("{value:?} is neither true nor false")),
                    }
                    continue;
                }
                _ => Err("unknown annotation"),
            };
            match (source, kind) {
                (Ok(source), Some(PinKind::Session)) => out.session.push(source),
                (Ok(source), _) => out.flow.push(source),
                (Err(reason), _) => rejected(key, format!("{value:?}: {reason}")),
            }
        }
        out
    }

    /// These annotations over `base` (a revision's over its service's): sources of both, this
    /// one's lifetimes where set.
    pub fn over(mut self, base: &Annotated) -> Annotated {
        extend_unique(&mut self.session, &base.session);
        extend_unique(&mut self.flow, &base.flow);
        self.ttl = self.ttl.or(base.ttl);
        self.max_age = self.max_age.or(base.max_age);
        self.cookie_secure = self.cookie_secure.or(base.cookie_secure);
        self
    }

    /// Pin lifetime for pins into this revision.
    pub fn lifetime(&self) -> Lifetime {
        Lifetime { ttl: self.ttl.unwrap_or(DEFAULT_TTL), max_age: self.max_age }
    }
}

/// Cookie names are RFC 6265 tokens.
fn is_cookie_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

/// How a service's requests carry ids: the union of what its own annotations and the
/// annotations of the revisions in its traffic configure (so clients of an old and a new
/// revision keep their affinity during a rollout), then the default headers.
#[derive(Debug)]
pub struct Policy {
    scope: Arc<str>,
    session: Vec<Source>,
    flow: Vec<Source>,
    /// Cookie created for clients that send no session id, and whether it is `Secure`.
    cookie: Option<(String, bool)>,
}

impl Policy {
    pub fn new<'a>(namespace: &str, service: &str, annotated: impl IntoIterator<Item = &'a Annotated>) -> Self {
        let mut session = Vec::new();
        let mut flow = Vec::new();
        let mut secure = false;
        for a in annotated {
            extend_unique(&mut session, &a.session);
            extend_unique(&mut flow, &a.flow);
            secure |= a.cookie_secure.unwrap_or(false);
        }
        let cookie = session.iter().find_map(|s| match s {
            Source::Cookie(name) => Some((name.clone(), secure)),
            _ => None,
        });
        extend_unique(&mut session, &[Source::Header(DEFAULT_SESSION)]);
        extend_unique(&mut flow, &[Source::Header(DEFAULT_FLOW)]);
        Policy { scope: format!("{namespace}/{service}").into(), session, flow, cookie }
    }

    /// The ids `req` carries, as pin keys of this service.
    pub fn extract<B>(&self, req: &Request<B>) -> Result<Keys, KeyError> {
        let session = first_id(&self.session, req, PinKind::Session)?;
        let flow = first_id(&self.flow, req, PinKind::Flow)?;
        let mut keys = Keys {
            session: session.map(|id| PinKey::new(&self.scope, PinKind::Session, &id)),
            flow: flow.map(|id| PinKey::new(&self.scope, PinKind::Flow, &id)),
            new_cookie: None,
        };
        if keys.session.is_none()
            && let Some((name, secure)) = &self.cookie
        {
            let id = new_session_id();
            keys.session = Some(PinKey::new(&self.scope, PinKind::Session, id.as_bytes()));
            keys.new_cookie = Some(NewCookie { name: name.clone(), id, secure: *secure });
        }
        Ok(keys)
    }
}

fn extend_unique(into: &mut Vec<Source>, from: &[Source]) {
    for source in from {
        if !into.contains(source) {
            into.push(source.clone());
        }
    }
}

/// The ids of one request, already hashed into pin keys.
#[derive(Debug, Default)]
pub struct Keys {
    pub session: Option<PinKey>,
    pub flow: Option<PinKey>,
    /// Set when the activator made up a session id for a cookie-mode client.
    pub new_cookie: Option<NewCookie>,
}

#[derive(Debug)]
pub struct NewCookie {
    pub name: String,
    pub id: String,
    pub secure: bool,
}

impl NewCookie {
    /// The `Set-Cookie` value that hands the id to the client. The cookie outlives any idle
    /// period: it is a browser-session cookie, or lives `max_age` when the pins have that
    /// absolute cap. Its pin slides on use; a client coming back after its pin expired keeps its
    /// id and is pinned anew.
    pub fn header_value(&self, max_age: Option<Duration>) -> String {
        let mut value = format!("{}={}; Path=/; HttpOnly; SameSite=Lax", self.name, self.id);
        if let Some(max_age) = max_age {
            value.push_str(&format!("; Max-Age={}", max_age.as_secs()));
        }
        if self.secure {
            value.push_str("; Secure");
        }
        value
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} id is longer than {MAX_ID_BYTES} bytes", kind.as_str())]
pub struct KeyError {
    pub kind: PinKind,
}

/// The first non-empty id any source yields; empty values mean "no id".
fn first_id<B>(sources: &[Source], req: &Request<B>, kind: PinKind) -> Result<Option<Vec<u8>>, KeyError> {
    for source in sources {
        let id = match source {
            Source::Header(name) => req.headers().get(name).map(|v| v.as_bytes().to_vec()),
            Source::Query(param) => req.uri().query().and_then(|q| {
                form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == param).map(|(_, v)| v.into_owned().into_bytes())
            }),
            Source::PathSegment(n) => req
                .uri()
                .path()
                .trim_start_matches('/')
                .split('/')
                .nth(n.get() - 1)
                .map(|s| percent_encoding::percent_decode_str(s).collect()),
            Source::Cookie(name) => cookie(req, name).map(|v| v.as_bytes().to_vec()),
        };
        match id {
            Some(id) if id.len() > MAX_ID_BYTES => return Err(KeyError { kind }),
            Some(id) if !id.is_empty() => return Ok(Some(id)),
            _ => {}
        }
    }
    Ok(None)
}

fn cookie<'r, B>(req: &'r Request<B>, name: &str) -> Option<&'r str> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// 128 random bits from the OS, hex-encoded: unguessable, so one client cannot ride another's
/// session.
fn new_session_id() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotated(pairs: &[(&str, &str)]) -> (Annotated, Vec<String>) {
        let map = pairs.iter().map(|(k, v)| (format!("{ANNOTATION_PREFIX}{k}"), (*v).to_owned())).collect();
        let mut errors = Vec::new();
        let parsed = Annotated::parse(&map, &mut |key, reason| errors.push(format!("{key}: {reason}")));
        (parsed, errors)
    }

    fn policy(pairs: &[(&str, &str)]) -> Policy {
        let (a, errors) = annotated(pairs);
        assert!(errors.is_empty(), "{errors:?}");
        Policy::new("ns", "svc", [&a])
    }

    fn req(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut r = Request::builder().uri(uri);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(()).unwrap()
    }

    fn session_key(id: &str) -> Option<PinKey> {
        Some(PinKey::new(&Arc::from("ns/svc"), PinKind::Session, id.as_bytes()))
    }

    fn flow_key(id: &str) -> Option<PinKey> {
        Some(PinKey::new(&Arc::from("ns/svc"), PinKind::Flow, id.as_bytes()))
    }

    #[test]
    fn default_headers_need_no_annotation() {
        let keys = policy(&[]).extract(&req("/", &[("k-session", "abc"), ("k-revision", "f1")])).unwrap();
        assert_eq!(keys.session, session_key("abc"));
        assert_eq!(keys.flow, flow_key("f1"));
        let none = policy(&[]).extract(&req("/", &[("k-session", "")])).unwrap();
        assert!(none.session.is_none() && none.flow.is_none(), "empty means no key");
    }

    #[test]
    fn each_source_kind_extracts() {
        type Annotations<'a> = &'a [(&'a str, &'a str)];
        let cases: [(Annotations, Request<()>); 6] = [
            (&[("sticky-session-header-name", "X-User")], req("/", &[("x-user", "abc")])),
            (&[("sticky-session-query-parameter", "session_id")], req("/incr?x=1&session_id=abc", &[])),
            (&[("sticky-session-path-segment", "2")], req("/incr/abc/more", &[])),
            (&[("sticky-session-cookie-name", "sid")], req("/", &[("cookie", "a=1; sid=abc; b=2")])),
            (&[("sticky-session-query-parameter", "s")], req("/?s=ab%63", &[])),
            (&[("sticky-session-path-segment", "2")], req("/incr/a%62c", &[])),
        ];
        for (annotations, request) in cases {
            let keys = policy(annotations).extract(&request).unwrap();
            assert_eq!(keys.session, session_key("abc"), "{annotations:?}");
            assert!(keys.new_cookie.is_none());
        }
        let flow = policy(&[("sticky-revision-query-parameter", "flow_id")]).extract(&req("/?flow_id=f", &[])).unwrap();
        assert_eq!(flow.flow, flow_key("f"));
    }

    #[test]
    fn annotated_sources_come_before_the_default_header() {
        let p = policy(&[("sticky-session-query-parameter", "s")]);
        let keys = p.extract(&req("/?s=from-query", &[("k-session", "from-header")])).unwrap();
        assert_eq!(keys.session, session_key("from-query"));
        let keys = p.extract(&req("/", &[("k-session", "from-header")])).unwrap();
        assert_eq!(keys.session, session_key("from-header"));
    }

    #[test]
    fn cookie_mode_makes_up_an_unguessable_id() {
        let p = policy(&[("sticky-session-cookie-name", "sid"), ("sticky-ttl", "90s")]);
        let keys = p.extract(&req("/", &[])).unwrap();
        let cookie = keys.new_cookie.expect("a new cookie");
        assert_eq!(cookie.id.len(), 32);
        assert_eq!(keys.session, session_key(&cookie.id));
        let other = p.extract(&req("/", &[])).unwrap().new_cookie.unwrap();
        assert_ne!(cookie.id, other.id);
        assert_eq!(
            cookie.header_value(None),
            format!("sid={}; Path=/; HttpOnly; SameSite=Lax", cookie.id),
            "a browser-session cookie: it must not end while its session is in use"
        );
        assert_eq!(
            cookie.header_value(Some(Duration::from_secs(3600))),
            format!("sid={}; Path=/; HttpOnly; SameSite=Lax; Max-Age=3600", cookie.id),
            "sticky-max-age caps the session anyway"
        );
        let secure = policy(&[("sticky-session-cookie-name", "sid"), ("sticky-session-cookie-secure", "true")]);
        let cookie = secure.extract(&req("/", &[])).unwrap().new_cookie.unwrap();
        assert!(cookie.header_value(None).ends_with("; Secure"), "{}", cookie.header_value(None));
    }

    #[test]
    fn ids_over_one_kib_are_refused() {
        let long = "x".repeat(MAX_ID_BYTES + 1);
        let err = policy(&[]).extract(&req("/", &[("k-revision", &long)])).unwrap_err();
        assert_eq!(err.to_string(), "flow id is longer than 1024 bytes");
        assert!(policy(&[]).extract(&req("/", &[("k-session", &long[1..])])).is_ok());
    }

    #[test]
    fn lifetimes_and_malformed_annotations() {
        let (a, errors) = annotated(&[
            ("sticky-ttl", "90s"),
            ("sticky-max-age", "1h"),
            ("sticky-session-path-segment", "0"),
            ("sticky-revision-header-name", "bad header"),
            ("sticky-session-cookie-name", "a;b"),
            ("sticky-flavour", "x"),
        ]);
        assert_eq!(a.lifetime(), Lifetime { ttl: Duration::from_secs(90), max_age: Some(Duration::from_secs(3600)) });
        assert_eq!(errors.len(), 4, "{errors:?}");
        let (bad_ttl, errors) = annotated(&[("sticky-ttl", "soon")]);
        assert_eq!(bad_ttl.lifetime().ttl, DEFAULT_TTL);
        assert_eq!(errors.len(), 1);
        let (_, errors) = annotated(&[("sticky-ttl", "0s")]);
        assert_eq!(errors.len(), 1, "a zero TTL is refused");
        let (huge, errors) = annotated(&[("sticky-ttl", "100000000years"), ("sticky-max-age", "10000d")]);
        assert_eq!(huge.lifetime(), Lifetime { ttl: MAX_LIFETIME, max_age: Some(MAX_LIFETIME) }, "clamped");
        assert_eq!(errors.len(), 2, "each clamp is reported: {errors:?}");
        let (_, errors) = annotated(&[("sticky-session-cookie-secure", "yes")]);
        assert_eq!(errors.len(), 1);
    }

    #[test]
    fn policy_is_the_union_of_revisions() {
        let (old, _) = annotated(&[("sticky-session-header-name", "X-Old")]);
        let (new, _) = annotated(&[("sticky-session-header-name", "X-New")]);
        let p = Policy::new("ns", "svc", [&old, &new]);
        for header in ["x-old", "x-new", "k-session"] {
            assert_eq!(p.extract(&req("/", &[(header, "abc")])).unwrap().session, session_key("abc"), "{header}");
        }
    }
}
