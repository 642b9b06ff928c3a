//! The tracer the tracing layer holds for the life of the process, whose exporter and sampler
//! can be replaced while requests run: `config-observability` changes them live.

use std::sync::Arc;

use arc_swap::ArcSwap;
use opentelemetry::trace::{SpanBuilder, TracerProvider as _};
use opentelemetry::{Context, trace};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::runtime::Tokio;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};

use super::config::{Tracing, TracingProtocol};

/// The instrumentation scope of our spans, as upstream names its own.
const SCOPE: &str = "knative.dev/serving/pkg/activator";

#[derive(Clone)]
pub(super) struct SwitchTracer {
    current: Arc<ArcSwap<(SdkTracerProvider, SdkTracer)>>,
}

impl SwitchTracer {
    /// Starts with a tracer that samples nothing and exports nowhere.
    pub(super) fn off() -> Self {
        SwitchTracer { current: Arc::new(ArcSwap::from_pointee(pair(off_provider()))) }
    }

    /// Exports as `config` says from now on; the previous exporter sends what it holds and stops.
    /// Must run inside the Tokio runtime, which exports.
    pub(super) fn switch(&self, config: &Tracing) -> anyhow::Result<()> {
        let provider = match config.protocol {
            TracingProtocol::None => off_provider(),
            protocol => exporting_provider(protocol, config)?,
        };
        let previous = self.current.swap(Arc::new(pair(provider)));
        // Flushing waits on the exporter; not on a runtime worker.
        tokio::task::spawn_blocking(move || {
            if let Err(e) = previous.0.shutdown() {
                tracing::debug!(error = %e, "the previous trace exporter did not stop cleanly");
            }
        });
        Ok(())
    }
}

fn pair(provider: SdkTracerProvider) -> (SdkTracerProvider, SdkTracer) {
    let tracer = provider.tracer(SCOPE);
    (provider, tracer)
}

fn off_provider() -> SdkTracerProvider {
    SdkTracerProvider::builder().with_sampler(Sampler::AlwaysOff).build()
}

fn exporting_provider(protocol: TracingProtocol, config: &Tracing) -> anyhow::Result<SdkTracerProvider> {
    let builder = opentelemetry_otlp::SpanExporter::builder();
    let exporter = match (protocol, &config.endpoint) {
        (TracingProtocol::Grpc, Some(endpoint)) => builder.with_tonic().with_endpoint(endpoint).build()?,
        (TracingProtocol::Grpc, None) => builder.with_tonic().build()?,
        (_, Some(endpoint)) => builder.with_http().with_endpoint(endpoint).build()?,
        (_, None) => builder.with_http().build()?,
    };
    let processor = BatchSpanProcessor::builder(exporter, Tokio).build();
    let ratio = Sampler::TraceIdRatioBased(config.sampling_rate);
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(Sampler::ParentBased(Box::new(ratio)))
        .with_resource(Resource::builder().with_service_name("activator").build())
        .build())
}

impl trace::Tracer for SwitchTracer {
    type Span = opentelemetry_sdk::trace::Span;

    fn build_with_context(&self, builder: SpanBuilder, parent_cx: &Context) -> Self::Span {
        self.current.load().1.build_with_context(builder, parent_cx)
    }
}
