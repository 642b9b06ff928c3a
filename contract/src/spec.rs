//! The world as a source describes it, in plain data: services with their hosts, annotations and
//! traffic split, and their revisions with concurrency, timeouts, annotations, endpoints and how
//! those endpoints prove ready. Every source (the local file, Knative's API objects) produces one;
//! [`validate`] checks what no source may get wrong; the `Publisher` turns it into the snapshot
//! the request path reads.
//!
//! Also the plain-data parts of a spec the runtime parts take as they are: how a revision's pods
//! are reached and proved ready (`Backends`, `Probe`), how the `Host` reaches them
//! (`HostRewrite`), how a service hears of a session's end (`SessionEnd`). A leaf: it imports
//! nothing of the activator's, so every part may import it.
//!
//! Must not know where a spec came from, nor build anything long-lived.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use http::header::HeaderName;

/// Knative's default `timeoutSeconds`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest revision timeout honoured: a year. Longer ones (Knative's fields are int64
/// seconds) are clamped to it, so adding one to a request's arrival can never overflow the clock.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// A `*TimeoutSeconds` field as read from any source: 0 is "off", as upstream's timeout handler
/// treats it for the response-start and idle timeouts; anything above [`MAX_TIMEOUT`] is clamped.
pub fn timeout_seconds(seconds: u64) -> Option<Duration> {
    (seconds > 0).then(|| Duration::from_secs(seconds).min(MAX_TIMEOUT))
}

/// How the client's `Host` reaches the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostRewrite {
    /// As the client sent it: the pod is the application itself (local mode).
    Keep,
    /// Moved to `K-Original-Host` (one already there is kept), with the pod's address as `Host`:
    /// queue-proxy puts it back, as upstream's activator expects.
    ToOriginalHost,
    /// As `ToOriginalHost`, but `Host` names the revision's private Service and
    /// `K-Passthrough-Lb: true` asks a mesh to deliver to the pod anyway (upstream's
    /// `enable-mesh-pod-addressability`).
    Passthrough(String),
}

/// How a revision's endpoints prove they are ready before they take traffic (see `readiness`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// Trusted as soon as they are listed.
    None,
    /// `GET <path>` answers 2xx.
    Http { path: String },
    /// Knative's queue-proxy probe: `GET <path>` with `K-Network-Probe: queue` answers 200 `queue`.
    /// With `passthrough_host`, the probe names that host and asks a mesh to pass it through to
    /// the pod (upstream's passthrough load balancing).
    Queue { path: String, passthrough_host: Option<String> },
}

/// A revision's pods as its source sees them, and how to reach them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backends {
    /// Pods that take traffic once the revision's probe passes against them.
    pub probed: Vec<SocketAddr>,
    /// Pods the platform vouches for: they take traffic at once.
    pub trusted: Vec<SocketAddr>,
    /// The revision's private Service, for when pods cannot be reached one by one.
    pub cluster_ip: Option<ClusterIp>,
    /// This activator's share of the pods, when several activators split a revision.
    pub subset: Option<Subset>,
    /// With system-internal TLS: how each pod (and the private Service) is reached over TLS.
    pub tls: Option<TlsPorts>,
    /// The Kubernetes Pod behind each address, where the platform names it (an Endpoints
    /// address's or an EndpointSlice endpoint's `targetRef`): whose `pod-deletion-cost` follows
    /// its sessions.
    pub pod_names: std::collections::BTreeMap<SocketAddr, String>,
}

/// Where a revision's pods take TLS, and the namespace their certificates must name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsPorts {
    pub namespace: String,
    /// The TLS port of each pod by its serving address (and 443 of the private Service); a pod
    /// missing here is reached on queue-proxy's 8112.
    pub ports: std::collections::BTreeMap<SocketAddr, u16>,
}

impl Backends {
    pub fn has_pods(&self) -> bool {
        !self.probed.is_empty() || !self.trusted.is_empty()
    }
}

/// A revision's private Service address, and when to send traffic through it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterIp {
    pub addr: SocketAddr,
    /// `true`: always (a mesh is known to be there); `false`: only once no pod answers a probe
    /// directly, every failure looks like a mesh's, and the Service's address answers.
    pub always: bool,
    /// Pods the platform reports ready behind it, which sizes its capacity.
    pub ready_pods: usize,
}

/// Which of the activators sharing a revision this one is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subset {
    pub index: usize,
    pub count: usize,
}

/// How a service hears that a session ended (`sticky-session-end-path`): a `POST` to `path` on
/// the pod the session was pinned to, the session id in `header`.
#[derive(Debug, PartialEq, Eq)]
pub struct SessionEnd {
    pub path: http::uri::PathAndQuery,
    pub header: HeaderName,
    /// `path`'s segments as servers match them (`path_segments`).
    segments: Vec<Vec<u8>>,
}

impl SessionEnd {
    pub fn new(path: http::uri::PathAndQuery, header: HeaderName) -> Self {
        SessionEnd { segments: path_segments(path.path()), path, header }
    }

    /// Whether a client request for `path` would reach the pod's end path, however it spells it:
    /// only the activator may call it, or any client could end another's session.
    pub fn is_addressed_by(&self, path: &str) -> bool {
        path_segments(path) == self.segments
    }
}

/// A path's segments as web servers and routers commonly resolve them before matching: percent
/// decoded (an encoded `/` included), empty and `.` segments dropped, `..` taking one back, and
/// `;` parameters cut. Refusing every spelling a server might take for the end path is safer than
/// guessing which one the pod's takes.
fn path_segments(path: &str) -> Vec<Vec<u8>> {
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(path).collect();
    let mut segments: Vec<Vec<u8>> = Vec::new();
    for segment in decoded.split(|b| *b == b'/') {
        let segment = segment.split(|b| *b == b';').next().unwrap_or_default();
        match segment {
            b"" | b"." => {}
            b".." => {
                segments.pop();
            }
            _ => segments.push(segment.to_vec()),
        }
    }
    segments
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorldSpec {
    pub services: Vec<ServiceSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    /// Host names (lower case, without port) that reach the service.
    pub hosts: Vec<String>,
    /// The service's own annotations; a revision's own take precedence.
    pub annotations: BTreeMap<String, String>,
    /// The valid targets and the weighted split over them.
    pub traffic: Vec<TrafficSpec>,
    /// Names that pick one of the traffic's revisions explicitly.
    pub tags: Vec<TagSpec>,
    pub revisions: Vec<RevisionSpec>,
}

/// A traffic tag (Knative's `tag:`): requests to its own host, or carrying its name in
/// `Knative-Serving-Tag`, ask for its revision and no other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagSpec {
    pub tag: String,
    pub revision: String,
    /// The first DNS label of the tag's host (`<tag>-<route>` by Knative's default template).
    pub host_label: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrafficSpec {
    pub revision: String,
    pub percent: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevisionSpec {
    pub name: String,
    pub config: RevisionConfig,
    pub annotations: BTreeMap<String, String>,
    /// The pods and how to reach them.
    pub backends: Backends,
    /// How probed pods prove ready.
    pub probe: Probe,
    /// How the client's `Host` reaches the pod.
    pub host: HostRewrite,
    /// The Knative Service and Configuration the revision belongs to, as its labels say; without
    /// them, the service it is served under.
    pub owners: Owners,
}

/// A revision's settings, as its source reads them and the snapshot serves them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevisionConfig {
    /// Requests a pod may hold at once; 0 means unlimited.
    pub container_concurrency: u32,
    /// From arrival to the end of the response (`timeoutSeconds`).
    pub timeout: Duration,
    /// Until the response's headers (`responseStartTimeoutSeconds`).
    pub response_start_timeout: Option<Duration>,
    /// The longest pause in the response body (`idleTimeoutSeconds`).
    pub idle_timeout: Option<Duration>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owners {
    pub service: Option<String>,
    pub configuration: Option<String>,
}

impl ServiceSpec {
    /// `<name>.<namespace>.svc.cluster.local`, the host a service without hosts of its own gets.
    pub fn default_host(namespace: &str, name: &str) -> String {
        format!("{name}.{namespace}.svc.cluster.local")
    }

    /// A revision's annotations over its service's, as one map (the revision's win).
    pub fn annotations_of(&self, revision: &RevisionSpec) -> BTreeMap<String, String> {
        let mut merged = self.annotations.clone();
        merged.extend(revision.annotations.iter().map(|(k, v)| (k.clone(), v.clone())));
        merged
    }
}

/// Why a spec cannot be used, naming the service at fault.
#[derive(Debug, PartialEq, Eq)]
pub struct SpecError {
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SpecError {}

fn error(service: &ServiceSpec, message: impl fmt::Display) -> SpecError {
    SpecError { message: format!("service {}/{}: {message}", service.namespace, service.name) }
}

/// Checks one service on its own: names, timeouts, endpoints listed once, and a traffic split over
/// its own revisions.
pub fn validate_service(svc: &ServiceSpec) -> Result<(), SpecError> {
    if svc.name.is_empty() || svc.namespace.is_empty() {
        return Err(error(svc, "name and namespace must not be empty"));
    }
    // Pins, cookies and split counts are scoped by `<namespace>/<service>`: a `/` in either
    // would let two services share one scope (Kubernetes names never hold one).
    if svc.name.contains('/') || svc.namespace.contains('/') {
        return Err(error(svc, "name and namespace must not contain '/'"));
    }
    let mut own = HashSet::new();
    for rev in &svc.revisions {
        if rev.name.is_empty() {
            return Err(error(svc, "a revision has an empty name"));
        }
        if !own.insert(rev.name.as_str()) {
            return Err(error(svc, format!("revision {} is listed twice", rev.name)));
        }
        if rev.config.timeout.is_zero() {
            return Err(error(svc, format!("revision {}: timeoutSeconds must be > 0", rev.name)));
        }
        if let Probe::Http { path } | Probe::Queue { path, .. } = &rev.probe
            && !path.starts_with('/')
        {
            return Err(error(svc, format!("revision {}: probePath must start with /", rev.name)));
        }
        let pods = || rev.backends.probed.iter().chain(&rev.backends.trusted);
        if pods().collect::<HashSet<_>>().len() != pods().count() {
            return Err(error(svc, format!("revision {}: an endpoint is listed twice", rev.name)));
        }
    }
    if svc.traffic.is_empty() {
        return Err(error(svc, "traffic must list at least one revision"));
    }
    for target in &svc.traffic {
        if !own.contains(target.revision.as_str()) {
            return Err(error(
                svc,
                format!("traffic names revision {}, which is not in this service's revisions", target.revision),
            ));
        }
    }
    for tag in &svc.tags {
        if !svc.traffic.iter().any(|t| t.revision == tag.revision) {
            return Err(error(
                svc,
                format!("tag {} names revision {}, which is not in the traffic", tag.tag, tag.revision),
            ));
        }
    }
    Ok(())
}

/// Checks every service, and what services must not share: a name, a host. Services of one
/// namespace may list the same revision (as several Knative Routes do), described alike.
pub fn validate(spec: &WorldSpec) -> Result<(), SpecError> {
    let mut services = HashSet::new();
    let mut hosts = HashMap::new();
    let mut revisions: HashMap<(&String, &String), &RevisionSpec> = HashMap::new();
    for svc in &spec.services {
        validate_service(svc)?;
        if !services.insert((&svc.namespace, &svc.name)) {
            return Err(error(svc, "defined twice"));
        }
        for host in &svc.hosts {
            if let Some((ns, name)) = hosts.insert(host, (&svc.namespace, &svc.name)) {
                return Err(error(svc, format!("host {host} is already used by {ns}/{name}")));
            }
        }
        for rev in &svc.revisions {
            if revisions.insert((&svc.namespace, &rev.name), rev).is_some_and(|before| before != rev) {
                return Err(error(
                    svc,
                    format!("revision {} is defined differently elsewhere in namespace {}", rev.name, svc.namespace),
                ));
            }
        }
    }
    Ok(())
}

/// Specs for tests, here and in the crates that read specs.
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use std::net::SocketAddr;

    use super::*;

    /// A service reached at `<name>.test` with revisions `<name>-<i>` at the given percents, each
    /// with the given endpoints, trusted without a probe.
    pub fn service(name: &str, revisions: &[(u32, Vec<SocketAddr>)]) -> ServiceSpec {
        ServiceSpec {
            namespace: "default".into(),
            name: name.into(),
            hosts: vec![format!("{name}.test")],
            annotations: BTreeMap::new(),
            traffic: (0..revisions.len())
                .map(|i| TrafficSpec { revision: format!("{name}-{i}"), percent: revisions[i].0 })
                .collect(),
            tags: Vec::new(),
            revisions: revisions
                .iter()
                .enumerate()
                .map(|(i, (_, endpoints))| RevisionSpec {
                    name: format!("{name}-{i}"),
                    config: RevisionConfig {
                        container_concurrency: 0,
                        timeout: DEFAULT_TIMEOUT,
                        response_start_timeout: None,
                        idle_timeout: None,
                    },
                    annotations: BTreeMap::new(),
                    backends: Backends { trusted: endpoints.clone(), ..Backends::default() },
                    probe: Probe::None,
                    host: HostRewrite::Keep,
                    owners: Owners::default(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::service;
    use super::*;
    use std::net::SocketAddr;

    /// The header a session id travels in by default (the activator's `K-Session`).
    const DEFAULT_SESSION: HeaderName = HeaderName::from_static("k-session");

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn a_good_spec_passes() {
        let spec = WorldSpec { services: vec![service("a", &[(30, vec![addr(1)]), (70, vec![])])] };
        assert_eq!(validate(&spec), Ok(()));
    }

    #[test]
    fn errors_name_the_service_and_the_problem() {
        let good = service("svc", &[(50, vec![addr(1), addr(2)]), (50, vec![])]);
        let broken = |change: &dyn Fn(&mut ServiceSpec)| {
            let mut svc = good.clone();
            change(&mut svc);
            validate(&WorldSpec { services: vec![svc] }).unwrap_err().to_string()
        };
        type Change<'a> = &'a dyn Fn(&mut ServiceSpec);
        let cases: [(Change, &str); 6] = [
            (&|s| s.traffic[0].revision = "nope".into(), "nope"),
            (&|s| s.revisions[0].config.timeout = Duration::ZERO, "timeoutSeconds"),
            (&|s| s.revisions[0].backends.trusted[1] = addr(1), "listed twice"),
            (&|s| s.revisions[0].probe = Probe::Http { path: "healthz".into() }, "probePath"),
            (&|s| s.traffic.clear(), "at least one"),
            (&|s| s.name.clear(), "must not be empty"),
        ];
        for (change, needle) in cases {
            let message = broken(change);
            assert!(message.contains(needle) && message.starts_with("service default/"), "{needle}: {message}");
        }
    }

    /// Issue 25, item 10: `a` in namespace `b/c` and `c/a` in namespace `b` would both be scoped
    /// `b/c/a`, sharing pins, cookies and split counts.
    #[test]
    fn the_scope_string_is_unambiguous() {
        let mut one = service("a", &[(100, vec![])]);
        one.namespace = "b/c".into();
        let mut two = service("c/a", &[(100, vec![])]);
        two.namespace = "b".into();
        for svc in [one, two] {
            assert!(validate_service(&svc).unwrap_err().message.contains("must not contain '/'"), "{}", svc.name);
        }
    }

    #[test]
    fn services_may_not_share_names_or_hosts_nor_describe_a_revision_twice() {
        let a = service("a", &[(100, vec![])]);
        let twice = WorldSpec { services: vec![a.clone(), a.clone()] };
        assert!(validate(&twice).unwrap_err().message.contains("defined twice"));
        let mut b = service("b", &[(100, vec![])]);
        b.hosts = a.hosts.clone();
        let shared_host = WorldSpec { services: vec![a.clone(), b.clone()] };
        assert!(validate(&shared_host).unwrap_err().message.contains("already used"));
        b.hosts = vec!["b.test".into()];
        b.revisions[0].name = "a-0".into();
        b.traffic[0].revision = "a-0".into();
        let shared_revision = WorldSpec { services: vec![a.clone(), b.clone()] };
        assert_eq!(validate(&shared_revision), Ok(()), "two Routes may list one revision");
        b.revisions[0].config.container_concurrency = 7;
        let different = WorldSpec { services: vec![a, b] };
        assert!(validate(&different).unwrap_err().message.contains("defined differently"));
    }

    #[test]
    fn a_revisions_annotations_win_over_its_services() {
        let mut svc = service("a", &[(100, vec![])]);
        svc.annotations = [("k".to_owned(), "service".to_owned()), ("s".to_owned(), "only".to_owned())].into();
        svc.revisions[0].annotations = [("k".to_owned(), "revision".to_owned())].into();
        let merged = svc.annotations_of(&svc.revisions[0]);
        assert_eq!((merged["k"].as_str(), merged["s"].as_str()), ("revision", "only"));
    }

    #[test]
    fn every_spelling_of_the_end_path_addresses_it() {
        let end = SessionEnd::new("/session/end".parse().unwrap(), DEFAULT_SESSION);
        for same in [
            "/session/end",
            "//session//end/",
            "/session/./end",
            "/other/../session/end",
            "/session%2Fend",
            "/%73ession/end",
            "/session/end;v=1",
        ] {
            assert!(end.is_addressed_by(same), "{same}");
        }
        for other in ["/session/ends", "/session", "/Session/End", "/session/end/more", "/"] {
            assert!(!end.is_addressed_by(other), "{other}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_request_path_is_matched_without_panicking(path in "\\PC{0,40}") {
            let end = SessionEnd::new("/session/end".parse().unwrap(), DEFAULT_SESSION);
            let _ = end.is_addressed_by(&path);
        }
    }
}
