//! The header names the activator reads or writes, in one place: Knative's (named as upstream
//! spells them), the affinity defaults, and the activator's own.

use http::header::HeaderName;

/// The revision Knative's ingress routed the request to, and its namespace.
pub(crate) const KNATIVE_REVISION: HeaderName = HeaderName::from_static("knative-serving-revision");
pub(crate) const KNATIVE_NAMESPACE: HeaderName = HeaderName::from_static("knative-serving-namespace");
/// Names a traffic tag, with `tag-header-based-routing`; passed on to the pod.
pub(crate) const KNATIVE_TAG: HeaderName = HeaderName::from_static("knative-serving-tag");
/// Tells queue-proxy the request came through the activator, so the autoscaler does not count it
/// twice.
pub(crate) const PROXY_REQUEST: HeaderName = HeaderName::from_static("k-proxy-request");
/// Knative's network probes: `probe` (with a hash to echo) from the ingress, `activator` from the
/// autoscaler, `queue` to queue-proxy.
pub(crate) const NETWORK_PROBE: HeaderName = HeaderName::from_static("k-network-probe");
pub(crate) const NETWORK_HASH: HeaderName = HeaderName::from_static("k-network-hash");
/// Marks a kubelet probe when the User-Agent does not.
pub(crate) const KUBELET_PROBE: HeaderName = HeaderName::from_static("k-kubelet-probe");
pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// Where queue-proxy finds the Host the client sent, when the activator addresses the pod itself.
pub(crate) const ORIGINAL_HOST: HeaderName = HeaderName::from_static("k-original-host");
/// Asks a mesh to deliver a request to the pod named in `Host` rather than balance it.
pub(crate) const PASSTHROUGH_LB: HeaderName = HeaderName::from_static("k-passthrough-lb");

/// Session and flow ids every service accepts, with no annotation.
pub(crate) const DEFAULT_SESSION: HeaderName = HeaderName::from_static("k-session");
pub(crate) const DEFAULT_FLOW: HeaderName = HeaderName::from_static("k-revision");

/// The activator's call telling a pod a session ended (`session_end`): why (`idle` or `moved`),
/// when (Unix seconds), and its signature under `--session-end-keys`. A client never sends them:
/// they are taken off every request.
pub(crate) const SESSION_END: HeaderName = HeaderName::from_static("k-session-end");
pub(crate) const SESSION_END_TIME: HeaderName = HeaderName::from_static("k-session-end-time");
pub(crate) const SESSION_END_SIGNATURE: HeaderName = HeaderName::from_static("k-session-end-signature");

/// Told to the client when its session's pod or revision is gone, with why (`pod-gone`,
/// `revision-gone`): with strict sessions on the 503 that ends it, otherwise on the response of
/// the request that moved it to another pod.
pub(crate) const SESSION_LOST: HeaderName = HeaderName::from_static("k-session-lost");
pub(crate) const SESSION_MOVED: HeaderName = HeaderName::from_static("k-session-moved");

/// With `--debug-headers`: why the request went where it went.
pub(crate) const DECISION: HeaderName = HeaderName::from_static("x-activator-decision");
