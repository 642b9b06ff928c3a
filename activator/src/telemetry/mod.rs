//! What the activator tells the outside about each request besides its own `/metrics`: one
//! OTLP server span per request carrying the routing decision, W3C trace context passed on to the
//! pod, the request log, and whether upstream's metric names are exported. Configured at start
//! from flags and `OTEL_*` variables, and live from `config-observability` in Knative mode.
//!
//! Costs nothing while off: spans are filtered at their callsite, so a request creates none, and
//! the request log is one atomic load. Records what happened; must not decide anything.

mod access_log;
mod config;
mod logs;
mod push;
mod template;
mod tracer;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, Request};
use opentelemetry::propagation::{TextMapCompositePropagator, TextMapPropagator};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use prometheus::{Histogram, IntCounter};
use tracing::Span;
use tracing::field::Empty;
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::DynFilterFn;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;

pub(crate) use access_log::{AccessLog, Entry, Routed as LoggedRoute};
pub(crate) use config::{MetricsProtocol, ObservabilityConfig, TracingProtocol};
pub(crate) use logs::{LogFilter, LogLevel, level_from_config_logging};

use crate::metrics::Registrar;
use crate::response_body::Finished;
use crate::stats::knative::{KnativeMetrics, Protocol, ServerSeries};
use crate::sync::lock;

/// The target of our spans; log output never formats them.
pub(crate) const SPAN_TARGET: &str = "activator::span";

#[derive(Clone)]
pub(crate) struct Telemetry {
    inner: Arc<Inner>,
}

struct Inner {
    tracer: tracer::SwitchTracer,
    tracing: Arc<AtomicBool>,
    request_log: AtomicBool,
    access_log: AccessLog,
    knative: KnativeMetrics,
    propagator: TextMapCompositePropagator,
    applied: Mutex<Option<ObservabilityConfig>>,
    /// The task pushing upstream's metrics, while `metrics-protocol` asks for it.
    pushing: Mutex<Option<tokio::task::AbortHandle>>,
    /// Serves `/metrics` where `metrics-endpoint` moves it.
    prometheus: std::sync::OnceLock<Arc<dyn PrometheusListener>>,
}

/// Serves `/metrics` on a listener of its own, where `config-observability` moves upstream's
/// Prometheus endpoint (`None`: no such listener, the admin port serves it).
pub(crate) trait PrometheusListener: Send + Sync {
    fn listen_at(&self, at: Option<SocketAddr>);
}

/// What became of one request, for its span and its request-log line.
pub(crate) struct Outcome<'a> {
    pub status: u16,
    /// Set once a revision took the request.
    pub routed: Option<Routed<'a>>,
}

pub(crate) struct Routed<'a> {
    pub namespace: &'a str,
    pub service: &'a str,
    pub revision: &'a str,
    pub decision: &'static str,
    /// Where the deciding pin was looked up: near-cache, memory, redis, or fallback (Redis
    /// unavailable, this replica's own pins).
    pub pin_source: Option<&'static str>,
    pub pod: Option<SocketAddr>,
    pub queued: Duration,
    /// The first hex digits of the hashed session and flow keys; never the ids.
    pub session: Option<String>,
    pub flow: Option<String>,
}

/// Sets headers with a value only: an empty `tracestate` is noise to the pod.
struct NonEmpty<'a>(HeaderInjector<'a>);

impl opentelemetry::propagation::Injector for NonEmpty<'_> {
    fn set(&mut self, key: &str, value: String) {
        if !value.is_empty() {
            self.0.set(key, value);
        }
    }
}

impl Telemetry {
    /// The count of request-log lines lost to a full buffer, for `new`.
    pub(crate) fn register_dropped_lines(reg: &Registrar) -> IntCounter {
        reg.counter("activator_request_log_dropped_total", "Request-log lines dropped because stdout did not keep up")
    }

    /// Everything off until `apply`; `dropped_lines` counts request-log lines lost to a full
    /// buffer.
    pub(crate) fn new(knative: KnativeMetrics, dropped_lines: IntCounter) -> Self {
        let propagator = TextMapCompositePropagator::new(vec![
            Box::new(TraceContextPropagator::new()),
            Box::new(BaggagePropagator::new()),
        ]);
        Telemetry {
            inner: Arc::new(Inner {
                tracer: tracer::SwitchTracer::off(),
                tracing: Arc::new(AtomicBool::new(false)),
                request_log: AtomicBool::new(false),
                access_log: AccessLog::new(dropped_lines),
                knative,
                propagator,
                applied: Mutex::new(None),
                pushing: Mutex::new(None),
                prometheus: std::sync::OnceLock::new(),
            }),
        }
    }

    /// What serves `/metrics` where `metrics-endpoint` says (set once, before any `apply` that
    /// could move it).
    pub(crate) fn serve_prometheus_with(&self, listener: Arc<dyn PrometheusListener>) {
        let _ = self.inner.prometheus.set(listener);
    }

    /// The tracing layer that turns our spans into OTLP spans while tracing is on. The pin-store
    /// span is only made inside a request's span, so background refreshes make no traces.
    ///
    /// The callsite filter is what keeps spans free while tracing is off: a per-layer filter
    /// that answers "sometimes" makes the registry create every span whose level passes, even
    /// ones all filters then refuse (hyper's and h2's trace spans cost a third of the CPU of a
    /// proxied h2c request that way). So callsites other than ours are never of interest, ours
    /// only while tracing is on (`apply` rebuilds the interest when that changes).
    fn layer<S>(&self) -> impl Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        let on = self.inner.tracing.clone();
        let on_at_callsite = self.inner.tracing.clone();
        let ours = DynFilterFn::new(move |meta, cx| {
            meta.target() == SPAN_TARGET
                && on.load(Ordering::Relaxed)
                && (meta.name() == "handle" || cx.lookup_current().is_some())
        })
        .with_callsite_filter(move |meta| {
            if meta.target() == SPAN_TARGET && on_at_callsite.load(Ordering::Relaxed) {
                Interest::sometimes()
            } else {
                Interest::never()
            }
        })
        .with_max_level_hint(LevelFilter::INFO);
        tracing_opentelemetry::layer().with_tracer(self.inner.tracer.clone()).with_filter(ours)
    }

    /// Everything the process traces to: log lines to `writer` through `filter` (JSON when
    /// `json`), and our spans to this telemetry's layer only, so log lines never format them.
    pub(crate) fn subscriber<W>(&self, json: bool, writer: W, filter: LogFilter) -> impl tracing::Subscriber + use<W>
    where
        W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
    {
        let logs = tracing_subscriber::fmt::layer().with_writer(writer);
        let logs = if json { logs.json().boxed() } else { logs.boxed() };
        tracing_subscriber::registry().with(logs.with_filter(filter)).with(self.layer())
    }

    /// Applies a configuration: the exporter, sampler and request log switch at once; requests
    /// already running finish under what they started with.
    pub(crate) fn apply(&self, config: &ObservabilityConfig) {
        let mut applied = lock(&self.inner.applied);
        if applied.as_ref() == Some(config) {
            return;
        }
        if applied.as_ref().map(|a| &a.tracing) != Some(&config.tracing) {
            match self.inner.tracer.switch(&config.tracing) {
                Ok(()) => {
                    let on = config.tracing.protocol != TracingProtocol::None;
                    self.inner.tracing.store(on, Ordering::Relaxed);
                    // Callsites that were off must be asked again.
                    tracing::callsite::rebuild_interest_cache();
                    // Off at start is the default, not news.
                    if on || applied.is_some() {
                        tracing::info!(tracing = %config.tracing, "trace export changed");
                    }
                }
                Err(e) => tracing::warn!(error = %e, tracing = %config.tracing, "trace export not changed"),
            }
        }
        if applied.as_ref().map(|a| &a.request_log_template) != Some(&config.request_log_template) {
            match config.request_log_template.as_deref().map(template::Template::parse).transpose() {
                Ok(template) => self.inner.access_log.set_template(template),
                Err(problem) => tracing::warn!(
                    template = config.request_log_template.as_deref(),
                    %problem,
                    "refusing logging.request-log-template; the previous one stays"
                ),
            }
        }
        self.inner.request_log.store(config.request_log, Ordering::Relaxed);
        self.inner.knative.set_exported(config.metrics_protocol == MetricsProtocol::Prometheus);
        let push =
            |c: &ObservabilityConfig| (c.metrics_protocol, c.metrics_endpoint.clone(), c.metrics_export_interval);
        if applied.as_ref().map(push) != Some(push(config)) {
            self.push_metrics(config);
        }
        if applied.as_ref().map(|a| a.prometheus_listen) != Some(config.prometheus_listen)
            && let Some(listener) = self.inner.prometheus.get()
        {
            listener.listen_at(config.prometheus_listen);
        }
        *applied = Some(config.clone());
    }

    /// Starts (or stops) pushing upstream's metrics over OTLP as `config` says.
    fn push_metrics(&self, config: &ObservabilityConfig) {
        if let Some(previous) = lock(&self.inner.pushing).take() {
            previous.abort();
        }
        let destination = match (config.metrics_protocol, &config.metrics_endpoint) {
            (MetricsProtocol::Grpc, Some(endpoint)) => push::Destination::Grpc(endpoint.clone()),
            (MetricsProtocol::HttpProtobuf, Some(endpoint)) => push::Destination::http(endpoint),
            (MetricsProtocol::Grpc | MetricsProtocol::HttpProtobuf, None) => {
                return tracing::warn!(protocol = ?config.metrics_protocol, "metrics-protocol needs metrics-endpoint; not pushing");
            }
            (MetricsProtocol::None | MetricsProtocol::Prometheus, _) => return,
        };
        tracing::info!(?destination, interval = ?config.metrics_export_interval, "pushing upstream's metrics over OTLP");
        let task = push::run(self.inner.knative.clone(), destination, config.metrics_export_interval);
        *lock(&self.inner.pushing) = Some(tokio::spawn(task).abort_handle());
    }

    /// The request's server span, a child of the trace the request carries; disabled (and free)
    /// while tracing is off.
    pub(crate) fn server_span<B>(&self, req: &Request<B>, protocol: Protocol) -> Span {
        let span = tracing::info_span!(
            target: SPAN_TARGET,
            "handle",
            otel.kind = "server",
            otel.status_code = Empty,
            http.request.method = protocol.method(),
            network.protocol.version = protocol.version(),
            http.response.status_code = Empty,
            k8s.namespace.name = Empty,
            kn.service.name = Empty,
            kn.revision.name = Empty,
            activator.decision = Empty,
            activator.pin.source = Empty,
            activator.pod = Empty,
            activator.queued_seconds = Empty,
            activator.session = Empty,
            activator.flow = Empty,
        );
        if !span.is_disabled() {
            let parent = self.inner.propagator.extract(&HeaderExtractor(req.headers()));
            if parent.span().span_context().is_valid() {
                let _ = span.set_parent(parent);
            }
        }
        span
    }

    /// Replaces the trace context the pod receives with the request's span, so the pod's spans
    /// are its children. Leaves the headers alone while tracing is off.
    pub(crate) fn inject(&self, span: &Span, headers: &mut HeaderMap) {
        if span.is_disabled() {
            return;
        }
        self.inner.propagator.inject_context(&span.context(), &mut NonEmpty(HeaderInjector(headers)));
    }

    /// Whether `finish` has anything to do, so callers skip building an `Outcome` otherwise.
    pub(crate) fn wants_outcome(&self, span: &Span) -> bool {
        !span.is_disabled()
    }

    /// Records the outcome on the span.
    pub(crate) fn finish(&self, span: &Span, outcome: &Outcome<'_>) {
        if span.is_disabled() {
            return;
        }
        span.record("http.response.status_code", outcome.status);
        if outcome.status >= 500 {
            span.record("otel.status_code", "ERROR");
        }
        if let Some(r) = &outcome.routed {
            span.record("k8s.namespace.name", r.namespace);
            span.record("kn.service.name", r.service);
            span.record("kn.revision.name", r.revision);
            span.record("activator.decision", r.decision);
            span.record("activator.queued_seconds", r.queued.as_secs_f64());
            if let Some(source) = r.pin_source {
                span.record("activator.pin.source", source);
            }
            if let Some(pod) = r.pod {
                span.record("activator.pod", tracing::field::display(pod));
            }
            if let Some(session) = &r.session {
                span.record("activator.session", session.as_str());
            }
            if let Some(flow) = &r.flow {
                span.record("activator.flow", flow.as_str());
            }
        }
    }

    /// The request-log entry of a request that just arrived, while the log is on.
    pub(crate) fn log_entry<B>(
        &self,
        req: &Request<B>,
        protocol: Protocol,
        client: SocketAddr,
        span: &Span,
    ) -> Option<Box<Entry>> {
        if !self.inner.request_log.load(Ordering::Relaxed) {
            return None;
        }
        let trace_id = span.context().span().span_context().trace_id();
        let trace_id = (trace_id != opentelemetry::trace::TraceId::INVALID).then_some(trace_id);
        Some(Box::new(Entry::new(req, protocol, client, trace_id)))
    }

    /// Writes the line of a request answered at once, without reaching a revision.
    pub(crate) fn log_answered(&self, entry: &Entry, status: u16, size: u64, elapsed: Duration) {
        self.inner.access_log.write(entry, status, size, elapsed);
    }

    /// What to record once a routed request's response has ended.
    pub(crate) fn ending(&self, ending: Ending) -> Box<dyn Finished> {
        Box::new(Finishing { ending, telemetry: self.clone() })
    }
}

/// What is recorded when a routed request's response ends: upstream's server series (otelhttp
/// records after the handler returns, the response written), the request body size sent to the
/// pod, and the request-log line.
pub(crate) struct Ending {
    pub started: tokio::time::Instant,
    pub status: u16,
    pub server: ServerSeries,
    /// The body-size series of the exchange with the pod that answered.
    pub client_size: Option<Histogram>,
    pub request_bytes: Option<Arc<AtomicU64>>,
    pub log: Option<Box<Entry>>,
}

struct Finishing {
    ending: Ending,
    telemetry: Telemetry,
}

impl Finished for Finishing {
    fn finished(self: Box<Self>, sent: u64) {
        let Ending { started, status, server, client_size, request_bytes, log } = self.ending;
        let elapsed = started.elapsed();
        let received = request_bytes.map_or(0, |b| b.load(Ordering::Relaxed));
        server.record(elapsed, received, sent);
        if let Some(client_size) = client_size {
            client_size.observe(received as f64);
        }
        if let Some(entry) = log {
            self.telemetry.inner.access_log.write(&entry, status, sent, elapsed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instruments::Instruments;

    fn telemetry() -> Telemetry {
        let instruments = Instruments::register();
        Telemetry::new(instruments.stats.knative.clone(), instruments.request_log_dropped.clone())
    }

    fn handle_span() -> Span {
        tracing::info_span!(target: SPAN_TARGET, "handle")
    }

    fn dependency_trace_span() -> Span {
        tracing::trace_span!(target: "h2::proto::streams", "popped")
    }

    // One test, because the interest of a callsite is kept per process, across subscribers.
    #[tokio::test]
    async fn no_span_is_made_but_ours_while_tracing_is_on() {
        let telemetry = telemetry();
        let (filter, _level) = LogLevel::start();
        let _default = tracing::subscriber::set_default(telemetry.subscriber(true, std::io::sink, filter));

        assert!(handle_span().is_disabled(), "tracing is off: the request span must not be made");
        assert!(dependency_trace_span().is_disabled(), "a dependency's trace span must not be made");
        assert!(LevelFilter::current() <= LevelFilter::INFO, "trace callsites are refused before any filter runs");

        let mut on = ObservabilityConfig::default();
        on.tracing.protocol = TracingProtocol::HttpProtobuf;
        on.tracing.endpoint = Some("http://127.0.0.1:1/v1/traces".into());
        telemetry.apply(&on);
        assert!(!handle_span().is_disabled(), "tracing is on: the request span is made");
        assert!(dependency_trace_span().is_disabled(), "a dependency's trace span is still not made");

        telemetry.apply(&ObservabilityConfig::default());
        assert!(handle_span().is_disabled(), "tracing is off again");
    }
}
