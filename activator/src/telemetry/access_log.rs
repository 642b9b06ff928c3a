//! The request log: one line per request on stdout once its response has ended, written by a task
//! of its own so a slow stdout never holds a request, and lines are dropped (and counted) rather
//! than queued without bound. Off by default (`--request-log`, `logging.enable-request-log`).
//!
//! A line is our JSON (no path or query, no raw ids), or, when `config-observability` gives a
//! `logging.request-log-template`, that template rendered over upstream's fields.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use http::Request;
use opentelemetry::trace::TraceId;
use prometheus::IntCounter;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::template::{Input, Template};
use crate::stats::knative::Protocol;

/// Lines waiting for stdout; more are dropped.
const BUFFERED_LINES: usize = 8192;

pub(crate) struct AccessLog {
    lines: std::sync::OnceLock<mpsc::Sender<Vec<u8>>>,
    dropped: IntCounter,
    template: ArcSwapOption<Template>,
}

/// What a line says of the request, taken when it arrives (only while the log is on).
pub(crate) struct Entry {
    protocol: Protocol,
    /// As the client sent it: the template's `.Request.Method` is never `_OTHER`.
    method: http::Method,
    request_uri: String,
    host: String,
    remote_addr: SocketAddr,
    content_length: i64,
    user_agent: String,
    referer: String,
    trace_id: String,
    routed: Option<Routed>,
}

/// Where a routed request went, owned so the line can be written when the response ends.
pub(crate) struct Routed {
    pub namespace: Arc<str>,
    pub service: Arc<str>,
    pub configuration: Arc<str>,
    pub revision: Arc<str>,
    pub decision: &'static str,
    pub pin_source: Option<&'static str>,
    pub pod: Option<SocketAddr>,
    pub queued: Duration,
    pub session: Option<String>,
    pub flow: Option<String>,
}

impl Entry {
    pub(crate) fn new<B>(req: &Request<B>, protocol: Protocol, client: SocketAddr, trace_id: Option<TraceId>) -> Entry {
        let header = |name: http::header::HeaderName| {
            req.headers().get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).unwrap_or_default()
        };
        let host = req.uri().authority().map(|a| a.as_str().to_owned()).unwrap_or_else(|| header(http::header::HOST));
        let declared = req.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok());
        Entry {
            protocol,
            method: req.method().clone(),
            request_uri: req.uri().path_and_query().map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
            host,
            remote_addr: client,
            // Go's ContentLength: -1 when a body comes without a declared length.
            content_length: declared.unwrap_or(if req.method() == http::Method::GET { 0 } else { -1 }),
            user_agent: header(http::header::USER_AGENT),
            referer: header(http::header::REFERER),
            trace_id: trace_id.map(|t| t.to_string()).unwrap_or_default(),
            routed: None,
        }
    }

    pub(crate) fn routed(&mut self, routed: Routed) {
        self.routed = Some(routed);
    }
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    method: &'static str,
    protocol: &'static str,
    status: u16,
    duration_ms: f64,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    revision: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    decision: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pin_source: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    queued_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    flow: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<&'a str>,
}

impl AccessLog {
    pub(crate) fn new(dropped: IntCounter) -> Self {
        AccessLog { lines: std::sync::OnceLock::new(), dropped, template: ArcSwapOption::empty() }
    }

    /// Lines follow `template` from now on; `None`: our JSON line.
    pub(crate) fn set_template(&self, template: Option<Template>) {
        self.template.store(template.map(Arc::new));
    }

    /// Writes the line of a request whose response has ended: `status`, `size` body bytes sent,
    /// `elapsed` since it arrived.
    pub(crate) fn write(&self, entry: &Entry, status: u16, size: u64, elapsed: Duration) {
        let bytes = match self.template.load().as_deref() {
            Some(template) => template.render(&entry.input(status, size, elapsed)).into_bytes(),
            None => entry.json(status, size, elapsed),
        };
        let lines = self.lines.get_or_init(start_writer);
        if lines.try_send(bytes).is_err() {
            self.dropped.inc();
        }
    }
}

impl Entry {
    fn json(&self, status: u16, size: u64, elapsed: Duration) -> Vec<u8> {
        let routed = self.routed.as_ref();
        let line = Line {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            method: self.protocol.method(),
            protocol: self.protocol.version(),
            status,
            duration_ms: elapsed.as_secs_f64() * 1000.0,
            size,
            namespace: routed.map(|r| &*r.namespace),
            service: routed.map(|r| &*r.service),
            revision: routed.map(|r| &*r.revision),
            decision: routed.map(|r| r.decision),
            pin_source: routed.and_then(|r| r.pin_source),
            pod: routed.and_then(|r| r.pod).map(|p| p.to_string()),
            queued_ms: routed.map(|r| r.queued.as_secs_f64() * 1000.0),
            session: routed.and_then(|r| r.session.as_deref()),
            flow: routed.and_then(|r| r.flow.as_deref()),
            trace_id: Some(self.trace_id.as_str()).filter(|t| !t.is_empty()),
        };
        let mut bytes = serde_json::to_vec(&line).expect("a line of strings and numbers serializes");
        bytes.push(b'\n');
        bytes
    }

    fn input(&self, code: u16, size: u64, elapsed: Duration) -> Input<'_> {
        let routed = self.routed.as_ref();
        let (path, raw_query) = self.request_uri.split_once('?').unwrap_or((&self.request_uri, ""));
        Input {
            method: self.method.as_str(),
            request_uri: &self.request_uri,
            path,
            raw_query,
            proto: self.protocol.proto(),
            host: &self.host,
            remote_addr: self.remote_addr.to_string(),
            content_length: self.content_length,
            user_agent: &self.user_agent,
            referer: &self.referer,
            code,
            size,
            latency: elapsed.as_secs_f64(),
            revision: routed.map_or("", |r| &r.revision),
            namespace: routed.map_or("", |r| &r.namespace),
            service: routed.map_or("", |r| &r.service),
            configuration: routed.map_or("", |r| &r.configuration),
            pod_name: "",
            pod_ip: "",
            trace_id: &self.trace_id,
        }
    }
}

/// The task that owns stdout for the request log; lines that arrive together are written with
/// one flush.
fn start_writer() -> mpsc::Sender<Vec<u8>> {
    let (lines, mut incoming) = mpsc::channel::<Vec<u8>>(BUFFERED_LINES);
    tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        let mut batch = Vec::new();
        while incoming.recv_many(&mut batch, 256).await > 0 {
            for line in batch.drain(..) {
                if stdout.write_all(&line).await.is_err() {
                    return;
                }
            }
            if stdout.flush().await.is_err() {
                return;
            }
        }
    });
    lines
}
