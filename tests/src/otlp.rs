//! An OTLP receiver of ours: opentelemetry-proto's `ExportTraceServiceRequest` and
//! `ExportMetricsServiceRequest` over real HTTP (`POST /v1/traces`, `/v1/metrics`, protobuf) and
//! over gRPC (`TraceService/Export`, `MetricsService/Export` on h2c, on the same port), keeping
//! every span and metric it receives for tests to look at.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::metrics::v1::metric;
use prost::Message;
use tokio::net::TcpListener;

use crate::wait_until;

const GRPC_TRACES: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
const GRPC_METRICS: &str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";

/// One received metric: its name and unit, and the attributes of each of its points.
#[derive(Clone, Debug)]
pub struct Metric {
    pub name: String,
    pub unit: String,
    pub points: Vec<HashMap<String, String>>,
}

/// One received span, with ids in hex and attribute values as text.
#[derive(Clone, Debug)]
pub struct Span {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub attributes: HashMap<String, String>,
    pub service_name: String,
}

impl Span {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Default)]
struct Received {
    spans: Vec<Span>,
    metrics: Vec<Metric>,
    /// Export requests by protocol: `http` and `grpc`.
    requests: HashMap<&'static str, usize>,
}

pub struct Receiver {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding the OTLP receiver");
        let addr = listener.local_addr().expect("bound");
        let received = Arc::new(Mutex::new(Received::default()));
        let kept = received.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else { return };
                let received = kept.clone();
                let service = hyper::service::service_fn(move |req| {
                    let received = received.clone();
                    async move { Ok::<_, Infallible>(export(req, &received).await) }
                });
                tokio::spawn(async move {
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection(TokioIo::new(socket), service).await;
                });
            }
        });
        Receiver { addr, received, server }
    }

    /// For `OTEL_EXPORTER_OTLP_ENDPOINT` or `tracing-endpoint` with `grpc`.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The full traces URL, for `tracing-endpoint` with `http/protobuf`.
    pub fn http_endpoint(&self) -> String {
        format!("http://{}/v1/traces", self.addr)
    }

    /// The base URL, for `OTEL_EXPORTER_OTLP_ENDPOINT` with `http/protobuf`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<Span> {
        self.received.lock().unwrap().spans.clone()
    }

    pub fn metrics(&self) -> Vec<Metric> {
        self.received.lock().unwrap().metrics.clone()
    }

    /// Export requests received over `protocol` (`http` or `grpc`).
    pub fn requests(&self, protocol: &str) -> usize {
        self.received.lock().unwrap().requests.get(protocol).copied().unwrap_or(0)
    }

    /// The first span `matches` accepts, waiting for it up to `within`.
    pub async fn wait_for(&self, within: Duration, what: &str, matches: impl Fn(&Span) -> bool) -> Span {
        wait_until(within, what, || async { self.spans().iter().any(&matches) }).await;
        self.spans().into_iter().find(|s| matches(s)).expect("found above")
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

type Body = BoxBody<Bytes, Infallible>;

async fn export(req: Request<Incoming>, received: &Mutex<Received>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let grpc = path == GRPC_TRACES || path == GRPC_METRICS;
    let traces = path == GRPC_TRACES || path == "/v1/traces";
    if !traces && path != GRPC_METRICS && path != "/v1/metrics" {
        return status(404);
    }
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else { return status(400) };
    let Some(message) = (if grpc { unframe(body) } else { Some(body) }) else { return status(400) };
    let reply = if traces {
        let Ok(export) = ExportTraceServiceRequest::decode(message) else { return status(400) };
        received.lock().unwrap().spans.extend(flatten(export));
        ExportTraceServiceResponse::default().encode_to_vec()
    } else {
        let Ok(export) = ExportMetricsServiceRequest::decode(message) else { return status(400) };
        received.lock().unwrap().metrics.extend(metrics(export));
        ExportMetricsServiceResponse::default().encode_to_vec()
    };
    *received.lock().unwrap().requests.entry(if grpc { "grpc" } else { "http" }).or_default() += 1;
    if !grpc {
        let mut resp = Response::new(Full::new(Bytes::from(reply)).boxed());
        resp.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"));
        return resp;
    }
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(reply.len() as u32).to_be_bytes());
    framed.extend_from_slice(&reply);
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let frames = [Ok(Frame::data(Bytes::from(framed))), Ok(Frame::trailers(trailers))];
    let mut resp = Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
    resp.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    resp
}

/// A gRPC message without its five-byte prefix (uncompressed flag, big-endian length).
fn unframe(mut body: Bytes) -> Option<Bytes> {
    if body.len() < 5 || body[0] != 0 {
        return None;
    }
    body.advance(1);
    let len = body.get_u32() as usize;
    (body.len() == len).then_some(body)
}

fn status(code: u16) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::new()).boxed());
    *resp.status_mut() = http::StatusCode::from_u16(code).expect("a valid status");
    resp
}

fn flatten(export: ExportTraceServiceRequest) -> Vec<Span> {
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut out = Vec::new();
    for resource_spans in export.resource_spans {
        let resource = resource_spans.resource.map(|r| attributes(r.attributes)).unwrap_or_default();
        let service_name = resource.get("service.name").cloned().unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                out.push(Span {
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: attributes(span.attributes),
                    service_name: service_name.clone(),
                });
            }
        }
    }
    out
}

fn metrics(export: ExportMetricsServiceRequest) -> Vec<Metric> {
    let points = |data: Option<metric::Data>| -> Vec<HashMap<String, String>> {
        match data {
            Some(metric::Data::Gauge(g)) => g.data_points.into_iter().map(|p| attributes(p.attributes)).collect(),
            Some(metric::Data::Sum(s)) => s.data_points.into_iter().map(|p| attributes(p.attributes)).collect(),
            Some(metric::Data::Histogram(h)) => h.data_points.into_iter().map(|p| attributes(p.attributes)).collect(),
            _ => Vec::new(),
        }
    };
    export
        .resource_metrics
        .into_iter()
        .flat_map(|r| r.scope_metrics)
        .flat_map(|s| s.metrics)
        .map(|m| Metric { name: m.name, unit: m.unit, points: points(m.data) })
        .collect()
}

fn attributes(kvs: Vec<opentelemetry_proto::tonic::common::v1::KeyValue>) -> HashMap<String, String> {
    kvs.into_iter()
        .map(|kv| {
            let value = match kv.value.and_then(|v| v.value) {
                Some(Value::StringValue(s)) => s,
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key, value)
        })
        .collect()
}
