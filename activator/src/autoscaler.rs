//! Telling the autoscaler about demand, in Knative's protocol exactly: per-revision concurrency
//! from arrival to the end of the response (time spent queued included), an immediate one-message
//! poke on the first request of an untracked revision, a report every second with the
//! first-report adjustment, as protobuf `WireStatMessages` in binary websocket frames.
//!
//! The request path only touches atomics; a reporter task samples the in-flight counts
//! (`SAMPLE_PERIOD`) and averages them per report, and a sender task owns the connection. Stats
//! that cannot be sent are dropped and counted, never queued without bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use prometheus::{Gauge, IntCounter, IntGauge};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::backoff::Backoff;
use crate::health::Health;
use crate::metrics::Registrar;

/// Knative's stat messages, generated from `proto/stat.proto`.
pub(crate) use contract::wire;

const SAMPLE_PERIOD: Duration = Duration::from_millis(10);
const REPORT_PERIOD: Duration = Duration::from_secs(1);
/// Upstream pings every ~3.3 s and gives up on a connection silent for 10 s.
const PING_PERIOD: Duration = Duration::from_millis(3300);
const READ_DEADLINE: Duration = Duration::from_secs(10);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Frames waiting for the connection; more are dropped.
const FRAME_QUEUE: usize = 16;
/// A frame older than this misstates the present; it is dropped rather than sent late.
const FRAME_MAX_AGE: Duration = Duration::from_secs(2);

/// One revision's demand, shared by its requests and the reporter.
pub(crate) struct Concurrency {
    namespace: String,
    revision: String,
    in_flight: AtomicU64,
    arrivals: AtomicU64,
    /// Whether the reporter is reporting this revision; the first request that finds it
    /// untracked pokes the autoscaler.
    tracked: AtomicBool,
    /// Sessions waiting here for a seat (`sticky-sessions-per-pod`).
    seats_waiting: AtomicU64,
    /// Seats reported beside the waiting sessions: the seats held and the reserve, by the one
    /// replica that reports them for all.
    seats_reported: AtomicU64,
    /// Set while the revision's pods hold a bounded number of sessions: it then scales on seats.
    seated: AtomicBool,
    gauge: IntGauge,
    /// The concurrency of each report (upstream's `kn_revision_request_concurrency`).
    reported: Gauge,
}

impl Concurrency {
    /// `gauge` mirrors the in-flight count for Prometheus; `reported` shows each report's value.
    pub(crate) fn new(namespace: &str, revision: &str, gauge: IntGauge, reported: Gauge) -> Self {
        Concurrency {
            namespace: namespace.to_owned(),
            revision: revision.to_owned(),
            in_flight: AtomicU64::new(0),
            arrivals: AtomicU64::new(0),
            tracked: AtomicBool::new(false),
            seats_waiting: AtomicU64::new(0),
            seats_reported: AtomicU64::new(0),
            seated: AtomicBool::new(false),
            gauge,
            reported,
        }
    }
}

impl Concurrency {
    /// Counts a session waiting for a seat until the guard drops, unless `max` already wait.
    pub(crate) fn wait_for_seat(self: &Arc<Self>, max: usize) -> Option<SeatWait> {
        let max = u64::try_from(max).unwrap_or(u64::MAX);
        let counted =
            self.seats_waiting.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1));
        counted.is_ok().then(|| SeatWait(self.clone()))
    }

    /// Sessions waiting here for a seat.
    pub(crate) fn seats_waiting(&self) -> u64 {
        self.seats_waiting.load(Ordering::Acquire)
    }

    /// Counts a session this replica just seated among the seats it reports until the next census
    /// counts it: the session stops waiting now, and the autoscaler must not see a dip meanwhile
    /// (one replica's report may count it twice for that moment, never zero times).
    pub(crate) fn note_seated(&self) {
        self.seats_reported.fetch_add(1, Ordering::AcqRel);
    }

    /// Sets the seats this replica reports beside its waiting sessions (see `seats_reported`);
    /// `None` for a revision whose pods hold no bounded number of sessions (any more).
    pub(crate) fn set_seats_reported(&self, seats: Option<u64>) {
        self.seats_reported.store(seats.unwrap_or(0), Ordering::Release);
        self.seated.store(seats.is_some(), Ordering::Release);
    }

    /// Whether the revision scales on seats (see `set_seats_reported`).
    pub(crate) fn is_seated(&self) -> bool {
        self.seated.load(Ordering::Acquire)
    }

    /// What the autoscaler is told now: the requests in flight; for a revision whose pods hold a
    /// bounded number of sessions, the seats wanted instead (the requests of seated sessions are
    /// theirs already, and the replica holding the lease reports every held seat once).
    fn demand(&self) -> u64 {
        let seats = self.seats_waiting.load(Ordering::Relaxed) + self.seats_reported.load(Ordering::Relaxed);
        if self.seated.load(Ordering::Relaxed) { seats } else { self.in_flight.load(Ordering::Relaxed).max(seats) }
    }
}

/// A session counted as waiting for a seat until dropped.
pub(crate) struct SeatWait(Arc<Concurrency>);

impl Drop for SeatWait {
    fn drop(&mut self) {
        self.0.seats_waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request counted in its revision's concurrency until dropped.
pub(crate) struct InFlight(Arc<Concurrency>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.gauge.dec();
    }
}

#[derive(Clone)]
pub(crate) struct ReporterConfig {
    /// `ws://autoscaler.knative-serving.svc.cluster.local:8080` in a cluster.
    pub url: String,
    /// This activator's pod name, reported as the stat's `pod_name`.
    pub pod_name: String,
}

/// The request path's handle on the reporter.
#[derive(Clone)]
pub(crate) struct Reporter {
    pokes: mpsc::UnboundedSender<Arc<Concurrency>>,
}

impl Reporter {
    /// Starts reporting to the autoscaler at `config.url`; without one, each revision's report is
    /// only published as its concurrency gauge. `health` reports unready while the connection is
    /// down, as upstream does.
    pub(crate) fn start(config: Option<ReporterConfig>, health: Arc<Health>, metrics: ReporterMetrics) -> Self {
        let (pokes, poked) = mpsc::unbounded_channel();
        let pod_name = config.as_ref().map(|c| c.pod_name.clone()).unwrap_or_default();
        let frames = config.map(|config| {
            let (frames, outbox) = mpsc::channel(FRAME_QUEUE);
            health.require_autoscaler();
            let sender = Sender { url: config.url, health, metrics: metrics.clone() };
            tokio::spawn(sender.run(outbox));
            frames
        });
        let outbox = Outbox { frames, dropped: metrics.dropped, pokes: metrics.pokes };
        tokio::spawn(report_loop(pod_name, poked, outbox));
        Reporter { pokes }
    }

    /// Moves a request counted for one revision to `to` (it lost a pin race and goes to the
    /// winner's revision): the first no longer counts it, neither in flight nor as an arrival
    /// not yet reported.
    pub(crate) fn redirect(&self, in_flight: InFlight, to: &Arc<Concurrency>) -> InFlight {
        let _ = in_flight.0.arrivals.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        drop(in_flight);
        self.arrive(to)
    }

    /// Reports `revision` from now on if it is not reported yet (seats held with no request in
    /// flight are demand too), poking the autoscaler as a first request would.
    pub(crate) fn track(&self, revision: &Arc<Concurrency>) {
        if !revision.tracked.swap(true, Ordering::AcqRel) {
            let _ = self.pokes.send(revision.clone());
        }
    }

    /// Counts a request that just arrived for `revision`; keep the guard until its response ends.
    pub(crate) fn arrive(&self, revision: &Arc<Concurrency>) -> InFlight {
        revision.in_flight.fetch_add(1, Ordering::Relaxed);
        revision.arrivals.fetch_add(1, Ordering::Relaxed);
        revision.gauge.inc();
        if !revision.tracked.swap(true, Ordering::AcqRel) {
            // Fails only once the reporter is gone, at shutdown.
            let _ = self.pokes.send(revision.clone());
        }
        InFlight(revision.clone())
    }
}

#[derive(Clone)]
pub(crate) struct ReporterMetrics {
    /// Ours and upstream's `kn_activator_stats_conn_reachable`.
    pub connected: [IntGauge; 2],
    /// Upstream's `kn_activator_stats_conn_errors_total`: failed connections and sends.
    pub errors: IntCounter,
    pub dropped: IntCounter,
    pub pokes: IntCounter,
    pub frames: IntCounter,
}

impl ReporterMetrics {
    /// Ours, registered in `reg`, beside upstream's `reachable` and `errors` series.
    pub(crate) fn register(reg: &Registrar, reachable: IntGauge, errors: IntCounter) -> Self {
        ReporterMetrics {
            connected: [
                reg.gauge("activator_autoscaler_connected", "1 while the stat websocket to the autoscaler is up"),
                reachable,
            ],
            errors,
            dropped: reg.counter(
                "activator_autoscaler_stats_dropped_total",
                "Stat frames dropped because the autoscaler was unreachable or the frame went stale",
            ),
            pokes: reg.counter(
                "activator_autoscaler_pokes_total",
                "Immediate stats sent for the first request of an untracked revision",
            ),
            frames: reg.counter("activator_autoscaler_frames_total", "Stat frames sent to the autoscaler"),
        }
    }
}

struct Tracked {
    revision: Arc<Concurrency>,
    sum: u64,
    samples: u64,
    /// The poke already counted one request: the first report subtracts it.
    first: bool,
}

struct Outbox {
    /// `None` without an autoscaler.
    frames: Option<mpsc::Sender<(Instant, Vec<u8>)>>,
    dropped: IntCounter,
    pokes: IntCounter,
}

impl Outbox {
    fn send(&self, messages: Vec<wire::WireStatMessage>) {
        let Some(frames) = &self.frames else { return };
        let frame = wire::WireStatMessages { messages }.encode_to_vec();
        if frames.try_send((Instant::now(), frame)).is_err() {
            self.dropped.inc();
        }
    }
}

fn message(revision: &Concurrency, pod_name: &str, concurrency: f64, requests: f64) -> wire::WireStatMessage {
    wire::WireStatMessage {
        namespace: revision.namespace.clone(),
        name: revision.revision.clone(),
        stat: Some(wire::Stat {
            pod_name: pod_name.to_owned(),
            average_concurrent_requests: concurrency,
            request_count: requests,
            ..Default::default()
        }),
    }
}

async fn report_loop(pod_name: String, mut poked: mpsc::UnboundedReceiver<Arc<Concurrency>>, outbox: Outbox) {
    let mut tracked: Vec<Tracked> = Vec::new();
    let mut sample = tokio::time::interval(SAMPLE_PERIOD);
    let mut report = tokio::time::interval(REPORT_PERIOD);
    sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            revision = poked.recv() => {
                let Some(revision) = revision else { return };
                // The autoscaler scales a revision at zero at once on a message with concurrency.
                if outbox.frames.is_some() {
                    outbox.send(vec![message(&revision, &pod_name, 1.0, 1.0)]);
                    outbox.pokes.inc();
                }
                if !tracked.iter().any(|t| Arc::ptr_eq(&t.revision, &revision)) {
                    tracked.push(Tracked { revision, sum: 0, samples: 0, first: true });
                }
            }
            _ = sample.tick() => {
                for t in &mut tracked {
                    t.sum += t.revision.demand();
                    t.samples += 1;
                }
            }
            _ = report.tick() => {
                if tracked.is_empty() {
                    continue;
                }
                let mut messages = Vec::with_capacity(tracked.len());
                tracked.retain_mut(|t| {
                    let average = if t.samples == 0 { 0.0 } else { t.sum as f64 / t.samples as f64 };
                    let arrived = t.revision.arrivals.swap(0, Ordering::Relaxed) as f64;
                    let adjust = if std::mem::take(&mut t.first) { 1.0 } else { 0.0 };
                    (t.sum, t.samples) = (0, 0);
                    let concurrency = (average - adjust).max(0.0);
                    t.revision.reported.set(concurrency);
                    messages.push(message(&t.revision, &pod_name, concurrency, (arrived - adjust).max(0.0)));
                    keep_tracking(&t.revision, average, arrived)
                });
                outbox.send(messages);
            }
        }
    }
}

/// An idle revision gets its final zero report and is dropped, so its next request pokes again;
/// unless a request raced in and did not poke because it found the revision still tracked.
fn keep_tracking(revision: &Concurrency, average: f64, arrived: f64) -> bool {
    if average > 0.0 || arrived > 0.0 {
        return true;
    }
    revision.tracked.store(false, Ordering::Release);
    let raced = revision.in_flight.load(Ordering::Acquire) > 0 || revision.arrivals.load(Ordering::Acquire) > 0;
    // If a request already flipped `tracked` back, it poked and the poke re-adds the revision.
    raced && !revision.tracked.swap(true, Ordering::AcqRel)
}

struct Sender {
    url: String,
    health: Arc<Health>,
    metrics: ReporterMetrics,
}

impl Sender {
    async fn run(self, mut outbox: mpsc::Receiver<(Instant, Vec<u8>)>) {
        let mut backoff = Backoff::default();
        let mut reported_down = false;
        loop {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_tungstenite::connect_async(self.url.as_str())).await {
                Ok(Ok((socket, _))) => {
                    backoff.reset();
                    reported_down = false;
                    self.up(true);
                    tracing::info!(url = %self.url, "connected to the autoscaler");
                    let outcome = self.serve(socket, &mut outbox).await;
                    self.up(false);
                    match outcome {
                        Some(reason) => {
                            self.metrics.errors.inc();
                            tracing::warn!(url = %self.url, %reason, "autoscaler connection lost; reconnecting")
                        }
                        None => return,
                    }
                }
                outcome => {
                    self.metrics.errors.inc();
                    if !reported_down {
                        let reason = match outcome {
                            Ok(Err(e)) => e.to_string(),
                            _ => format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
                        };
                        tracing::warn!(url = %self.url, %reason, "autoscaler unreachable; stats are dropped until it answers");
                        reported_down = true;
                    }
                }
            }
            // Stats made while disconnected are stale by the time a connection exists.
            while outbox.try_recv().is_ok() {
                self.metrics.dropped.inc();
            }
            tokio::time::sleep(backoff.next_pause()).await;
        }
    }

    fn up(&self, connected: bool) {
        self.health.set_autoscaler_connected(connected);
        self.metrics.connected.iter().for_each(|gauge| gauge.set(i64::from(connected)));
    }

    /// Sends frames and pings until the connection fails (`Some(reason)`) or the reporter is
    /// gone (`None`).
    async fn serve<S>(&self, socket: S, outbox: &mut mpsc::Receiver<(Instant, Vec<u8>)>) -> Option<String>
    where
        S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error>
            + futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
            + Unpin,
    {
        let (mut sink, mut incoming) = socket.split();
        let mut ping = tokio::time::interval(PING_PERIOD);
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                frame = outbox.recv() => {
                    let (made, frame) = frame?;
                    if made.elapsed() > FRAME_MAX_AGE {
                        self.metrics.dropped.inc();
                        continue;
                    }
                    if let Err(e) = sink.send(Message::Binary(frame.into())).await {
                        self.metrics.dropped.inc();
                        return Some(e.to_string());
                    }
                    self.metrics.frames.inc();
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > READ_DEADLINE {
                        return Some(format!("no answer to pings for {READ_DEADLINE:?}"));
                    }
                    if let Err(e) = sink.send(Message::Ping(Vec::new().into())).await {
                        return Some(e.to_string());
                    }
                }
                message = incoming.next() => match message {
                    Some(Ok(Message::Close(frame))) => return Some(format!("closed by the autoscaler: {frame:?}")),
                    Some(Ok(_)) => last_heard = Instant::now(),
                    Some(Err(e)) => return Some(e.to_string()),
                    None => return Some("connection closed".to_owned()),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A poke as upstream sends it, for revision `ns/rev` from pod `act`, derived by hand from
    /// Knative's field numbers (`pkg/autoscaler/metrics/stat.proto`):
    ///
    /// Stat: `0a 03 "act"` (1 pod_name, length-delimited), `11` + 1.0f64 LE (2
    /// average_concurrent_requests, 64-bit), `21` + 1.0f64 LE (4 request_count, 64-bit); zero
    /// fields are not written in proto3: 5 + 9 + 9 = 23 bytes.
    /// WireStatMessage: `0a 02 "ns"` (1 namespace), `12 03 "rev"` (2 name), `1a 17` + Stat (3):
    /// 4 + 5 + 25 = 34 bytes. WireStatMessages: `0a 22` + message (1, repeated).
    #[test]
    fn golden_bytes_match_knatives_field_numbers() {
        const ONE: [u8; 8] = [0, 0, 0, 0, 0, 0, 0xf0, 0x3f];
        let mut expected = vec![0x0a, 0x22, 0x0a, 0x02, b'n', b's', 0x12, 0x03, b'r', b'e', b'v', 0x1a, 0x17];
        expected.extend([0x0a, 0x03, b'a', b'c', b't', 0x11]);
        expected.extend(ONE);
        expected.push(0x21);
        expected.extend(ONE);

        let revision = Concurrency::new("ns", "rev", IntGauge::new("g", "g").unwrap(), Gauge::new("c", "c").unwrap());
        let frame = wire::WireStatMessages { messages: vec![message(&revision, "act", 1.0, 1.0)] }.encode_to_vec();
        assert_eq!(frame, expected);
        let decoded = wire::WireStatMessages::decode(&expected[..]).unwrap();
        let stat = decoded.messages[0].stat.as_ref().unwrap();
        assert_eq!((stat.average_concurrent_requests, stat.request_count, stat.timestamp), (1.0, 1.0, 0));
    }

    #[test]
    fn idle_revisions_stop_being_tracked_unless_a_request_raced_in() {
        let revision = Concurrency::new("ns", "rev", IntGauge::new("g", "g").unwrap(), Gauge::new("c", "c").unwrap());
        revision.tracked.store(true, Ordering::Relaxed);
        assert!(keep_tracking(&revision, 0.5, 0.0));
        assert!(!keep_tracking(&revision, 0.0, 0.0));
        assert!(!revision.tracked.load(Ordering::Relaxed), "the next request pokes");
        revision.in_flight.store(1, Ordering::Relaxed);
        assert!(keep_tracking(&revision, 0.0, 0.0), "a request that raced in keeps it tracked");
        assert!(revision.tracked.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn the_first_request_of_an_untracked_revision_pokes_once() {
        let (pokes, mut poked) = mpsc::unbounded_channel();
        let reporter = Reporter { pokes };
        let revision =
            Arc::new(Concurrency::new("ns", "rev", IntGauge::new("g", "g").unwrap(), Gauge::new("c", "c").unwrap()));
        let first = reporter.arrive(&revision);
        let second = reporter.arrive(&revision);
        assert!(poked.try_recv().is_ok());
        assert!(poked.try_recv().is_err(), "only the first request pokes");
        assert_eq!(revision.in_flight.load(Ordering::Relaxed), 2);
        drop((first, second));
        assert_eq!(revision.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(revision.gauge.get(), 0);
    }
}
