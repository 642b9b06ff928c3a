//! Local mode's file formats: the topology file (services, traffic, revisions, endpoints) and
//! the endpoints file `autoscaler-shim` publishes, with errors that name the line and column, or
//! the service at fault. Turns them into the source-neutral `WorldSpec`.
//!
//! Unknown fields are errors, so typos do not pass silently. Must not do I/O: the activator's
//! `source::local` and the shim read the files.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use serde::Deserialize;

use crate::spec::{
    self, Backends, HostRewrite, Owners, Probe, RevisionConfig, RevisionSpec, ServiceSpec, TrafficSpec, WorldSpec,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyFile {
    #[serde(default)]
    pub services: Vec<ServiceEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceEntry {
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub name: String,
    /// Host names (without port) that reach this service. Empty means
    /// `<name>.<namespace>.svc.cluster.local`.
    #[serde(default)]
    pub hosts: Vec<String>,
    pub traffic: Vec<TrafficEntry>,
    pub revisions: Vec<RevisionEntry>,
    /// Service-level annotations; a revision's own annotations take precedence.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficEntry {
    pub revision: String,
    pub percent: u32,
    #[serde(default)]
    pub tag: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RevisionEntry {
    pub name: String,
    /// Requests a pod may hold at once; 0 means unlimited.
    #[serde(default)]
    pub container_concurrency: u32,
    #[serde(default = "default_timeout_seconds")]
    pub timeout_seconds: u64,
    /// Until the response's headers; unset: only `timeoutSeconds` bounds them.
    #[serde(default)]
    pub response_start_timeout_seconds: Option<u64>,
    /// The longest pause in a response body; unset or 0: no bound.
    #[serde(default)]
    pub idle_timeout_seconds: Option<u64>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    /// How a new endpoint proves it is ready: `http` (GET `probePath` answers 2xx), `queue`
    /// (Knative's queue-proxy probe on `probePath`) or `none` (trusted at once).
    #[serde(default)]
    pub probe: ProbeKind,
    #[serde(default = "default_probe_path")]
    pub probe_path: String,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    #[default]
    Http,
    Queue,
    None,
}

/// Endpoints published apart from the topology (by `autoscaler-shim`'s process backend):
/// `<namespace>/<revision>: [ip:port, …]`, added to the revision's own.
pub type EndpointsFile = BTreeMap<String, Vec<SocketAddr>>;

/// Parses an endpoints file; an empty file means no extra endpoints.
pub fn parse_endpoints(text: &str) -> Result<EndpointsFile, TopologyError> {
    if text.trim().is_empty() {
        return Ok(EndpointsFile::new());
    }
    serde_yaml_ng::from_str(text).map_err(located)
}

fn default_probe_path() -> String {
    "/healthz".to_owned()
}

fn default_namespace() -> String {
    "default".to_owned()
}

fn default_timeout_seconds() -> u64 {
    spec::DEFAULT_TIMEOUT.as_secs()
}

/// Why a topology file was rejected.
#[derive(Debug, PartialEq, Eq)]
pub struct TopologyError {
    /// 1-based line and column, when the problem is at one place in the text.
    pub location: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for TopologyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some((line, column)) if !self.message.contains(&format!("line {line} column {column}")) => {
                write!(f, "line {line} column {column}: {}", self.message)
            }
            _ => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for TopologyError {}

/// Parses and validates a topology file: the spec's rules, names Kubernetes would accept, hosts a
/// `Host` header can match, each revision and tag once in the traffic, and traffic that adds up
/// to 100.
pub fn parse(text: &str) -> Result<TopologyFile, TopologyError> {
    let semantic = |message: String| TopologyError { location: None, message };
    // serde reads an empty document as no services; a file that says nothing is a mistake.
    if text.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) {
        return Err(semantic("the file is empty: it must list `services:` (see examples/topology.yaml)".to_owned()));
    }
    let file: TopologyFile = serde_yaml_ng::from_str(text).map_err(located)?;
    for svc in &file.services {
        check_service(svc).map_err(|e| semantic(format!("service {}/{}: {e}", svc.namespace, svc.name)))?;
    }
    spec::validate(&file.to_spec(&EndpointsFile::new())).map_err(|e| semantic(e.message))?;
    Ok(file)
}

/// What a file can get wrong that Knative's API server would have refused: names, hosts, the
/// traffic list.
fn check_service(svc: &ServiceEntry) -> Result<(), String> {
    dns_label(&svc.namespace).map_err(|e| format!("namespace: {e}"))?;
    dns_label(&svc.name).map_err(|e| format!("name: {e}"))?;
    for rev in &svc.revisions {
        dns_label(&rev.name).map_err(|e| format!("revision name: {e}"))?;
    }
    for host in &svc.hosts {
        if !is_dns_name(host) {
            return Err(format!(
                "host {host:?} can never match a Host header: give a DNS name such as counter.example.com, \
                 without scheme, port or path"
            ));
        }
    }
    let (mut revisions, mut tags) = (std::collections::HashSet::new(), std::collections::HashSet::new());
    for target in &svc.traffic {
        if !revisions.insert(target.revision.as_str()) {
            return Err(format!("traffic lists revision {} twice; give it one entry", target.revision));
        }
        if let Some(tag) = &target.tag {
            dns_label(tag).map_err(|e| format!("tag: {e}"))?;
            if !tags.insert(tag.as_str()) {
                return Err(format!("tag {tag} is given twice in the traffic"));
            }
        }
    }
    let total: u64 = svc.traffic.iter().map(|t| u64::from(t.percent)).sum();
    if total != 100 {
        return Err(format!("traffic percents add up to {total}, not 100"));
    }
    Ok(())
}

/// A name Kubernetes accepts for a namespace, Service or revision (an RFC 1123 label): at most 63
/// lowercase letters, digits and `-`, starting and ending with a letter or digit.
fn dns_label(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a name Kubernetes accepts: at most 63 lowercase letters, digits and '-', \
             starting and ending with a letter or digit"
        ))
    }
}

/// A host a `Host` header can carry without its port: dot-separated labels, matched without case.
fn is_dns_name(host: &str) -> bool {
    host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn located(e: serde_yaml_ng::Error) -> TopologyError {
    TopologyError { location: e.location().map(|l| (l.line(), l.column())), message: e.to_string() }
}

impl TopologyFile {
    /// The world this file describes, with the endpoints `published` adds to each revision's own.
    pub fn to_spec(&self, published: &EndpointsFile) -> WorldSpec {
        let services = self
            .services
            .iter()
            .map(|svc| ServiceSpec {
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
                hosts: if svc.hosts.is_empty() {
                    vec![ServiceSpec::default_host(&svc.namespace, &svc.name)]
                } else {
                    svc.hosts.iter().map(|h| h.to_ascii_lowercase()).collect()
                },
                annotations: svc.annotations.clone(),
                traffic: svc
                    .traffic
                    .iter()
                    .map(|t| TrafficSpec { revision: t.revision.clone(), percent: t.percent })
                    .collect(),
                tags: Vec::new(),
                revisions: svc.revisions.iter().map(|rev| rev.to_spec(&svc.namespace, published)).collect(),
            })
            .collect();
        WorldSpec { services }
    }
}

impl RevisionEntry {
    fn to_spec(&self, namespace: &str, published: &EndpointsFile) -> RevisionSpec {
        let mut endpoints = self.endpoints.clone();
        let extra = published.get(&format!("{namespace}/{}", self.name));
        endpoints.extend(extra.into_iter().flatten().filter(|a| !self.endpoints.contains(a)));
        let (probe, backends) = match self.probe {
            ProbeKind::Http => {
                (Probe::Http { path: self.probe_path.clone() }, Backends { probed: endpoints, ..Default::default() })
            }
            ProbeKind::Queue => (
                Probe::Queue { path: self.probe_path.clone(), passthrough_host: None },
                Backends { probed: endpoints, ..Default::default() },
            ),
            ProbeKind::None => (Probe::None, Backends { trusted: endpoints, ..Default::default() }),
        };
        RevisionSpec {
            name: self.name.clone(),
            config: RevisionConfig {
                container_concurrency: self.container_concurrency,
                timeout: spec::timeout_seconds(self.timeout_seconds).unwrap_or_default(),
                response_start_timeout: self.response_start_timeout_seconds.and_then(spec::timeout_seconds),
                idle_timeout: self.idle_timeout_seconds.and_then(spec::timeout_seconds),
            },
            annotations: self.annotations.clone(),
            backends,
            probe,
            host: HostRewrite::Keep,
            owners: Owners::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TWO_REVISIONS: &str = r#"
services:
  - name: counter
    hosts: [counter.example.com]
    traffic:
      - revision: counter-1
        percent: 30
      - revision: counter-2
        percent: 70
        tag: next
      - revision: counter-3
        percent: 0
    revisions:
      - name: counter-1
        endpoints: ["127.0.0.1:9001"]
      - name: counter-2
        containerConcurrency: 2
        timeoutSeconds: 5
        annotations: {a: b}
        endpoints: ["127.0.0.1:9002", "127.0.0.1:9003"]
      - name: counter-3
"#;

    #[test]
    fn parses_a_full_file() {
        let file = parse(TWO_REVISIONS).unwrap();
        let svc = &file.services[0];
        assert_eq!(svc.namespace, "default");
        assert_eq!(svc.traffic[1].tag.as_deref(), Some("next"));
        let spec = file.to_spec(&EndpointsFile::new());
        assert_eq!(spec.services[0].hosts, ["counter.example.com"]);
        assert_eq!(spec.services[0].revisions[1].config.timeout, std::time::Duration::from_secs(5));
        assert_eq!(spec.services[0].revisions[2].probe, Probe::Http { path: "/healthz".into() });
        assert_eq!(svc.revisions[1].container_concurrency, 2);
        assert_eq!(svc.revisions[0].timeout_seconds, spec::DEFAULT_TIMEOUT.as_secs());
        assert_eq!(svc.revisions[1].endpoints.len(), 2);
    }

    #[test]
    fn syntax_errors_name_line_and_column() {
        let err = parse("services:\n  - name: x\n    traffic: [\n").unwrap_err();
        assert!(err.location.is_some(), "{err}");
        let err = parse("services:\n  - name: x\n    bogus: 1\n").unwrap_err();
        assert_eq!(err.location.map(|l| l.0), Some(3), "{err}");
        assert!(err.message.contains("bogus"), "{err}");
    }

    #[test]
    fn bad_endpoints_are_located() {
        let text = TWO_REVISIONS.replace("127.0.0.1:9003", "not-an-address");
        let err = parse(&text).unwrap_err();
        let line = text.lines().position(|l| l.contains("not-an-address")).unwrap() + 1;
        assert_eq!(err.location.map(|l| l.0), Some(line), "{err}");
    }

    #[test]
    fn semantic_errors_name_the_service() {
        let cases = [
            (TWO_REVISIONS.replace("percent: 70", "percent: 60"), "add up to 90"),
            (TWO_REVISIONS.replace("- revision: counter-3", "- revision: nope"), "nope"),
            (TWO_REVISIONS.replace("timeoutSeconds: 5", "timeoutSeconds: 0"), "timeoutSeconds"),
            (TWO_REVISIONS.replace("127.0.0.1:9003", "127.0.0.1:9002"), "listed twice"),
            (TWO_REVISIONS.replace("traffic:\n", "traffic: []\n    x:\n"), "unknown field"),
        ];
        for (text, needle) in cases {
            let err = parse(&text).unwrap_err();
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn what_kubernetes_or_a_host_header_would_refuse_is_refused_in_one_line() {
        let cases = [
            (String::new(), "the file is empty"),
            ("# nothing yet\n\n".to_owned(), "the file is empty"),
            (TWO_REVISIONS.replace("[counter.example.com]", "[\"http://x:8080/\"]"), "can never match a Host header"),
            (TWO_REVISIONS.replace("[counter.example.com]", "[\"x:8080\"]"), "can never match a Host header"),
            (TWO_REVISIONS.replace("percent: 0\n", "percent: 0\n        tag: next\n"), "tag next is given twice"),
            (TWO_REVISIONS.replace("- revision: counter-3", "- revision: counter-1"), "lists revision counter-1 twice"),
            (TWO_REVISIONS.replace("name: counter\n", "name: Counter\n"), "name: \"Counter\" is not a name"),
            (
                TWO_REVISIONS
                    .replace("name: counter-3", "name: counter_3")
                    .replace("revision: counter-3", "revision: counter_3"),
                "revision name",
            ),
            (TWO_REVISIONS.replace("tag: next", "tag: Next"), "tag: \"Next\""),
            (TWO_REVISIONS.replace("  - name: counter\n", "  - name: counter\n    namespace: a.b\n"), "namespace"),
        ];
        for (text, needle) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
        assert!(parse("services: []\n").is_ok(), "a file may list no service on purpose");
        let upper_host = TWO_REVISIONS.replace("[counter.example.com]", "[Counter.Example.com]");
        assert_eq!(
            parse(&upper_host).unwrap().to_spec(&EndpointsFile::new()).services[0].hosts,
            ["counter.example.com"]
        );
    }

    #[test]
    fn duplicate_hosts_and_services_are_rejected() {
        let twice = format!("{TWO_REVISIONS}{}", TWO_REVISIONS.replace("services:\n", ""));
        assert!(parse(&twice).unwrap_err().to_string().contains("defined twice"));
        let other = TWO_REVISIONS.replace("services:\n", "").replace("name: counter\n", "name: other\n");
        let other = other.replace("counter-", "other-");
        let both = format!("{TWO_REVISIONS}{other}");
        assert!(parse(&both).unwrap_err().to_string().contains("already used"));
    }

    #[test]
    fn published_endpoints_join_the_revisions_own() {
        let text = TWO_REVISIONS.replace("      - name: counter-1\n", "      - name: counter-1\n        probe: none\n");
        let published = parse_endpoints("default/counter-1: [\"127.0.0.1:9005\", \"127.0.0.1:9001\"]\n").unwrap();
        let spec = parse(&text).unwrap().to_spec(&published);
        let trusted: Vec<String> =
            spec.services[0].revisions[0].backends.trusted.iter().map(|a| a.to_string()).collect();
        assert_eq!(trusted, ["127.0.0.1:9001", "127.0.0.1:9005"], "each endpoint once, trusted without a probe");
        let probed = &spec.services[0].revisions[1];
        assert_eq!(probed.probe, Probe::Http { path: "/healthz".into() }, "probed by default");
        assert_eq!(probed.backends.probed.len(), 2);
        assert!(parse_endpoints("").unwrap().is_empty());
        assert!(parse_endpoints("x: [nope]").unwrap_err().location.is_some());
    }

    proptest! {
        /// A topology file edited anywhere, into anything: it parses into a world, or the error
        /// says why; never a panic.
        #[test]
        fn any_edit_of_a_topology_file_parses_or_is_refused(
            at in any::<prop::sample::Index>(),
            cut in 0usize..12,
            insert in prop_oneof!["\\PC{0,10}", "[0-9]{1,25}", Just("-1".to_owned()), Just("[::1]:0".to_owned())],
        ) {
            let start = at.index(TWO_REVISIONS.len());
            let Some(end) = (start..=TWO_REVISIONS.len().min(start + cut)).rev().find(|i| TWO_REVISIONS.is_char_boundary(*i))
            else {
                return Ok(());
            };
            let text = format!("{}{insert}{}", &TWO_REVISIONS[..start], &TWO_REVISIONS[end..]);
            if let Ok(file) = parse(&text) {
                let _ = file.to_spec(&EndpointsFile::new());
            }
        }

        #[test]
        fn any_text_is_a_topology_or_an_error(text in "\\PC{0,200}") {
            let _ = parse(&text);
            let _ = parse_endpoints(&text);
        }
    }
}
