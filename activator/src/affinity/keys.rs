//! Which affinity ids a request carries, read by its service's policy from headers, query
//! parameters, path segments and cookies, and hashed into pin keys; and the cookie made up for a
//! client that has none. Must not decide anything, nor do I/O.

use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request};

use crate::pins::{PinKey, PinKind};
use crate::world::policy::{CookieAttributes, IdSource, Policy};

/// Longest id accepted, in bytes.
pub(super) const MAX_ID_BYTES: usize = 1024;

/// The ids `req` carries, as pin keys of the service `policy` belongs to. `conversation` is the
/// session id its body names (`affinity::chat`), used when no source of the policy gives one.
pub(crate) fn extract<B>(policy: &Policy, req: &Request<B>, conversation: Option<&str>) -> Result<Keys, KeyError> {
    let flow = first_id(policy.flow_sources(), req, PinKind::Flow)?;
    let scope = policy.scope();
    let session = first_id(policy.session_sources(), req, PinKind::Session)?
        .or_else(|| conversation.map(|id| id.as_bytes().to_vec()));
    // A session without an id of its own, in `sticky-session-mode: signed-cookie`: its pin travels
    // in the pin cookie, with no key in the store. Explicit ids keep their store pins.
    if session.is_none()
        && let Some((name, attributes)) = policy.signed_cookie()
    {
        let value = cookie(req, name).filter(|v| !v.is_empty() && v.len() <= MAX_ID_BYTES).map(str::to_owned);
        let mut keys = Keys {
            flow: flow.map(|id| PinKey::new(scope, PinKind::Flow, &id)),
            signed: Some(SignedCookie { name: name.to_owned(), attributes: attributes.clone(), value }),
            ..Keys::default()
        };
        keys.new_flow_cookie = new_flow_cookie(policy, &mut keys.flow);
        return Ok(keys);
    }
    // The raw id is kept only for a service that wants to hear when sessions end.
    let end_id = |id: &[u8]| policy.session_end().and_then(|_| HeaderValue::from_bytes(id).ok());
    let mut keys = Keys {
        session_id: session.as_deref().and_then(end_id),
        session: session.map(|id| PinKey::new(scope, PinKind::Session, &id)),
        flow: flow.map(|id| PinKey::new(scope, PinKind::Flow, &id)),
        new_cookie: None,
        new_header_id: None,
        new_flow_cookie: None,
        signed: None,
    };
    keys.new_flow_cookie = new_flow_cookie(policy, &mut keys.flow);
    // A client without a session id is given one: in a cookie where the service names one (a
    // browser keeps it), else in the session header with `sticky-session-generate-id`.
    let (cookie, header) = (policy.cookie(), policy.generated_header());
    if keys.session.is_none() && (cookie.is_some() || header.is_some()) {
        let id = new_session_id();
        keys.session = Some(PinKey::new(scope, PinKind::Session, id.as_bytes()));
        keys.session_id = end_id(id.as_bytes());
        match (cookie, header) {
            (Some((name, attributes)), _) => {
                keys.new_cookie = Some(NewCookie { name: name.to_owned(), id, attributes: attributes.clone() });
            }
            (None, Some(header)) => {
                keys.new_header_id = HeaderValue::try_from(id).ok().map(|id| (header.clone(), id));
            }
            (None, None) => {}
        }
    }
    Ok(keys)
}

/// A made-up flow id in a new cookie, for a client of a service with `sticky-revision-cookie-name`
/// that sent no flow id: `flow` becomes its key.
fn new_flow_cookie(policy: &Policy, flow: &mut Option<PinKey>) -> Option<NewCookie> {
    let (name, attributes) = policy.flow_cookie().filter(|_| flow.is_none())?;
    let id = new_session_id();
    *flow = Some(PinKey::new(policy.scope(), PinKind::Flow, id.as_bytes()));
    Some(NewCookie { name: name.to_owned(), id, attributes: attributes.clone() })
}

/// Whether `req`'s conversation would name its session (`sticky-session-chat-prefix`): a `POST`
/// to the service's chat path that carries no session id of its own. Only such a request's body
/// is held back to be read; any other streams from its first byte.
pub(crate) fn names_its_conversation<B>(policy: &Policy, req: &Request<B>) -> bool {
    policy.chat_path().is_some_and(|path| req.method() == Method::POST && req.uri().path() == path)
        && matches!(first_id(policy.session_sources(), req, PinKind::Session), Ok(None))
}

/// The ids of one request, already hashed into pin keys.
#[derive(Debug, Default)]
pub(crate) struct Keys {
    pub session: Option<PinKey>,
    /// The session id itself, for a service with `sticky-session-end-path` only.
    pub session_id: Option<HeaderValue>,
    pub flow: Option<PinKey>,
    /// Set when the activator made up a session id for a cookie-mode client.
    pub new_cookie: Option<NewCookie>,
    /// Set when the activator made up a session id for a client of `sticky-session-generate-id`:
    /// the header it is given back in, and the id.
    pub new_header_id: Option<(HeaderName, HeaderValue)>,
    /// Set when the activator made up a flow id for a client of `sticky-revision-cookie-name`.
    pub new_flow_cookie: Option<NewCookie>,
    /// Set in `sticky-session-mode: signed-cookie`: the pin cookie, and what the request sent.
    pub signed: Option<SignedCookie>,
}

#[derive(Debug)]
pub(crate) struct SignedCookie {
    pub name: String,
    pub attributes: std::sync::Arc<CookieAttributes>,
    /// The value the request carried, unverified.
    pub value: Option<String>,
}

impl SignedCookie {
    /// The `Set-Cookie` value carrying a newly signed pin: a browser-session cookie, the pin's
    /// own expiry being signed inside it.
    pub(crate) fn header_value(&self, signed: &str) -> String {
        self.attributes.set_cookie(&self.name, signed, None)
    }

    /// The `Set-Cookie` value that tells the client to drop its pin cookie.
    pub(crate) fn expired_header_value(&self) -> String {
        self.attributes.set_cookie(&self.name, "", Some(Duration::ZERO))
    }
}

#[derive(Debug)]
pub(crate) struct NewCookie {
    pub name: String,
    pub id: String,
    pub attributes: std::sync::Arc<CookieAttributes>,
}

impl NewCookie {
    /// The `Set-Cookie` value that hands the id to the client. The cookie outlives any idle
    /// period: it is a browser-session cookie, or lives `max_age` when the pins have that
    /// absolute cap. Its pin slides on use; a client coming back after its pin expired keeps its
    /// id and is pinned anew.
    pub(crate) fn header_value(&self, max_age: Option<Duration>) -> String {
        self.attributes.set_cookie(&self.name, &self.id, max_age)
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} id is longer than {MAX_ID_BYTES} bytes", kind.as_str())]
pub(crate) struct KeyError {
    pub kind: PinKind,
}

/// The first non-empty id any source yields; empty values mean "no id".
fn first_id<B>(sources: &[IdSource], req: &Request<B>, kind: PinKind) -> Result<Option<Vec<u8>>, KeyError> {
    for source in sources {
        let id = match source {
            IdSource::Header(name) => req.headers().get(name).map(|v| v.as_bytes().to_vec()),
            IdSource::Query(param) => req.uri().query().and_then(|q| {
                form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == param).map(|(_, v)| v.into_owned().into_bytes())
            }),
            IdSource::PathSegment(n) => req
                .uri()
                .path()
                .trim_start_matches('/')
                .split('/')
                .nth(n.get() - 1)
                .map(|s| percent_encoding::percent_decode_str(s).collect()),
            IdSource::Cookie(name) => cookie(req, name).map(|v| v.as_bytes().to_vec()),
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
/// session (or flow).
fn new_session_id() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    use crate::world::policy::tests::annotated;

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
    fn only_a_chat_post_without_a_session_id_is_read_for_its_conversation() {
        let chat = policy(&[("sticky-session-chat-prefix", "true")]);
        let post = |uri: &str, headers: &[(&str, &str)]| {
            let mut r = req(uri, headers);
            *r.method_mut() = Method::POST;
            r
        };
        assert!(names_its_conversation(&chat, &post("/v1/chat/completions", &[])));
        assert!(!names_its_conversation(&chat, &post("/v1/chat/completions", &[("k-session", "s")])), "has an id");
        assert!(!names_its_conversation(&chat, &post("/echo", &[])), "not the chat path");
        assert!(!names_its_conversation(&chat, &req("/v1/chat/completions", &[])), "not a POST");
        assert!(!names_its_conversation(&policy(&[]), &post("/v1/chat/completions", &[])), "not asked for");
        let elsewhere = policy(&[("sticky-session-chat-prefix", "true"), ("sticky-session-chat-path", "/api/chat")]);
        assert!(names_its_conversation(&elsewhere, &post("/api/chat?x=1", &[])));
        assert!(!names_its_conversation(&elsewhere, &post("/v1/chat/completions", &[])));
    }

    #[test]
    fn default_headers_need_no_annotation() {
        let keys = extract(&policy(&[]), &req("/", &[("k-session", "abc"), ("k-revision", "f1")]), None).unwrap();
        assert_eq!(keys.session, session_key("abc"));
        assert_eq!(keys.flow, flow_key("f1"));
        let none = extract(&policy(&[]), &req("/", &[("k-session", "")]), None).unwrap();
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
            let keys = extract(&policy(annotations), &request, None).unwrap();
            assert_eq!(keys.session, session_key("abc"), "{annotations:?}");
            assert!(keys.new_cookie.is_none());
        }
        let flow = extract(&policy(&[("sticky-revision-query-parameter", "flow_id")]), &req("/?flow_id=f", &[]), None)
            .unwrap();
        assert_eq!(flow.flow, flow_key("f"));
    }

    #[test]
    fn annotated_sources_come_before_the_default_header() {
        let p = policy(&[("sticky-session-query-parameter", "s")]);
        let keys = extract(&p, &req("/?s=from-query", &[("k-session", "from-header")]), None).unwrap();
        assert_eq!(keys.session, session_key("from-query"));
        let keys = extract(&p, &req("/", &[("k-session", "from-header")]), None).unwrap();
        assert_eq!(keys.session, session_key("from-header"));
    }

    #[test]
    fn cookie_mode_makes_up_an_unguessable_id() {
        let p = policy(&[("sticky-session-cookie-name", "sid"), ("sticky-ttl", "90s")]);
        let keys = extract(&p, &req("/", &[]), None).unwrap();
        let cookie = keys.new_cookie.expect("a new cookie");
        assert_eq!(cookie.id.len(), 32);
        assert_eq!(keys.session, session_key(&cookie.id));
        let other = extract(&p, &req("/", &[]), None).unwrap().new_cookie.unwrap();
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
        let cookie = extract(&secure, &req("/", &[]), None).unwrap().new_cookie.unwrap();
        assert!(cookie.header_value(None).ends_with("; Secure"), "{}", cookie.header_value(None));
    }

    /// ingress-nginx's `session-cookie-path`, `-domain` and `-samesite`, for every cookie the
    /// activator sets; `SameSite=None` brings `Secure`, which browsers require of it.
    #[test]
    fn cookie_attributes_are_the_services_to_set() {
        let p = policy(&[
            ("sticky-session-cookie-name", "sid"),
            ("sticky-session-cookie-path", "/app"),
            ("sticky-session-cookie-domain", ".Example.com"),
            ("sticky-session-cookie-samesite", "strict"),
        ]);
        let cookie = extract(&p, &req("/", &[]), None).unwrap().new_cookie.unwrap();
        let expected = format!("sid={}; Path=/app; Domain=example.com; HttpOnly; SameSite=Strict", cookie.id);
        assert_eq!(cookie.header_value(None), expected);
        let none = policy(&[("sticky-session-cookie-name", "sid"), ("sticky-session-cookie-samesite", "None")]);
        let cookie = extract(&none, &req("/", &[]), None).unwrap().new_cookie.unwrap();
        assert!(cookie.header_value(None).ends_with("; SameSite=None; Secure"), "{}", cookie.header_value(None));
        let signed = policy(&[("sticky-session-mode", "signed-cookie"), ("sticky-session-cookie-path", "/app")]);
        let pin = extract(&signed, &req("/", &[]), None).unwrap().signed.unwrap();
        assert_eq!(pin.header_value("v"), "activator-pin=v; Path=/app; HttpOnly; SameSite=Lax");
        assert_eq!(pin.expired_header_value(), "activator-pin=; Path=/app; HttpOnly; SameSite=Lax; Max-Age=0");
        for (name, bad) in [("path", "app"), ("path", "/a;b"), ("domain", "exa mple.com"), ("samesite", "sometimes")] {
            let (_, errors) = annotated(&[(&format!("sticky-session-cookie-{name}"), bad)]);
            assert_eq!(errors.len(), 1, "{name} {bad}");
        }
    }

    /// GEP-1619's Header type: a client without a session id is given one in the service's session
    /// header, and a client that sends it is not given another; a cookie service keeps cookies.
    #[test]
    fn a_generated_id_is_given_in_the_session_header() {
        let p = policy(&[("sticky-session-header-name", "X-Session"), ("sticky-session-generate-id", "true")]);
        let keys = extract(&p, &req("/", &[]), None).unwrap();
        let (header, id) = keys.new_header_id.expect("a made-up id");
        assert_eq!((header.as_str(), id.len()), ("x-session", 32));
        assert_eq!(keys.session, session_key(id.to_str().unwrap()));
        let back = extract(&p, &req("/", &[("x-session", id.to_str().unwrap())]), None).unwrap();
        assert!(back.new_header_id.is_none() && back.session == session_key(id.to_str().unwrap()));
        let default = policy(&[("sticky-session-generate-id", "true")]);
        let (header, _) = extract(&default, &req("/", &[]), None).unwrap().new_header_id.unwrap();
        assert_eq!(header.as_str(), "k-session", "the default header without one of the service's");
        let both = policy(&[("sticky-session-cookie-name", "sid"), ("sticky-session-generate-id", "true")]);
        let keys = extract(&both, &req("/", &[]), None).unwrap();
        assert!(keys.new_cookie.is_some() && keys.new_header_id.is_none(), "a browser keeps its cookie");
        assert!(extract(&policy(&[]), &req("/", &[]), None).unwrap().new_header_id.is_none(), "not asked for");
    }

    /// knative/serving#8160: a flow id in a cookie the activator makes up, so a browser sees one
    /// revision for a whole rollout; a client that sends it back is not given another.
    #[test]
    fn a_revision_cookie_is_made_up_for_a_client_without_a_flow_id() {
        let p = policy(&[("sticky-revision-cookie-name", "rev")]);
        let keys = extract(&p, &req("/", &[]), None).unwrap();
        let cookie = keys.new_flow_cookie.expect("a new revision cookie");
        assert_eq!(keys.flow, flow_key(&cookie.id));
        assert!(keys.session.is_none() && keys.new_cookie.is_none(), "no session for it");
        assert!(cookie.header_value(None).starts_with(&format!("rev={}; Path=/; HttpOnly", cookie.id)));
        let back = extract(&p, &req("/", &[("cookie", &format!("rev={}", cookie.id))]), None).unwrap();
        assert_eq!((back.flow, back.new_flow_cookie.is_none()), (flow_key(&cookie.id), true));
        let header = extract(&p, &req("/", &[("k-revision", "f")]), None).unwrap();
        assert_eq!((header.flow, header.new_flow_cookie.is_none()), (flow_key("f"), true), "an id of its own");
    }

    #[test]
    fn ids_over_one_kib_are_refused() {
        let long = "x".repeat(MAX_ID_BYTES + 1);
        let err = extract(&policy(&[]), &req("/", &[("k-revision", &long)]), None).unwrap_err();
        assert_eq!(err.to_string(), "flow id is longer than 1024 bytes");
        assert!(extract(&policy(&[]), &req("/", &[("k-session", &long[1..])]), None).is_ok());
    }

    proptest! {
        /// Whatever a client puts in its headers, query, path and cookies gives keys or a clear
        /// error, under a policy reading every kind of source.
        #[test]
        fn any_request_gives_keys_or_a_clear_error(
            header in proptest::collection::vec(any::<u8>(), 0..1200),
            query in "\\PC{0,80}",
            path in "(/[^/?#]{0,12}){0,6}",
            cookie in "\\PC{0,80}",
        ) {
            let policy = policy(&[
                ("sticky-session-header-name", "x-user"),
                ("sticky-session-query-parameter", "sid"),
                ("sticky-session-path-segment", "2"),
                ("sticky-session-cookie-name", "sid"),
                ("sticky-revision-query-parameter", "flow"),
            ]);
            let mut req = Request::builder();
            if let Ok(value) = HeaderValue::from_bytes(&header) {
                req = req.header("x-user", value.clone()).header("k-revision", value);
            }
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                req = req.header(header::COOKIE, value);
            }
            let encoded: String = form_urlencoded::Serializer::new(String::new()).append_pair("sid", &query).finish();
            let uri = format!("{path}?{encoded}&flow={encoded}");
            let Ok(req) = req.uri(uri.as_str()).body(()) else { return Ok(()) };
            match extract(&policy, &req, None) {
                Ok(keys) => prop_assert!(keys.session.is_some(), "a cookie policy always has a session"),
                Err(KeyError { .. }) => prop_assert!(header.len() > MAX_ID_BYTES || uri.len() > MAX_ID_BYTES),
            }
        }
    }
}
