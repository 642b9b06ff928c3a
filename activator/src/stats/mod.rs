//! The per-revision request series, ours and upstream's: what is counted for each request a
//! revision answers, under which names and labels. Other modules declare their own metrics
//! (`crate::metrics`); `/metrics` exposes them all through `encode`.
//!
//! Per-revision handles are resolved once and kept with the revision, so recording a request
//! touches only atomics and never formats or hashes label strings. Our own names are here;
//! upstream's, recorded alongside, are in `knative`. Must not decide anything.

pub(crate) mod knative;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use crate::labelled::{LabelValue, Labelled};
use crate::metrics::Registrar;
use crate::retry::Outcome;
use crate::sync::lock;
use std::time::Duration;

use knative::{
    ClientSeries, KnativeMetrics, KnativeRevision, PROTOCOLS, Protocol, RevisionNames, Scheme, ServerSeries,
};
use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};

/// Status codes common enough to keep pre-resolved handles for; others take the label lookup.
const COMMON_CODES: [u16; 16] = [200, 201, 204, 206, 301, 302, 304, 400, 401, 403, 404, 429, 500, 502, 503, 504];

#[derive(Clone)]
pub(crate) struct Stats {
    registrar: Registrar,
    /// The live per-revision handles, so a revision that leaves and comes back while its old
    /// requests finish shares one set of series, and the series go when the last holder does.
    revisions: Arc<Mutex<HashMap<RevisionNames, Weak<RevisionStats>>>>,
    /// Upstream's names, recorded alongside ours.
    pub knative: KnativeMetrics,
    requests: IntCounterVec,
    latency: HistogramVec,
    in_flight: IntGaugeVec,
    queued: IntGaugeVec,
    queue_wait: HistogramVec,
    outside_subset: IntCounterVec,
    resent: IntCounterVec,
    retried: IntCounterVec,
    unreachable: IntCounterVec,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    /// In a registry of their own, for tests and benchmarks.
    pub(crate) fn new() -> Self {
        Self::register(&Registrar::default())
    }

    pub(crate) fn register(reg: &Registrar) -> Self {
        let labels = ["namespace", "service", "revision", "code"];
        let revision = &labels[..3];
        let knative = KnativeMetrics::new();
        reg.note_families(&knative.family_names());
        Stats {
            registrar: reg.clone(),
            revisions: Arc::default(),
            knative,
            requests: reg.counter_vec(
                "activator_requests_total",
                "Requests answered, by revision and status code",
                &labels,
            ),
            latency: reg.histogram_vec(
                "activator_request_duration_seconds",
                "Time from receiving a request to sending its response headers, queueing included",
                &labels,
            ),
            in_flight: reg.gauge_vec(
                "activator_in_flight_requests",
                "Requests from arrival to the end of their response (queued ones included), by revision",
                revision,
            ),
            queued: reg.gauge_vec(
                "activator_queued_requests",
                "Requests waiting for a ready pod or a free slot, by revision",
                revision,
            ),
            queue_wait: reg.histogram_vec(
                "activator_queue_wait_seconds",
                "Time a request waited for a ready pod or a free slot (zero for most), by revision",
                revision,
            ),
            outside_subset: reg.counter_vec(
                "activator_pinned_outside_subset_total",
                "Pinned requests sent to a pod outside this activator's subset of the revision's pods",
                revision,
            ),
            resent: reg.counter_vec(
                "activator_requests_resent_total",
                "Requests sent to another pod of their revision because their pod refused or dropped the \
                 connection before any byte of the request reached it",
                revision,
            ),
            retried: reg.counter_vec(
                "activator_requests_retried_total",
                "Requests whose pod failed them before any response byte that were safe to send again, by what \
                 became of them: retried on another pod, or not (over-budget, not-kept, no-pod)",
                &[labels[0], labels[1], labels[2], "result"],
            ),
            unreachable: reg.counter_vec(
                "activator_pods_unreachable_total",
                "Ready pods taken out of rotation because they refused or dropped a connection; each is probed \
                 until it accepts connections again",
                revision,
            ),
        }
    }

    /// The handles of one revision's series; its series are removed when the last handle goes.
    pub(crate) fn revision(&self, names: RevisionNames) -> Arc<RevisionStats> {
        let mut live = lock(&self.revisions);
        if let Some(existing) = live.get(&names).and_then(Weak::upgrade) {
            return existing;
        }
        let ours = [names.namespace.as_str(), &names.service, &names.revision];
        let created = Arc::new(RevisionStats {
            common: Default::default(),
            rare: Mutex::default(),
            rare_clients: Mutex::default(),
            in_flight: self.in_flight.with_label_values(&ours),
            queued: self.queued.with_label_values(&ours),
            queue_wait: self.queue_wait.with_label_values(&ours),
            outside_subset: self.outside_subset.with_label_values(&ours),
            resent: self.resent.with_label_values(&ours),
            retried: Labelled::new(&self.retried, &ours),
            unreachable: self.unreachable.with_label_values(&ours),
            knative: self.knative.revision(&names),
            stats: self.clone(),
            names: names.clone(),
        });
        live.insert(names, Arc::downgrade(&created));
        created
    }

    /// A request that never reached a revision (unknown host, bad request), answered at once
    /// with `body_bytes`.
    pub(crate) fn unrouted(&self, code: u16, protocol: Protocol, elapsed: Duration, body_bytes: u64) {
        self.record(["", "", ""], code, elapsed);
        self.knative.server(None, protocol, code).record(elapsed, 0, body_bytes);
    }

    fn record(&self, labels: [&str; 3], code: u16, elapsed: Duration) {
        let code = code.to_string();
        let labels = [labels[0], labels[1], labels[2], code.as_str()];
        self.requests.with_label_values(&labels).inc();
        self.latency.with_label_values(&labels).observe(elapsed.as_secs_f64());
    }

    /// The text exposition format served on `/metrics`: every registered family, and upstream's
    /// while exported.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let upstream = if self.knative.exported() { self.knative.gather() } else { Vec::new() };
        self.registrar.encode(upstream)
    }
}

/// The series of one status code of one revision: ours, and upstream's per protocol (the
/// client's per protocol and scheme).
struct CodeSeries {
    count: IntCounter,
    latency: Histogram,
    server: [OnceLock<ServerSeries>; PROTOCOLS],
    client: [OnceLock<ClientSeries>; PROTOCOLS * 2],
}

pub(crate) struct RevisionStats {
    names: RevisionNames,
    common: [OnceLock<CodeSeries>; COMMON_CODES.len()],
    /// Other (protocol, status code) pairs recorded, so their series can be removed too.
    rare: Mutex<Vec<(Protocol, u16)>>,
    rare_clients: Mutex<Vec<(Protocol, Option<u16>, Scheme)>>,
    pub in_flight: IntGauge,
    pub queued: IntGauge,
    pub queue_wait: Histogram,
    pub outside_subset: IntCounter,
    pub resent: IntCounter,
    pub retried: Labelled<Outcome, IntCounter>,
    pub unreachable: IntCounter,
    pub knative: KnativeRevision,
    stats: Stats,
}

impl RevisionStats {
    pub(crate) fn names(&self) -> &RevisionNames {
        &self.names
    }

    /// Counts a request answered with `code`, its time to response headers in ours, and returns
    /// upstream's server series to record once the response has ended.
    pub(crate) fn record(&self, code: u16, protocol: Protocol, elapsed: Duration) -> ServerSeries {
        let seconds = elapsed.as_secs_f64();
        let Some(slot) = COMMON_CODES.iter().position(|&c| c == code) else {
            let mut rare = lock(&self.rare);
            if !rare.contains(&(protocol, code)) {
                rare.push((protocol, code));
            }
            drop(rare);
            let names = &self.names;
            self.stats.record([&names.namespace, &names.service, &names.revision], code, elapsed);
            return self.stats.knative.server(Some(names), protocol, code);
        };
        let series = self.series(slot);
        series.count.inc();
        series.latency.observe(seconds);
        series.server[protocol.index()]
            .get_or_init(|| self.stats.knative.server(Some(&self.names), protocol, code))
            .clone()
    }

    /// Upstream's client series of an exchange with a pod that ended with `code` (`None`: no
    /// status, the exchange failed).
    pub(crate) fn client(&self, code: Option<u16>, protocol: Protocol, scheme: Scheme) -> ClientSeries {
        let common = code.and_then(|code| COMMON_CODES.iter().position(|&c| c == code));
        let Some(slot) = common else {
            let mut rare = lock(&self.rare_clients);
            if !rare.contains(&(protocol, code, scheme)) {
                rare.push((protocol, code, scheme));
            }
            return self.stats.knative.client(&self.names, protocol, code, scheme);
        };
        let index = protocol.index() * 2 + usize::from(scheme == Scheme::Https);
        self.series(slot).client[index]
            .get_or_init(|| self.stats.knative.client(&self.names, protocol, code, scheme))
            .clone()
    }

    fn series(&self, slot: usize) -> &CodeSeries {
        self.common[slot].get_or_init(|| {
            let code = COMMON_CODES[slot].to_string();
            let names = &self.names;
            let labels = [names.namespace.as_str(), &names.service, &names.revision, &code];
            CodeSeries {
                count: self.stats.requests.with_label_values(&labels),
                latency: self.stats.latency.with_label_values(&labels),
                server: Default::default(),
                client: std::array::from_fn(|_| OnceLock::new()),
            }
        })
    }
}

impl Drop for RevisionStats {
    /// The revision left and its last request ended: its series go, so label sets do not pile up
    /// as revisions come and go. A revision of the same name already back keeps them.
    fn drop(&mut self) {
        let mut live = lock(&self.stats.revisions);
        if live.get(&self.names).is_some_and(|w| w.strong_count() > 0) {
            return;
        }
        live.remove(&self.names);
        drop(live);
        let names = &self.names;
        let (ns, svc, rev) = (names.namespace.as_str(), names.service.as_str(), names.revision.as_str());
        let used: Vec<(Protocol, u16)> = COMMON_CODES
            .iter()
            .zip(&self.common)
            .filter_map(|(code, slot)| Some((*code, slot.get()?)))
            .flat_map(|(code, series)| {
                (0..PROTOCOLS)
                    .filter(|p| series.server[*p].get().is_some())
                    .map(move |p| (Protocol::from_index(p), code))
            })
            .chain(lock(&self.rare).iter().copied())
            .collect();
        let clients: Vec<(Protocol, Option<u16>, Scheme)> = COMMON_CODES
            .iter()
            .zip(&self.common)
            .filter_map(|(code, slot)| Some((*code, slot.get()?)))
            .flat_map(|(code, series)| {
                (0..PROTOCOLS * 2).filter(|i| series.client[*i].get().is_some()).map(move |i| {
                    let scheme = if i % 2 == 1 { Scheme::Https } else { Scheme::Http };
                    (Protocol::from_index(i / 2), Some(code), scheme)
                })
            })
            .chain(lock(&self.rare_clients).iter().copied())
            .collect();
        let codes = COMMON_CODES.iter().zip(&self.common).filter(|(_, slot)| slot.get().is_some()).map(|(c, _)| *c);
        for code in codes.chain(lock(&self.rare).iter().map(|(_, code)| *code)) {
            let code = code.to_string();
            let _ = self.stats.requests.remove_label_values(&[ns, svc, rev, &code]);
            let _ = self.stats.latency.remove_label_values(&[ns, svc, rev, &code]);
        }
        self.stats.knative.forget(names, used.into_iter(), clients.into_iter());
        let _ = self.stats.in_flight.remove_label_values(&[ns, svc, rev]);
        let _ = self.stats.queued.remove_label_values(&[ns, svc, rev]);
        let _ = self.stats.queue_wait.remove_label_values(&[ns, svc, rev]);
        for per_revision in [&self.stats.outside_subset, &self.stats.resent, &self.stats.unreachable] {
            let _ = per_revision.remove_label_values(&[ns, svc, rev]);
        }
        for result in Outcome::ALL {
            let _ = self.stats.retried.remove_label_values(&[ns, svc, rev, result.as_str()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(revision: &str) -> RevisionNames {
        RevisionNames {
            namespace: "ns".into(),
            service: "svc".into(),
            configuration: "svc".into(),
            revision: revision.into(),
            server_address: "svc.example.com".into(),
        }
    }

    const GET_11: fn() -> Protocol = || Protocol::of(&http::Method::GET, http::Version::HTTP_11);

    #[test]
    fn records_common_and_rare_codes_under_the_same_names() {
        let stats = Stats::new();
        let rev = stats.revision(names("svc-1"));
        rev.record(200, GET_11(), Duration::from_millis(3));
        rev.record(200, GET_11(), Duration::from_millis(3));
        rev.record(418, GET_11(), Duration::from_millis(3));
        stats.unrouted(404, GET_11(), Duration::from_millis(1), 10);
        let text = String::from_utf8(stats.encode()).unwrap();
        assert!(
            text.contains(r#"activator_requests_total{code="200",namespace="ns",revision="svc-1",service="svc"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"activator_requests_total{code="418",namespace="ns",revision="svc-1",service="svc"} 1"#)
        );
        assert!(text.contains(r#"activator_requests_total{code="404",namespace="",revision="",service=""} 1"#));
        assert!(text.contains("activator_request_duration_seconds_bucket"));
    }

    #[test]
    fn a_revisions_series_go_when_its_last_holder_does() {
        let stats = Stats::new();
        let series = |stats: &Stats| {
            let text = String::from_utf8(stats.encode()).unwrap();
            text.lines().filter(|l| l.contains("\"gone-1\"")).count()
        };
        let first = stats.revision(names("gone-1"));
        first.record(200, GET_11(), Duration::from_millis(1)).record(Duration::from_millis(1), 0, 1);
        first.record(418, GET_11(), Duration::from_millis(1)).record(Duration::from_millis(1), 0, 1);
        first.client(Some(200), GET_11(), Scheme::Http).duration.observe(0.001);
        first.client(Some(418), GET_11(), Scheme::Https).request_size.observe(1.0);
        first.client(None, GET_11(), Scheme::Http).duration.observe(0.001);
        first.in_flight.inc();
        assert!(series(&stats) > 0);
        let again = stats.revision(names("gone-1"));
        assert!(Arc::ptr_eq(&first, &again), "one set of handles while any is held");
        drop(first);
        assert!(series(&stats) > 0, "still held by a request");
        drop(again);
        assert_eq!(series(&stats), 0, "nothing left of the revision");
        let back = stats.revision(names("gone-1"));
        back.record(200, GET_11(), Duration::from_millis(1));
        assert!(series(&stats) > 0, "a revision that comes back is counted again");
    }

    /// Each family's type and the label names its samples carry, read from the exposition.
    fn families(text: &str) -> std::collections::BTreeMap<String, (String, std::collections::BTreeSet<String>)> {
        let mut found = std::collections::BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                found.insert(name.to_owned(), (kind.to_owned(), std::collections::BTreeSet::new()));
            } else if !line.starts_with('#') && !line.is_empty() {
                let (series, _) = line.rsplit_once(' ').unwrap();
                let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix).filter(|f| found.contains_key(*f)))
                    .unwrap_or(name);
                let names = labels.trim_end_matches('}').split(',').filter(|l| !l.is_empty());
                let names = names.map(|l| l.split_once('=').unwrap().0.to_owned()).filter(|l| l != "le");
                found.get_mut(family).unwrap().1.extend(names);
            }
        }
        found
    }

    #[test]
    fn upstream_names_have_upstreams_types_and_labels() {
        let stats = Stats::new();
        let rev = stats.revision(names("svc-1"));
        rev.record(200, GET_11(), Duration::from_millis(3)).record(Duration::from_millis(4), 0, 12);
        let brew = Protocol::of(&http::Method::from_bytes(b"BREW").unwrap(), http::Version::HTTP_2);
        rev.record(503, brew, Duration::ZERO).record(Duration::ZERO, 5, 0);
        rev.client(Some(200), GET_11(), Scheme::Http).duration.observe(0.002);
        rev.client(None, GET_11(), Scheme::Http).request_size.observe(0.0);
        stats.knative.kube_response("10.96.0.1:443", "get", Some(200));
        rev.knative.concurrency.set(0.5);
        rev.knative.queued.set(1);
        rev.knative.active.inc();
        stats.knative.stats_conn_reachable.set(1);
        stats.knative.stats_conn_errors.inc();
        let revision = ["k8s_namespace_name", "kn_configuration_name", "kn_revision_name", "kn_service_name"];
        let short = ["k8s_namespace_name", "kn_revision_name"];
        let http = [
            "http_request_method",
            "http_response_status_code",
            "network_protocol_name",
            "network_protocol_version",
            "url_scheme",
        ];
        let server = [&http[..], &["server_address"], &revision[..]].concat();
        let client = [&http[..], &["error_type"], &revision[..]].concat();
        let expected: [(&str, &str, Vec<&str>); 11] = [
            ("kn_revision_request_concurrency", "gauge", revision.to_vec()),
            ("kn_revision_request_queued", "gauge", short.to_vec()),
            ("kn_revision_request_active", "gauge", short.to_vec()),
            ("kn_activator_stats_conn_reachable", "gauge", vec!["peer"]),
            ("kn_activator_stats_conn_errors_total", "counter", vec!["peer"]),
            ("http_server_request_duration_seconds", "histogram", server.clone()),
            ("http_server_request_body_size_bytes", "histogram", server.clone()),
            ("http_server_response_body_size_bytes", "histogram", server),
            ("http_client_request_duration_seconds", "histogram", client.clone()),
            ("http_client_request_body_size_bytes", "histogram", client),
            (
                "kn_k8s_client_http_response_status_code_total",
                "counter",
                vec!["server_address", "http_request_method", "http_response_status_code"],
            ),
        ];
        let text = String::from_utf8(stats.encode()).unwrap();
        let found = families(&text);
        for (name, kind, labels) in &expected {
            let (found_kind, found_labels) = found.get(*name).unwrap_or_else(|| panic!("{name} missing:\n{text}"));
            assert_eq!(found_kind, kind, "{name}");
            let labels: std::collections::BTreeSet<String> = labels.iter().map(|l| l.to_string()).collect();
            assert_eq!(found_labels, &labels, "{name}");
        }
        assert!(text.contains(r#"http_request_method="_OTHER""#), "unknown methods are not label values");
        assert!(text.contains(r#"kn_activator_stats_conn_reachable{peer="autoscaler"} 1"#));

        stats.knative.set_exported(false);
        let text = String::from_utf8(stats.encode()).unwrap();
        assert!(expected.iter().all(|(name, ..)| !text.contains(name)), "metrics-protocol none: {text}");
        assert!(text.contains("activator_requests_total"), "ours stay");
    }
}
