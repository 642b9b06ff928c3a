//! The request log: one JSON line per request on stdout, written by a task of its own so a slow
//! stdout never holds a request, and lines are dropped (and counted) rather than queued without
//! bound. Off by default (`--request-log`, `logging.enable-request-log`).

use std::time::SystemTime;

use opentelemetry::trace::TraceId;
use prometheus::IntCounter;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::Outcome;

/// Lines waiting for stdout; more are dropped.
const BUFFERED_LINES: usize = 8192;

pub struct AccessLog {
    lines: std::sync::OnceLock<mpsc::Sender<Vec<u8>>>,
    dropped: IntCounter,
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    method: &'static str,
    protocol: &'static str,
    status: u16,
    duration_ms: f64,
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
    trace_id: Option<String>,
}

impl AccessLog {
    pub fn new(dropped: IntCounter) -> Self {
        AccessLog { lines: std::sync::OnceLock::new(), dropped }
    }

    pub fn write(&self, outcome: &Outcome<'_>, trace_id: Option<TraceId>) {
        let routed = outcome.routed.as_ref();
        let line = Line {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            method: outcome.protocol.method(),
            protocol: outcome.protocol.version(),
            status: outcome.status,
            duration_ms: outcome.elapsed.as_secs_f64() * 1000.0,
            namespace: routed.map(|r| r.namespace),
            service: routed.map(|r| r.service),
            revision: routed.map(|r| r.revision),
            decision: routed.map(|r| r.decision),
            pin_source: routed.and_then(|r| r.pin_source),
            pod: routed.and_then(|r| r.pod).map(|p| p.to_string()),
            queued_ms: routed.map(|r| r.queued.as_secs_f64() * 1000.0),
            session: routed.and_then(|r| r.session.as_deref()),
            flow: routed.and_then(|r| r.flow.as_deref()),
            trace_id: trace_id.map(|t| t.to_string()),
        };
        let mut bytes = serde_json::to_vec(&line).expect("a line of strings and numbers serializes");
        bytes.push(b'\n');
        let lines = self.lines.get_or_init(start_writer);
        if lines.try_send(bytes).is_err() {
            self.dropped.inc();
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
