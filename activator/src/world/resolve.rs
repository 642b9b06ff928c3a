//! Which service a request is for, and the revision it names if it names one, read from its
//! headers against one snapshot: Knative's ingress headers, else `Host` (or `:authority`). The
//! `Host` chooses a service or revision, never an address. Pure: reads the request's headers
//! and the snapshot, nothing else.

use std::sync::Arc;

use http::{HeaderValue, Request};

use super::{Revision, Service, Snapshot};
use crate::headers::{KNATIVE_NAMESPACE, KNATIVE_REVISION, KNATIVE_TAG};

/// A request's service, and the revision Knative's ingress picked for it if it picked one.
pub(crate) struct Target {
    pub service: Arc<Service>,
    /// The ingress's pick by the split, which pins may override; a revision asked for by a
    /// traffic tag or by its own host is routed as a service of its own, which they may not.
    pub ingress_pick: Option<Arc<Revision>>,
}

/// The request names no revision or service the activator knows; upstream's lister error names
/// the revision it looked for.
pub(crate) struct NotFound(pub String);

impl Snapshot {
    /// The service `req` is for: by Knative's ingress headers, else by `Host` (or `:authority`):
    /// a service's host, or a revision's cluster-local name `<revision>.<namespace>.svc.<domain>`
    /// (upstream's fallback).
    pub(crate) fn resolve<B>(&self, req: &Request<B>, cluster_domain: &str) -> Result<Target, NotFound> {
        let headers = req.headers();
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| headers.get(http::header::HOST).and_then(|h| h.to_str().ok()))
            .unwrap_or_default();
        if let (Some(ns), Some(name)) = (headers.get(KNATIVE_NAMESPACE), headers.get(KNATIVE_REVISION)) {
            let name = String::from_utf8_lossy(name.as_bytes());
            let tag = headers.get(KNATIVE_TAG).map(HeaderValue::as_bytes);
            let ns = String::from_utf8_lossy(ns.as_bytes());
            return self.named(&ns, &name, host, &|svc| svc.tagged(&name, tag, host));
        }
        if let Some(service) = self.service_for_host(host) {
            return Ok(Target { service: service.clone(), ingress_pick: None });
        }
        match revision_host(host, cluster_domain) {
            Some((name, ns)) => self.named(ns, name, host, &|_| true),
            // Upstream looks up the revision its Host fallback found, here none: its answer names "".
            None => Err(NotFound(String::new())),
        }
    }

    /// A revision asked for by name: served in the service (Route) the request came in by;
    /// asked for `explicit`ly, or by no service of its, served on its own.
    fn named(&self, ns: &str, name: &str, host: &str, explicit: &dyn Fn(&Service) -> bool) -> Result<Target, NotFound> {
        if let Some((service, revision)) = self.route_for(ns, name, host)
            && !explicit(service)
        {
            return Ok(Target { service: service.clone(), ingress_pick: Some(revision.clone()) });
        }
        let alone = self.revision_alone(ns, name).ok_or_else(|| NotFound(name.to_owned()))?;
        Ok(Target { service: alone.clone(), ingress_pick: alone.routes_to(name).cloned() })
    }
}

/// `<name>.<namespace>.svc.<domain>[:port]` split into name and namespace.
fn revision_host<'h>(host: &'h str, cluster_domain: &str) -> Option<(&'h str, &'h str)> {
    let host =
        host.rsplit_once(':').filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit())).map_or(host, |(h, _)| h);
    let mut parts = host.splitn(4, '.');
    let (name, namespace, svc, domain) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    (svc == "svc" && domain.eq_ignore_ascii_case(cluster_domain) && !name.is_empty() && !namespace.is_empty())
        .then_some((name, namespace))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revisions_cluster_local_host_names_it() {
        assert_eq!(
            revision_host("counter-00001.shop.svc.cluster.local", "cluster.local"),
            Some(("counter-00001", "shop"))
        );
        assert_eq!(
            revision_host("counter-00001.shop.svc.cluster.local:80", "cluster.local"),
            Some(("counter-00001", "shop"))
        );
        assert_eq!(
            revision_host("counter-00001.shop.svc.corp.example", "corp.example"),
            Some(("counter-00001", "shop"))
        );
        for other in [
            "counter-00001.shop",
            "counter.shop.example.com",
            "counter-00001.shop.svc.other.local",
            ".shop.svc.cluster.local",
        ] {
            assert_eq!(revision_host(other, "cluster.local"), None, "{other}");
        }
    }
}
