//! What a service's `activator.knative.dev/*` annotations configure: where session and flow ids
//! are read from, the cookie made up for clients without one, how long pins live, and which
//! requests may be sent again.
//!
//! Annotations are parsed once per world change, never per request. A malformed annotation is
//! reported to the caller (who logs and counts it) and ignored. Must not read requests; the
//! `affinity` module does, by this policy.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;

use crate::headers::{DEFAULT_FLOW, DEFAULT_SESSION};
use crate::pins::{Lifetime, MAX_LIFETIME, PinKind};
use crate::retry::Retry;
use crate::spec::SessionEnd;

pub const ANNOTATION_PREFIX: &str = "activator.knative.dev/";
pub const DEFAULT_TTL: Duration = Duration::from_secs(600);

/// Where an id is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdSource {
    Header(HeaderName),
    Query(String),
    /// 1-based: in `/incr/abc`, segment 2 is `abc`.
    PathSegment(NonZeroUsize),
    Cookie(String),
}

/// What one revision's (or service's) annotations say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Annotated {
    session: Vec<IdSource>,
    flow: Vec<IdSource>,
    ttl: Option<Duration>,
    max_age: Option<Duration>,
    /// `sticky-session-cookie-secure`: the session cookie is sent over HTTPS only.
    cookie_secure: Option<bool>,
    /// `sticky-session-mode: signed-cookie`: session pins travel in a signed cookie, not a store.
    signed_cookie: Option<bool>,
    /// `sticky-session-pin-cookie-name`: the cookie signed pins travel in.
    pin_cookie: Option<String>,
    /// `sticky-split-mode: requests`: new pins steer the request share to the percents.
    split_by_requests: Option<bool>,
    /// `sticky-session-end-path`: the pod's path told when a session ends.
    end_path: Option<String>,
    /// `sticky-session-chat-prefix`: a chat request's conversation is its session.
    chat_prefix: Option<bool>,
    /// `sticky-session-chat-path`: the path of the service's chat requests.
    chat_path: Option<String>,
    /// `retry`: which requests may be sent again after their pod failed them.
    retry: Option<Retry>,
}

/// Longest `sticky-session-end-path` or `sticky-session-chat-path` accepted.
const MAX_PATH: usize = 256;

/// The path of chat requests when `sticky-session-chat-path` names none: OpenAI's chat
/// completions, which vLLM, llama.cpp, TGI and Ollama serve alike.
pub const DEFAULT_CHAT_PATH: &str = "/v1/chat/completions";

/// The cookie a signed pin travels in when `sticky-session-pin-cookie-name` names none.
pub const DEFAULT_PIN_COOKIE: &str = "activator-pin";

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
                    HeaderName::try_from(value).map(IdSource::Header).map_err(|_| "not a valid header name")
                }
                (Some(_), "query-parameter") if !value.is_empty() => Ok(IdSource::Query(value.to_owned())),
                (Some(_), "query-parameter") => Err("empty"),
                (Some(_), "path-segment") => {
                    value.parse().map(IdSource::PathSegment).map_err(|_| "not a path segment number (1-based)")
                }
                (Some(PinKind::Session), "cookie-name") if is_cookie_name(value) => {
                    Ok(IdSource::Cookie(value.to_owned()))
                }
                (Some(PinKind::Session), "cookie-name") => Err("not a valid cookie name"),
                (Some(PinKind::Session), "pin-cookie-name") => {
                    match is_cookie_name(value) {
                        true => out.pin_cookie = Some(value.to_owned()),
                        false => rejected(key, format!("{value:?}: not a valid cookie name")),
                    }
                    continue;
                }
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
                (Some(PinKind::Session), "mode") => {
                    match value {
                        "signed-cookie" => out.signed_cookie = Some(true),
                        "store" => out.signed_cookie = Some(false),
                        _ => rejected(key, format!("{value:?} is neither store nor signed-cookie")),
                    }
                    continue;
                }
                (None, "retry") => {
                    match Retry::parse(value) {
                        Some(retry) => out.retry = Some(retry),
                        None => rejected(key, format!("{value:?} is none of off, safe and all")),
                    }
                    continue;
                }
                (None, "sticky-split-mode") => {
                    match value {
                        "requests" => out.split_by_requests = Some(true),
                        "sessions" => out.split_by_requests = Some(false),
                        _ => rejected(key, format!("{value:?} is neither sessions nor requests")),
                    }
                    continue;
                }
                (Some(PinKind::Session), "end-path") => {
                    match value.parse::<http::uri::PathAndQuery>() {
                        Ok(path) if value.starts_with('/') && value.len() <= MAX_PATH => {
                            out.end_path = Some(path.to_string());
                        }
                        _ => rejected(key, format!("{value:?} is not a path such as /session/end")),
                    }
                    continue;
                }
                (Some(PinKind::Session), "chat-path") => {
                    match value.parse::<http::uri::PathAndQuery>() {
                        Ok(path) if value.starts_with('/') && value.len() <= MAX_PATH && path.query().is_none() => {
                            out.chat_path = Some(path.path().to_owned());
                        }
                        _ => rejected(key, format!("{value:?} is not a path such as {DEFAULT_CHAT_PATH}")),
                    }
                    continue;
                }
                (Some(PinKind::Session), "cookie-secure" | "chat-prefix") => {
                    let flag = match value.to_ascii_lowercase().as_str() {
                        "true" => true,
                        "false" => false,
                        _ => {
                            rejected(key, format!("{value:?} is neither true nor false"));
                            continue;
                        }
                    };
                    if what == "cookie-secure" {
                        out.cookie_secure = Some(flag);
                    } else {
                        out.chat_prefix = Some(flag);
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
        self.signed_cookie = self.signed_cookie.or(base.signed_cookie);
        self.pin_cookie = self.pin_cookie.or_else(|| base.pin_cookie.clone());
        self.split_by_requests = self.split_by_requests.or(base.split_by_requests);
        self.end_path = self.end_path.or_else(|| base.end_path.clone());
        self.chat_prefix = self.chat_prefix.or(base.chat_prefix);
        self.chat_path = self.chat_path.or_else(|| base.chat_path.clone());
        self.retry = self.retry.or(base.retry);
        self
    }

    /// Which requests into this revision may be sent again (`retry`; `safe` by default).
    pub fn retry(&self) -> Retry {
        self.retry.unwrap_or_default()
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
    session: Vec<IdSource>,
    flow: Vec<IdSource>,
    /// Cookie created for clients that send no session id, and whether it is `Secure`.
    cookie: Option<(String, bool)>,
    /// The cookie session pins travel in (`sticky-session-mode: signed-cookie`), and whether it
    /// is `Secure`.
    signed_cookie: Option<(String, bool)>,
    /// `sticky-split-mode: requests` on the service or a revision of its traffic.
    split_by_requests: bool,
    /// `sticky-session-end-path` on the service or a revision of its traffic.
    session_end: Option<Arc<SessionEnd>>,
    /// With `sticky-session-chat-prefix: "true"` on the service or a revision of its traffic:
    /// the path of its chat requests.
    chat_path: Option<Arc<str>>,
}

impl Policy {
    /// The policy of a service whose traffic lists revisions `annotated` so. Signed pin cookies
    /// are the service's only when every one of them asks for them: a revision in the store mode
    /// (the default) keeps the service's sessions in the store, so one revision, a 0 % canary
    /// included, never changes where the others' sessions live.
    pub fn new<'a>(namespace: &str, service: &str, annotated: impl IntoIterator<Item = &'a Annotated>) -> Self {
        let mut session = Vec::new();
        let mut flow = Vec::new();
        let (mut secure, mut split_by_requests, mut chat_prefix) = (false, false, false);
        let (mut signed, mut any) = (true, false);
        let (mut end_path, mut pin_cookie, mut chat_path) = (None, None, None);
        for a in annotated {
            any = true;
            chat_path = chat_path.or_else(|| a.chat_path.clone());
            chat_prefix |= a.chat_prefix.unwrap_or(false);
            split_by_requests |= a.split_by_requests.unwrap_or(false);
            end_path = end_path.or_else(|| a.end_path.clone());
            pin_cookie = pin_cookie.or_else(|| a.pin_cookie.clone());
            extend_unique(&mut session, &a.session);
            extend_unique(&mut flow, &a.flow);
            secure |= a.cookie_secure.unwrap_or(false);
            signed &= a.signed_cookie.unwrap_or(false);
        }
        let cookie = session.iter().find_map(|s| match s {
            IdSource::Cookie(name) => Some((name.clone(), secure)),
            _ => None,
        });
        let signed_cookie =
            (signed && any).then(|| (pin_cookie.unwrap_or_else(|| DEFAULT_PIN_COOKIE.to_owned()), secure));
        extend_unique(&mut session, &[IdSource::Header(DEFAULT_SESSION)]);
        extend_unique(&mut flow, &[IdSource::Header(DEFAULT_FLOW)]);
        // The pod hears the id in the header its clients send it in, else in the default one.
        let session_end = end_path.and_then(|path| path.parse().ok()).map(|path| {
            let header = session.iter().find_map(|s| match s {
                IdSource::Header(name) => Some(name.clone()),
                _ => None,
            });
            Arc::new(SessionEnd::new(path, header.unwrap_or(DEFAULT_SESSION)))
        });
        let chat_path = chat_prefix.then(|| chat_path.as_deref().unwrap_or(DEFAULT_CHAT_PATH).into());
        let scope = format!("{namespace}/{service}").into();
        Policy { scope, session, flow, cookie, signed_cookie, split_by_requests, session_end, chat_path }
    }

    /// `<namespace>/<service>`: the scope of this service's pin keys.
    pub fn scope(&self) -> &Arc<str> {
        &self.scope
    }

    /// Where session ids are read from, first match wins.
    pub fn session_sources(&self) -> &[IdSource] {
        &self.session
    }

    /// Where flow ids are read from, first match wins.
    pub fn flow_sources(&self) -> &[IdSource] {
        &self.flow
    }

    /// The cookie made up for clients without a session id, and whether it is `Secure`.
    pub fn cookie(&self) -> Option<(&str, bool)> {
        self.cookie.as_ref().map(|(name, secure)| (name.as_str(), *secure))
    }

    /// Whether new pins steer the share of requests, not of sessions, to the percents.
    pub fn split_by_requests(&self) -> bool {
        self.split_by_requests
    }

    /// With `sticky-session-chat-prefix`, the path whose requests are chat requests: their
    /// conversation (`affinity::chat`) is their session when they name no session id.
    pub fn chat_path(&self) -> Option<&str> {
        self.chat_path.as_deref()
    }

    /// How the service hears that a session ended, if it asked to.
    pub fn session_end(&self) -> Option<&Arc<SessionEnd>> {
        self.session_end.as_ref()
    }

    /// The cookie session pins travel in with `sticky-session-mode: signed-cookie`, and whether
    /// it is `Secure`; `None` in the default mode, where pins live in the store.
    pub fn signed_cookie(&self) -> Option<(&str, bool)> {
        self.signed_cookie.as_ref().map(|(name, secure)| (name.as_str(), *secure))
    }
}

fn extend_unique(into: &mut Vec<IdSource>, from: &[IdSource]) {
    for source in from {
        if !into.contains(source) {
            into.push(source.clone());
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Parses `activator.knative.dev/<key>: <value>` pairs, collecting what was rejected.
    pub(crate) fn annotated(pairs: &[(&str, &str)]) -> (Annotated, Vec<String>) {
        let map = pairs.iter().map(|(k, v)| (format!("{ANNOTATION_PREFIX}{k}"), (*v).to_owned())).collect();
        let mut errors = Vec::new();
        let parsed = Annotated::parse(&map, &mut |key, reason| errors.push(format!("{key}: {reason}")));
        (parsed, errors)
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
        let (_, errors) = annotated(&[("sticky-session-mode", "cookie")]);
        assert_eq!(errors.len(), 1, "only store and signed-cookie");
    }

    #[test]
    fn retry_is_the_revisions_over_the_services_and_safe_by_default() {
        let (off, errors) = annotated(&[("retry", "off")]);
        assert!(errors.is_empty(), "{errors:?}");
        let (all, _) = annotated(&[("retry", "all")]);
        let (plain, _) = annotated(&[]);
        assert_eq!(plain.retry(), Retry::Safe);
        assert_eq!(all.over(&off).retry(), Retry::All, "the revision's own wins");
        assert_eq!(plain.over(&off).retry(), Retry::Off, "else the service's");
        assert_eq!(annotated(&[("retry", "always")]).1.len(), 1);
    }

    #[test]
    fn split_mode_is_read_from_any_of_the_services_annotations() {
        let (requests, errors) = annotated(&[("sticky-split-mode", "requests")]);
        assert!(errors.is_empty(), "{errors:?}");
        let (plain, _) = annotated(&[]);
        assert!(Policy::new("ns", "svc", [&plain, &requests]).split_by_requests());
        assert!(!Policy::new("ns", "svc", [&plain]).split_by_requests(), "sessions is the default");
        let (_, errors) = annotated(&[("sticky-split-mode", "weights")]);
        assert_eq!(errors.len(), 1);
    }

    #[test]
    fn chat_prefix_is_a_flag_of_any_of_the_services_annotations() {
        let (chat, errors) = annotated(&[("sticky-session-chat-prefix", "TRUE")]);
        assert!(errors.is_empty(), "{errors:?}");
        let (plain, _) = annotated(&[]);
        assert_eq!(Policy::new("ns", "svc", [&plain, &chat]).chat_path(), Some(DEFAULT_CHAT_PATH));
        assert_eq!(Policy::new("ns", "svc", [&plain]).chat_path(), None);
        assert_eq!(annotated(&[("sticky-session-chat-prefix", "yes")]).1.len(), 1);
    }

    #[test]
    fn the_chat_path_is_configurable_and_only_matters_with_the_prefix() {
        let (chat, errors) =
            annotated(&[("sticky-session-chat-prefix", "true"), ("sticky-session-chat-path", "/api/chat")]);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(Policy::new("ns", "svc", [&chat]).chat_path(), Some("/api/chat"));
        let (path_only, _) = annotated(&[("sticky-session-chat-path", "/api/chat")]);
        assert_eq!(Policy::new("ns", "svc", [&path_only]).chat_path(), None);
        for bad in ["api/chat", "/chat?stream=1", &format!("/{}", "x".repeat(MAX_PATH))] {
            let (_, errors) = annotated(&[("sticky-session-chat-path", bad)]);
            assert_eq!(errors.len(), 1, "{bad:?} refused");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_annotation_value_is_read_or_refused_without_panicking(
            name in proptest::sample::select(vec![
                "sticky-session-header-name", "sticky-session-query-parameter", "sticky-session-path-segment",
                "sticky-session-cookie-name", "sticky-session-pin-cookie-name", "sticky-session-mode",
                "sticky-session-end-path", "sticky-session-chat-prefix", "sticky-session-chat-path",
                "sticky-session-cookie-secure", "sticky-revision-header-name", "sticky-ttl", "sticky-max-age",
                "sticky-split-mode", "retry", "sticky-unknown",
            ]),
            value in "\\PC{0,40}",
        ) {
            let (parsed, _) = annotated(&[(name, &value)]);
            let policy = Policy::new("ns", "svc", [&parsed]);
            if let Some(end) = policy.session_end() {
                proptest::prop_assert!(end.is_addressed_by(end.path.path()));
            }
        }

    }

    #[test]
    fn session_end_path_names_the_header_the_id_travels_in() {
        let (end, errors) = annotated(&[("sticky-session-end-path", "/session/end")]);
        assert!(errors.is_empty(), "{errors:?}");
        let (header, _) = annotated(&[("sticky-session-header-name", "X-User")]);
        let policy = Policy::new("ns", "svc", [&end, &header]);
        let call = policy.session_end().expect("asked for");
        assert_eq!((call.path.as_str(), call.header.as_str()), ("/session/end", "x-user"));
        assert_eq!(Policy::new("ns", "svc", [&end]).session_end().unwrap().header, DEFAULT_SESSION);
        assert!(Policy::new("ns", "svc", [&header]).session_end().is_none());
        for bad in ["session/end", "/a b", &format!("/{}", "x".repeat(MAX_PATH))] {
            let (_, errors) = annotated(&[("sticky-session-end-path", bad)]);
            assert_eq!(errors.len(), 1, "{bad:?}");
        }
    }

    /// Issue 25, item 3: the pin cookie has a name of its own (an application's session cookie is
    /// never overwritten), and one revision does not turn the mode on for a whole service.
    #[test]
    fn signed_cookie_mode_names_its_own_cookie_and_needs_every_revision() {
        let (signed, errors) = annotated(&[("sticky-session-mode", "signed-cookie")]);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(Policy::new("ns", "svc", [&signed]).signed_cookie(), Some((DEFAULT_PIN_COOKIE, false)));
        let (app, _) = annotated(&[("sticky-session-cookie-name", "app"), ("sticky-session-cookie-secure", "true")]);
        assert_eq!(
            Policy::new("ns", "svc", [&signed.clone().over(&app)]).signed_cookie(),
            Some((DEFAULT_PIN_COOKIE, true)),
            "the application's session cookie is an id, never the pin cookie"
        );
        let (named, _) = annotated(&[("sticky-session-pin-cookie-name", "pin")]);
        assert_eq!(Policy::new("ns", "svc", [&signed.clone().over(&named)]).signed_cookie(), Some(("pin", false)));
        let (store, _) = annotated(&[("sticky-session-mode", "store")]);
        assert_eq!(Policy::new("ns", "svc", [&store.over(&signed)]).signed_cookie(), None, "the revision's mode wins");
        assert_eq!(Policy::new("ns", "svc", [&app]).signed_cookie(), None, "the store is the default");
        let (plain, _) = annotated(&[]);
        assert_eq!(Policy::new("ns", "svc", [&plain, &signed]).signed_cookie(), None, "a canary alone changes nothing");
    }

    #[test]
    fn policy_is_the_union_of_revisions() {
        let (old, _) = annotated(&[("sticky-session-header-name", "X-Old")]);
        let (new, _) = annotated(&[("sticky-session-header-name", "X-New")]);
        let p = Policy::new("ns", "svc", [&old, &new]);
        let headers = |sources: &[IdSource]| -> Vec<String> {
            sources
                .iter()
                .map(|s| match s {
                    IdSource::Header(h) => h.to_string(),
                    other => format!("{other:?}"),
                })
                .collect()
        };
        assert_eq!(headers(p.session_sources()), ["x-old", "x-new", "k-session"]);
    }
}
