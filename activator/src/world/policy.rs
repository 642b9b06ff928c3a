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
use crate::labelled::{LabelValue, label_values};
use crate::pins::{Lifetime, MAX_LIFETIME};
use crate::retry::Retry;
use crate::spec::SessionEnd;

pub(crate) const ANNOTATION_PREFIX: &str = "activator.knative.dev/";
pub(crate) const DEFAULT_TTL: Duration = Duration::from_secs(600);

/// Where an id is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum IdSource {
    Header(HeaderName),
    Query(String),
    /// 1-based: in `/incr/abc`, segment 2 is `abc`.
    PathSegment(NonZeroUsize),
    Cookie(String),
}

/// The annotations that set one value each, in one table: the field, its type, the annotation's
/// name after the prefix, and the function that reads its value (reporting what it has to say
/// about a value it refuses or adjusts). From it come the fields, their parsing, the rule that a
/// revision's value wins over its service's (`over`), and the list of names.
macro_rules! settings {
    ($( $(#[$doc:meta])* $field:ident: $ty:ty = $name:literal by $read:path; )*) => {
        /// What one revision's (or service's) annotations set, each `None` where they say nothing.
        #[derive(Clone, Debug, Default, PartialEq, Eq)]
        struct Settings {
            $( $(#[$doc])* $field: Option<$ty>, )*
        }

        impl Settings {
            /// These settings over `base`'s: this one's where set.
            fn over(self, base: &Settings) -> Settings {
                Settings { $( $field: self.$field.or_else(|| base.$field.clone()), )* }
            }

            /// Reads the annotation `name`'s `value`; `false` if no setting has that name.
            fn set(&mut self, name: &str, value: &str, report: &mut dyn FnMut(String)) -> bool {
                match name {
                    $( $name => {
                        if let Some(read) = $read(value, report) {
                            self.$field = Some(read);
                        }
                        true
                    } )*
                    _ => false,
                }
            }
        }

        /// The names (after the prefix) of the annotations that set one value each.
        const SETTING_NAMES: &[&str] = &[$($name),*];
    };
}

settings! {
    /// `sticky-ttl`: idle lifetime of pins into the revision.
    ttl: Duration = "sticky-ttl" by read_lifetime;
    /// `sticky-max-age`: absolute cap on a pin's lifetime.
    max_age: Duration = "sticky-max-age" by read_lifetime;
    /// The session cookie is sent over HTTPS only.
    cookie_secure: bool = "sticky-session-cookie-secure" by read_flag;
    /// The `Path` of the cookies the activator sets.
    cookie_path: String = "sticky-session-cookie-path" by read_cookie_path;
    /// The `Domain` of the cookies the activator sets.
    cookie_domain: String = "sticky-session-cookie-domain" by read_cookie_domain;
    /// The `SameSite` of the cookies the activator sets.
    cookie_same_site: SameSite = "sticky-session-cookie-samesite" by read_same_site;
    /// Session pins travel in a signed cookie, not a store.
    signed_cookie: bool = "sticky-session-mode" by read_session_mode;
    /// The cookie signed pins travel in.
    pin_cookie: String = "sticky-session-pin-cookie-name" by read_cookie_name;
    /// New pins steer the request share to the percents.
    split_by_requests: bool = "sticky-split-mode" by read_split_mode;
    /// The pod's path told when a session ends.
    end_path: String = "sticky-session-end-path" by read_end_path;
    /// A chat request's conversation is its session.
    chat_prefix: bool = "sticky-session-chat-prefix" by read_flag;
    /// The path of the service's chat requests.
    chat_path: String = "sticky-session-chat-path" by read_chat_path;
    /// Which requests may be sent again after their pod failed them.
    retry: Retry = "retry" by read_retry;
    /// A session whose pod is gone is told so (503) rather than moved silently.
    strict: bool = "sticky-session-strict" by read_flag;
    /// Where a new session is pinned: by its hash (the default), or on the pod with the fewest
    /// live sessions.
    by_sessions: bool = "sticky-session-placement" by read_placement;
    /// Soft affinity: a session's request spills to another pod while this many of its pinned
    /// pod's requests already wait.
    spill_threshold: usize = "sticky-session-spill-threshold" by read_threshold;
    /// Whether the service reads the default id headers (`K-Session`, `K-Revision`); unset, the
    /// cluster's default says.
    default_ids: bool = "sticky-default-ids" by read_flag;
    /// A client that sends no session id is given one in the session header (GEP-1619's Header
    /// type): API and gRPC clients, which keep no cookies.
    generate_id: bool = "sticky-session-generate-id" by read_flag;
    /// Sessions one pod may hold at once (`1`: exclusive); a new session waits for a pod with a
    /// free seat, and its wait is demand for another pod.
    sessions_per_pod: u32 = "sticky-sessions-per-pod" by read_sessions_per_pod;
    /// Pods with a free seat kept beyond the sessions held, so a new session finds one warm.
    session_reserve: u32 = "sticky-session-reserve" by read_reserve;
}

/// The annotations that add a place an id is read from, after `sticky-session-` (session ids)
/// or `sticky-revision-` (flow ids).
const ID_SOURCE_NAMES: &[&str] = &["header-name", "query-parameter", "path-segment", "cookie-name"];

/// What one revision's (or service's) annotations say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Annotated {
    session: Vec<IdSource>,
    flow: Vec<IdSource>,
    settings: Settings,
}

/// Longest `sticky-session-end-path` or `sticky-session-chat-path` accepted.
const MAX_PATH: usize = 256;

/// The path of chat requests when `sticky-session-chat-path` names none: OpenAI's chat
/// completions, which vLLM, llama.cpp, TGI and Ollama serve alike.
pub(crate) const DEFAULT_CHAT_PATH: &str = "/v1/chat/completions";

/// The cookie a signed pin travels in when `sticky-session-pin-cookie-name` names none.
pub(crate) const DEFAULT_PIN_COOKIE: &str = "activator-pin";

impl Annotated {
    /// Reads the activator's annotations, reporting each one it has to ignore to `rejected`
    /// with the reason.
    pub(crate) fn parse(annotations: &BTreeMap<String, String>, rejected: &mut dyn FnMut(&str, String)) -> Self {
        let mut out = Annotated::default();
        for (key, value) in annotations {
            let Some(name) = key.strip_prefix(ANNOTATION_PREFIX) else { continue };
            let value = value.trim();
            if out.settings.set(name, value, &mut |reason| rejected(key, reason)) {
                continue;
            }
            let (sources, what) = match (name.strip_prefix("sticky-session-"), name.strip_prefix("sticky-revision-")) {
                (Some(what), _) => (&mut out.session, what),
                (_, Some(what)) => (&mut out.flow, what),
                _ => {
                    rejected(key, unknown_annotation(name));
                    continue;
                }
            };
            match read_id_source(what, value) {
                Ok(source) => sources.push(source),
                Err(None) => rejected(key, unknown_annotation(name)),
                Err(Some(reason)) => rejected(key, format!("{value:?}: {reason}")),
            }
        }
        out
    }

    /// These annotations over `base` (a revision's over its service's): sources of both, this
    /// one's settings where set.
    pub(crate) fn over(mut self, base: &Annotated) -> Annotated {
        extend_unique(&mut self.session, &base.session);
        extend_unique(&mut self.flow, &base.flow);
        self.settings = self.settings.over(&base.settings);
        self
    }

    /// Which requests into this revision may be sent again (`retry`; `safe` by default).
    pub(crate) fn retry(&self) -> Retry {
        self.settings.retry.unwrap_or_default()
    }

    /// With `sticky-session-placement: least-sessions`: a new session is pinned to the ready pod
    /// holding the fewest live sessions, rather than where its hash places it.
    pub(crate) fn places_by_sessions(&self) -> bool {
        self.settings.by_sessions.unwrap_or(false)
    }

    /// With `sticky-session-spill-threshold`, how many requests may wait for a session's pinned
    /// pod before the next one goes to another pod of this revision.
    pub(crate) fn spill_threshold(&self) -> Option<usize> {
        self.settings.spill_threshold
    }

    /// With `sticky-sessions-per-pod`, the live sessions one pod may hold.
    pub(crate) fn sessions_per_pod(&self) -> Option<u32> {
        self.settings.sessions_per_pod
    }

    /// With `sticky-session-reserve` (and a cap on sessions per pod), the pods with a free seat
    /// to keep beyond the sessions held.
    pub(crate) fn session_reserve(&self) -> u32 {
        self.settings.sessions_per_pod.and(self.settings.session_reserve).unwrap_or(0)
    }

    /// Pin lifetime for pins into this revision.
    pub(crate) fn lifetime(&self) -> Lifetime {
        Lifetime { ttl: self.settings.ttl.unwrap_or(DEFAULT_TTL), max_age: self.settings.max_age }
    }
}

/// Where an id is read from, by the annotation's name after `sticky-session-` or
/// `sticky-revision-`; `Err(None)` for a name that is none of `ID_SOURCE_NAMES`.
fn read_id_source(what: &str, value: &str) -> Result<IdSource, Option<&'static str>> {
    match what {
        "header-name" => HeaderName::try_from(value).map(IdSource::Header).map_err(|_| Some("not a valid header name")),
        "query-parameter" if !value.is_empty() => Ok(IdSource::Query(value.to_owned())),
        "query-parameter" => Err(Some("empty")),
        "path-segment" => {
            value.parse().map(IdSource::PathSegment).map_err(|_| Some("not a path segment number (1-based)"))
        }
        "cookie-name" if is_cookie_name(value) => Ok(IdSource::Cookie(value.to_owned())),
        "cookie-name" => Err(Some("not a valid cookie name")),
        _ => Err(None),
    }
}

/// Why an annotation of the activator's prefix is ignored when no setting has its name (`name`,
/// without the prefix): the name it most likely meant, else every name it reads.
fn unknown_annotation(name: &str) -> String {
    let ids =
        ID_SOURCE_NAMES.iter().flat_map(|what| [format!("sticky-session-{what}"), format!("sticky-revision-{what}")]);
    let known: Vec<String> = SETTING_NAMES.iter().map(|name| (*name).to_owned()).chain(ids).collect();
    // Close enough to be a slip of the keyboard or a half-remembered name, not merely similar.
    let closest = known
        .iter()
        .map(|k| (strsim::jaro_winkler(name, k), k))
        .filter(|(score, _)| *score >= 0.9)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match closest {
        Some((_, meant)) => format!("unknown annotation; did you mean {ANNOTATION_PREFIX}{meant}?"),
        None => format!("unknown annotation; the activator reads {}", known.join(", ")),
    }
}

/// A positive duration, clamped to the longest pin lifetime.
fn read_lifetime(value: &str, report: &mut dyn FnMut(String)) -> Option<Duration> {
    let Some(d) = humantime::parse_duration(value).ok().filter(|d| !d.is_zero()) else {
        report(format!("{value:?} is not a positive duration such as 600s"));
        return None;
    };
    if d > MAX_LIFETIME {
        let max = humantime::format_duration(MAX_LIFETIME);
        report(format!("{value:?} is longer than the longest pin lifetime, {max}; using {max}"));
        return Some(MAX_LIFETIME);
    }
    Some(d)
}

/// Whether new sessions go to the pod with the fewest sessions (`least-sessions`) or where their
/// hash places them (`hash`, the default).
fn read_placement(value: &str, report: &mut dyn FnMut(String)) -> Option<bool> {
    read_either(value, [("hash", false), ("least-sessions", true)], report)
}

fn read_threshold(value: &str, report: &mut dyn FnMut(String)) -> Option<usize> {
    let read = value.parse::<usize>().ok().filter(|n| (1..=100_000).contains(n));
    if read.is_none() {
        report(format!("{value:?} is not a number of waiting requests from 1 to 100000"));
    }
    read
}

fn read_sessions_per_pod(value: &str, report: &mut dyn FnMut(String)) -> Option<u32> {
    // A claim reads every seat of the pods it tries, so the cap stays small.
    let read = value.parse::<u32>().ok().filter(|n| (1..=1000).contains(n));
    if read.is_none() {
        report(format!("{value:?} is not a number of sessions per pod from 1 to 1000"));
    }
    read
}

fn read_reserve(value: &str, report: &mut dyn FnMut(String)) -> Option<u32> {
    let read = value.parse::<u32>().ok().filter(|n| *n <= 1000);
    if read.is_none() {
        report(format!("{value:?} is not a number of pods from 0 to 1000"));
    }
    read
}

fn read_flag(value: &str, report: &mut dyn FnMut(String)) -> Option<bool> {
    let read = read_either(&value.to_ascii_lowercase(), [("true", true), ("false", false)], &mut |_| {});
    if read.is_none() {
        report(format!("{value:?} is neither true nor false"));
    }
    read
}

/// Whether session pins travel in signed cookies.
fn read_session_mode(value: &str, report: &mut dyn FnMut(String)) -> Option<bool> {
    read_either(value, [("store", false), ("signed-cookie", true)], report)
}

/// One of two words, each read as its value.
fn read_either(value: &str, words: [(&str, bool); 2], report: &mut dyn FnMut(String)) -> Option<bool> {
    let read = words.iter().find(|(word, _)| *word == value).map(|(_, read)| *read);
    if read.is_none() {
        report(format!("{value:?} is neither {} nor {}", words[0].0, words[1].0));
    }
    read
}

fn read_cookie_name(value: &str, report: &mut dyn FnMut(String)) -> Option<String> {
    if !is_cookie_name(value) {
        report(format!("{value:?}: not a valid cookie name"));
        return None;
    }
    Some(value.to_owned())
}

/// Whether new pins follow the share of requests.
fn read_split_mode(value: &str, report: &mut dyn FnMut(String)) -> Option<bool> {
    read_either(value, [("sessions", false), ("requests", true)], report)
}

fn read_end_path(value: &str, report: &mut dyn FnMut(String)) -> Option<String> {
    match value.parse::<http::uri::PathAndQuery>() {
        Ok(path) if value.starts_with('/') && value.len() <= MAX_PATH => Some(path.to_string()),
        _ => {
            report(format!("{value:?} is not a path such as /session/end"));
            None
        }
    }
}

fn read_chat_path(value: &str, report: &mut dyn FnMut(String)) -> Option<String> {
    match value.parse::<http::uri::PathAndQuery>() {
        Ok(path) if value.starts_with('/') && value.len() <= MAX_PATH && path.query().is_none() => {
            Some(path.path().to_owned())
        }
        _ => {
            report(format!("{value:?} is not a path such as {DEFAULT_CHAT_PATH}"));
            None
        }
    }
}

fn read_retry(value: &str, report: &mut dyn FnMut(String)) -> Option<Retry> {
    let retry = Retry::parse(value);
    if retry.is_none() {
        report(format!("{value:?} is none of off, safe and all"));
    }
    retry
}

/// Cookie names are RFC 6265 tokens.
fn is_cookie_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

/// How a service's requests carry ids: the union of what its own annotations and the
/// annotations of the revisions in its traffic configure (so clients of an old and a new
/// revision keep their affinity during a rollout), then the default headers.
#[derive(Debug)]
pub(crate) struct Policy {
    scope: Arc<str>,
    session: Vec<IdSource>,
    flow: Vec<IdSource>,
    /// Cookie created for clients that send no session id.
    cookie: Option<String>,
    /// With `sticky-session-generate-id`: the header a made-up session id is given back in.
    generated_header: Option<HeaderName>,
    /// Cookie created for clients that send no flow id (`sticky-revision-cookie-name`): a browser
    /// stays on one revision for a whole rollout.
    flow_cookie: Option<String>,
    /// The cookie session pins travel in (`sticky-session-mode: signed-cookie`).
    signed_cookie: Option<String>,
    /// What every cookie the activator sets for this service says beside its value.
    cookie_attributes: Arc<CookieAttributes>,
    /// `sticky-split-mode: requests` on the service or a revision of its traffic.
    split_by_requests: bool,
    /// `sticky-session-end-path` on the service or a revision of its traffic.
    session_end: Option<Arc<SessionEnd>>,
    /// With `sticky-session-chat-prefix: "true"` on the service or a revision of its traffic:
    /// the path of its chat requests.
    chat_path: Option<Arc<str>>,
    /// `sticky-session-strict: "true"` on the service or a revision of its traffic: a session
    /// whose pod (or revision) is gone is answered 503 once, not moved.
    strict_sessions: bool,
}

impl Policy {
    /// `with_default_ids` with the default id headers on, as a cluster has them unless told.
    #[cfg(test)]
    pub(crate) fn new<'a>(namespace: &str, service: &str, annotated: impl IntoIterator<Item = &'a Annotated>) -> Self {
        Self::with_default_ids(namespace, service, annotated, true)
    }

    /// The policy of a service whose traffic lists revisions `annotated` so. Signed pin cookies
    /// are the service's only when every one of them asks for them: a revision in the store mode
    /// (the default) keeps the service's sessions in the store, so one revision, a 0 % canary
    /// included, never changes where the others' sessions live. `cluster_default_ids` says
    /// whether a service that does not say (`sticky-default-ids`) reads the default id headers
    /// `K-Session` and `K-Revision`; the service's annotation (or its revisions') wins over it.
    pub(crate) fn with_default_ids<'a>(
        namespace: &str,
        service: &str,
        annotated: impl IntoIterator<Item = &'a Annotated>,
        cluster_default_ids: bool,
    ) -> Self {
        let mut session = Vec::new();
        let mut flow = Vec::new();
        let (mut secure, mut split_by_requests, mut chat_prefix, mut strict) = (false, false, false, false);
        let (mut generate, mut default_ids) = (false, None);
        let (mut signed, mut any) = (true, false);
        let (mut end_path, mut pin_cookie, mut chat_path) = (None, None, None);
        let (mut cookie_path, mut cookie_domain, mut same_site) = (None, None, None);
        for a in annotated {
            any = true;
            chat_path = chat_path.or_else(|| a.settings.chat_path.clone());
            chat_prefix |= a.settings.chat_prefix.unwrap_or(false);
            split_by_requests |= a.settings.split_by_requests.unwrap_or(false);
            strict |= a.settings.strict.unwrap_or(false);
            generate |= a.settings.generate_id.unwrap_or(false);
            default_ids = default_ids.or(a.settings.default_ids);
            end_path = end_path.or_else(|| a.settings.end_path.clone());
            pin_cookie = pin_cookie.or_else(|| a.settings.pin_cookie.clone());
            extend_unique(&mut session, &a.session);
            extend_unique(&mut flow, &a.flow);
            secure |= a.settings.cookie_secure.unwrap_or(false);
            cookie_path = cookie_path.or_else(|| a.settings.cookie_path.clone());
            cookie_domain = cookie_domain.or_else(|| a.settings.cookie_domain.clone());
            same_site = same_site.or(a.settings.cookie_same_site);
            signed &= a.settings.signed_cookie.unwrap_or(false);
        }
        let cookie_of = |sources: &[IdSource]| {
            sources.iter().find_map(|s| match s {
                IdSource::Cookie(name) => Some(name.clone()),
                _ => None,
            })
        };
        let (cookie, flow_cookie) = (cookie_of(&session), cookie_of(&flow));
        let signed_cookie = (signed && any).then(|| pin_cookie.unwrap_or_else(|| DEFAULT_PIN_COOKIE.to_owned()));
        let same_site = same_site.unwrap_or(SameSite::Lax);
        // Browsers drop a `SameSite=None` cookie that is not `Secure`.
        let secure = secure || same_site == SameSite::None;
        let cookie_attributes = Arc::new(CookieAttributes {
            path: cookie_path.unwrap_or_else(|| "/".to_owned()),
            domain: cookie_domain,
            same_site,
            secure,
        });
        if default_ids.unwrap_or(cluster_default_ids) {
            extend_unique(&mut session, &[IdSource::Header(DEFAULT_SESSION)]);
            extend_unique(&mut flow, &[IdSource::Header(DEFAULT_FLOW)]);
        }
        // The session header clients send their id in: the service's own, else `K-Session`. The
        // pod hears of a session's end in it, and a made-up id is given back in it.
        let first_header = session.iter().find_map(|s| match s {
            IdSource::Header(name) => Some(name.clone()),
            _ => None,
        });
        let generated_header = first_header.clone().filter(|_| generate);
        let session_end = end_path
            .and_then(|path| path.parse().ok())
            .map(|path| Arc::new(SessionEnd::new(path, first_header.clone().unwrap_or(DEFAULT_SESSION))));
        let chat_path = chat_prefix.then(|| chat_path.as_deref().unwrap_or(DEFAULT_CHAT_PATH).into());
        let scope = format!("{namespace}/{service}").into();
        Policy {
            scope,
            session,
            flow,
            cookie,
            generated_header,
            flow_cookie,
            signed_cookie,
            cookie_attributes,
            split_by_requests,
            session_end,
            chat_path,
            strict_sessions: strict,
        }
    }

    /// `<namespace>/<service>`: the scope of this service's pin keys.
    pub(crate) fn scope(&self) -> &Arc<str> {
        &self.scope
    }

    /// Where session ids are read from, first match wins.
    pub(crate) fn session_sources(&self) -> &[IdSource] {
        &self.session
    }

    /// Where flow ids are read from, first match wins.
    pub(crate) fn flow_sources(&self) -> &[IdSource] {
        &self.flow
    }

    /// With `sticky-session-generate-id`, the header a client without a session id is given a new
    /// one in (and sends it back in).
    pub(crate) fn generated_header(&self) -> Option<&HeaderName> {
        self.generated_header.as_ref()
    }

    /// The cookie made up for clients without a flow id, and what it says beside its value.
    pub(crate) fn flow_cookie(&self) -> Option<(&str, &Arc<CookieAttributes>)> {
        self.flow_cookie.as_deref().map(|name| (name, &self.cookie_attributes))
    }

    /// The cookie made up for clients without a session id, and what it says beside its value.
    pub(crate) fn cookie(&self) -> Option<(&str, &Arc<CookieAttributes>)> {
        self.cookie.as_deref().map(|name| (name, &self.cookie_attributes))
    }

    /// Whether a session whose pod or revision is gone is answered 503 (and its pin released)
    /// instead of being moved: its state went with the pod.
    pub(crate) fn strict_sessions(&self) -> bool {
        self.strict_sessions
    }

    /// Whether new pins steer the share of requests, not of sessions, to the percents.
    pub(crate) fn split_by_requests(&self) -> bool {
        self.split_by_requests
    }

    /// With `sticky-session-chat-prefix`, the path whose requests are chat requests: their
    /// conversation (`affinity::chat`) is their session when they name no session id.
    pub(crate) fn chat_path(&self) -> Option<&str> {
        self.chat_path.as_deref()
    }

    /// How the service hears that a session ended, if it asked to.
    pub(crate) fn session_end(&self) -> Option<&Arc<SessionEnd>> {
        self.session_end.as_ref()
    }

    /// The cookie session pins travel in with `sticky-session-mode: signed-cookie`, and what it
    /// says beside its value; `None` in the default mode, where pins live in the store.
    pub(crate) fn signed_cookie(&self) -> Option<(&str, &Arc<CookieAttributes>)> {
        self.signed_cookie.as_deref().map(|name| (name, &self.cookie_attributes))
    }
}

label_values! {
    /// A cookie's `SameSite` attribute (ingress-nginx's `session-cookie-samesite`).
    pub(crate) enum SameSite {
        Strict = "Strict",
        Lax = "Lax",
        None = "None",
    }
}

/// What the cookies the activator sets for a service say beside their value: `Path` (default
/// `/`), `Domain` (default none: the host alone), `SameSite` (default `Lax`; `None` makes them
/// `Secure`, as browsers require), `Secure`. Always `HttpOnly`: no script needs a pin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CookieAttributes {
    pub path: String,
    pub domain: Option<String>,
    pub same_site: SameSite,
    pub secure: bool,
}

impl CookieAttributes {
    /// `name=value` and the attributes, `Max-Age` when given: a `Set-Cookie` value.
    pub(crate) fn set_cookie(&self, name: &str, value: &str, max_age: Option<Duration>) -> String {
        let mut cookie = format!("{name}={value}; Path={}", self.path);
        if let Some(domain) = &self.domain {
            cookie.push_str(&format!("; Domain={domain}"));
        }
        cookie.push_str(&format!("; HttpOnly; SameSite={}", self.same_site.as_str()));
        if let Some(max_age) = max_age {
            cookie.push_str(&format!("; Max-Age={}", max_age.as_secs()));
        }
        if self.secure {
            cookie.push_str("; Secure");
        }
        cookie
    }
}

fn read_cookie_path(value: &str, report: &mut dyn FnMut(String)) -> Option<String> {
    let valid =
        value.starts_with('/') && value.len() <= MAX_PATH && value.bytes().all(|b| b.is_ascii_graphic() && b != b';');
    if !valid {
        report(format!("{value:?} is not a cookie path such as /app"));
    }
    valid.then(|| value.to_owned())
}

fn read_cookie_domain(value: &str, report: &mut dyn FnMut(String)) -> Option<String> {
    let name = value.strip_prefix('.').unwrap_or(value);
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if !valid {
        report(format!("{value:?} is not a cookie domain such as example.com"));
    }
    valid.then(|| name.to_ascii_lowercase())
}

fn read_same_site(value: &str, report: &mut dyn FnMut(String)) -> Option<SameSite> {
    let read = SameSite::ALL.iter().copied().find(|s| s.as_str().eq_ignore_ascii_case(value));
    if read.is_none() {
        report(format!("{value:?} is none of Strict, Lax and None"));
    }
    read
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

    /// Every annotation name after the prefix, and one no annotation has.
    fn every_name() -> Vec<String> {
        let ids = ID_SOURCE_NAMES
            .iter()
            .flat_map(|what| ["sticky-session-", "sticky-revision-"].map(|kind| format!("{kind}{what}")));
        let names = SETTING_NAMES.iter().map(|name| (*name).to_owned()).chain(ids);
        names.chain(["sticky-unknown".to_owned()]).collect()
    }

    /// The README's annotation table documents every annotation the activator reads.
    #[test]
    fn the_readme_documents_every_annotation() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        let table: Vec<&str> = readme
            .lines()
            .skip_while(|line| *line != "| annotation | meaning |")
            .take_while(|line| line.starts_with('|'))
            .collect();
        assert!(table.len() > 2, "the README has an annotation table");
        let missing: Vec<String> = every_name()
            .into_iter()
            .filter(|name| name != "sticky-unknown")
            .filter(|name| {
                // The flow id's sources share one row: `sticky-revision-header-name` / `-query-parameter` / ...
                let short = name.strip_prefix("sticky-revision").map(|what| format!("`{what}`"));
                !table.iter().any(|row| {
                    row.contains(&format!("`{name}")) || short.as_ref().is_some_and(|s| row.contains(s.as_str()))
                })
            })
            .collect();
        assert!(missing.is_empty(), "annotations the README's table does not list: {missing:?}");
    }

    /// Parses `activator.knative.dev/<key>: <value>` pairs, collecting what was rejected.
    pub(crate) fn annotated(pairs: &[(&str, &str)]) -> (Annotated, Vec<String>) {
        let map = pairs.iter().map(|(k, v)| (format!("{ANNOTATION_PREFIX}{k}"), (*v).to_owned())).collect();
        let mut errors = Vec::new();
        let parsed = Annotated::parse(&map, &mut |key, reason| errors.push(format!("{key}: {reason}")));
        (parsed, errors)
    }

    #[test]
    fn a_misspelt_annotation_is_told_what_it_meant() {
        let (_, errors) = annotated(&[
            ("sticky-session-heder-name", "x-user"),
            ("sticky-revison-header-name", "x-flow"),
            ("stiky-ttl", "90s"),
            ("colour", "blue"),
        ]);
        assert_eq!(errors.len(), 4, "{errors:?}");
        let said = |key: &str| errors.iter().find(|e| e.starts_with(&format!("{ANNOTATION_PREFIX}{key}:"))).unwrap();
        assert!(
            said("sticky-session-heder-name")
                .ends_with("did you mean activator.knative.dev/sticky-session-header-name?")
        );
        assert!(
            said("sticky-revison-header-name")
                .ends_with("did you mean activator.knative.dev/sticky-revision-header-name?")
        );
        assert!(said("stiky-ttl").ends_with("did you mean activator.knative.dev/sticky-ttl?"));
        assert!(said("colour").contains("the activator reads sticky-ttl"), "nothing close: every name");
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
            name in proptest::sample::select(every_name()),
            value in "\\PC{0,40}",
        ) {
            let (parsed, _) = annotated(&[(&name, &value)]);
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
        fn secure<'a>((name, attributes): (&'a str, &Arc<CookieAttributes>)) -> (&'a str, bool) {
            (name, attributes.secure)
        }
        let (signed, errors) = annotated(&[("sticky-session-mode", "signed-cookie")]);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(Policy::new("ns", "svc", [&signed]).signed_cookie().map(secure), Some((DEFAULT_PIN_COOKIE, false)));
        let (app, _) = annotated(&[("sticky-session-cookie-name", "app"), ("sticky-session-cookie-secure", "true")]);
        assert_eq!(
            Policy::new("ns", "svc", [&signed.clone().over(&app)]).signed_cookie().map(secure),
            Some((DEFAULT_PIN_COOKIE, true)),
            "the application's session cookie is an id, never the pin cookie"
        );
        let (named, _) = annotated(&[("sticky-session-pin-cookie-name", "pin")]);
        assert_eq!(
            Policy::new("ns", "svc", [&signed.clone().over(&named)]).signed_cookie().map(secure),
            Some(("pin", false))
        );
        let (store, _) = annotated(&[("sticky-session-mode", "store")]);
        assert_eq!(Policy::new("ns", "svc", [&store.over(&signed)]).signed_cookie(), None, "the revision's mode wins");
        assert_eq!(Policy::new("ns", "svc", [&app]).signed_cookie(), None, "the store is the default");
        let (plain, _) = annotated(&[]);
        assert_eq!(Policy::new("ns", "svc", [&plain, &signed]).signed_cookie(), None, "a canary alone changes nothing");
    }

    #[test]
    fn a_spill_threshold_is_a_positive_count() {
        assert_eq!(annotated(&[("sticky-session-spill-threshold", "4")]).0.spill_threshold(), Some(4));
        assert_eq!(annotated(&[]).0.spill_threshold(), None, "no spilling unless asked");
        for bad in ["0", "-1", "many", "1000000"] {
            let (a, errors) = annotated(&[("sticky-session-spill-threshold", bad)]);
            assert_eq!((a.spill_threshold(), errors.len()), (None, 1), "{bad}");
        }
    }

    /// The default id headers: the service's word (or a revision's), then the cluster's.
    #[test]
    fn sessions_per_pod_and_the_reserve_are_counts() {
        let (a, errors) = annotated(&[("sticky-sessions-per-pod", "1"), ("sticky-session-reserve", "2")]);
        assert_eq!((a.sessions_per_pod(), a.session_reserve(), errors.len()), (Some(1), 2, 0));
        assert_eq!(annotated(&[("sticky-session-reserve", "2")]).0.session_reserve(), 0, "a reserve needs a cap");
        for bad in ["0", "-1", "many", "1001"] {
            let (a, errors) = annotated(&[("sticky-sessions-per-pod", bad)]);
            assert_eq!((a.sessions_per_pod(), errors.len()), (None, 1), "{bad}");
        }
        assert_eq!(annotated(&[("sticky-sessions-per-pod", "2"), ("sticky-session-reserve", "x")]).1.len(), 1);
    }

    #[test]
    fn default_ids_follow_the_service_then_the_cluster() {
        let has_defaults = |p: &Policy| {
            (
                p.session_sources().contains(&IdSource::Header(DEFAULT_SESSION)),
                p.flow_sources().contains(&IdSource::Header(DEFAULT_FLOW)),
            )
        };
        let (plain, _) = annotated(&[("sticky-session-header-name", "X-User")]);
        let (off, _) = annotated(&[("sticky-default-ids", "false")]);
        let (on, _) = annotated(&[("sticky-default-ids", "true")]);
        assert_eq!(has_defaults(&Policy::with_default_ids("ns", "svc", [&plain], true)), (true, true));
        let quiet = Policy::with_default_ids("ns", "svc", [&plain], false);
        assert_eq!(has_defaults(&quiet), (false, false));
        assert_eq!(quiet.session_sources(), [IdSource::Header(HeaderName::from_static("x-user"))], "its own stay");
        assert_eq!(has_defaults(&Policy::with_default_ids("ns", "svc", [&off], true)), (false, false));
        assert_eq!(has_defaults(&Policy::with_default_ids("ns", "svc", [&on], false)), (true, true));
        let generated =
            Policy::with_default_ids("ns", "svc", [&annotated(&[("sticky-session-generate-id", "true")]).0], false);
        assert_eq!(generated.generated_header(), None, "no header to give an id in");
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
