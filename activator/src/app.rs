//! The process: the command line, logging, the runtime, and the wiring of every part into a
//! serving activator (health, the world and its source, listeners, the pin store, the handler and
//! its background tasks) or an `activator pins` command. Owns no behaviour of its own beyond
//! starting and stopping; each part's doc says what it does.

use std::future::Future;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::affinity::{CookieKeys, share};
use crate::autoscaler::{Reporter, ReporterConfig, ReporterMetrics};
use crate::config::{Cli, Command, Config, LogFormat, Mode, PinStore};
use crate::deletion_cost::DeletionCost;
use crate::handler::Handler;
use crate::health::Health;
use crate::instruments::Instruments;
use crate::keys::KeyFile;
use crate::pins::{PinMetrics, Pins, SharedConfig};
use crate::readiness::{ProbeTiming, Prober};
use crate::seats::{Census, SeatMetrics};
use crate::server::{Limits, Listener, TlsServing};
use crate::session_end::SessionEndMetrics;
use crate::source::knative::{ConfigMapNames, KnativeConfig, KnativeSource};
use crate::source::local::LocalSource;
use crate::source::standalone::StandaloneSource;
use crate::stats::Stats;
use crate::telemetry::{LogLevel, ObservabilityConfig, Telemetry};
use crate::throttle::{QueueBudget, QueueLimits};
use crate::tls::{InternalTls, ServerSettings};
use crate::world::Publisher;
use crate::{admin, inspect, seats, server, session_end, socket, trim};
use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::task::TaskTracker;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The `activator` command: serves (in the mode `--mode` names) until told to stop, or runs an
/// `activator pins` command against the shared store.
pub fn main() -> ExitCode {
    let Cli { command, serve: config } = Cli::parse();
    let instruments = Instruments::register();
    let telemetry = Telemetry::new(instruments.stats.knative.clone(), instruments.request_log_dropped.clone());
    let log_level = init_logging(config.log_format, &telemetry);
    // rediss:// needs a TLS crypto provider; ring is the one compiled in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = config.worker_threads {
        runtime.worker_threads(n.get());
    }
    let result = runtime.enable_all().build().context("starting the runtime").and_then(|rt| {
        rt.block_on(async {
            match command {
                Some(Command::Pins { action, redis_url }) => {
                    inspect::run(action, redis_url, &config.redis_tls(), config.redis_deployment()).await
                }
                None => run(config, instruments, telemetry, log_level).await.map(|()| ExitCode::SUCCESS),
            }
        })
    });
    // What ends the process is said as clap says a bad flag: one plain line, for a person at a
    // terminal or reading `kubectl logs`, not a log record to parse.
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    })
}

/// Logs on stderr, and our spans to `telemetry`'s layer only: log lines never format them.
/// Returns what changes the log level later.
fn init_logging(format: LogFormat, telemetry: &Telemetry) -> LogLevel {
    let (filter, level) = LogLevel::start();
    let json = match format {
        LogFormat::Auto => !std::io::stderr().is_terminal(),
        LogFormat::Json => true,
        LogFormat::Text => false,
    };
    telemetry.subscriber(json, std::io::stderr, filter).init();
    level
}

/// Serves until SIGTERM (or Ctrl-C) and the drain end: health first, then the world and its
/// source, the listeners, the pin store, and the request handler with its background tasks.
async fn run(
    config: Config,
    instruments: Instruments,
    telemetry: Telemetry,
    log_level: LogLevel,
) -> anyhow::Result<()> {
    let Instruments {
        stats,
        decisions,
        pins,
        seats,
        deletion_cost,
        session_ends,
        reporter,
        kube,
        world,
        connections,
        handshakes_failed,
        ..
    } = instruments;
    let (pin_metrics, reporter_metrics, world_metrics) = (pins, reporter, world);
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let observability = ObservabilityConfig::from_env(|name| std::env::var(name).ok(), config.request_log, &mut |w| {
        tracing::warn!("{w}")
    });
    telemetry.apply(&observability);
    let health = Arc::new(Health::default());
    if config.mode.in_cluster() {
        // Unready until the watches have listed once, from the first probe on.
        health.require_sync();
    }
    let limits = connection_limits(&config);
    let cluster_domain = config.cluster_domain(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default());
    let reporter = start_reporter(&config, &cluster_domain, &health, reporter_metrics);
    let prober = Prober::start(ProbeTiming { period: config.probe_frequency, timeout: config.probe_timeout });
    let internal_tls = Arc::new(InternalTls::default());
    let queue = QueueLimits {
        max_waiting: config.max_queue,
        max_bytes: config.max_queue_bytes,
        total: Arc::new(QueueBudget::new(config.max_queue_total, config.max_queue_bytes_total)),
    };
    let publisher = Arc::new(
        Publisher::new(stats.clone(), world_metrics, queue, prober.clone()).with_internal_tls(internal_tls.clone()),
    );
    publisher.set_default_ids(config.default_ids);
    let world = publisher.world();
    if config.mode == Mode::Local {
        let path = config.topology.as_deref().context("--topology is required in local mode")?;
        let source = LocalSource::open(path, config.endpoints_file.as_deref(), publisher.clone())?;
        tokio::spawn(source.watch(config.topology_poll_interval));
    }
    // A person at a terminal (or running local mode) who presses Ctrl-C twice means now; a
    // kubelet's repeated SIGTERM in a cluster does not cut the drain short. Installed before
    // the listeners are announced, so no signal finds the default action.
    let second_signal_exits = !config.mode.in_cluster() || std::io::stdin().is_terminal();
    let stop_accepting = drain_on_signal(health.clone(), config.drain_period(), second_signal_exits)?;
    let listeners = bind_listeners(&config, &internal_tls, &health, &stats, &telemetry).await?;
    if config.mode == Mode::Knative {
        let knative = KnativeConfig {
            system_namespace: config.system_namespace.clone(),
            pod_ip: config.pod_ip,
            observability,
            config_maps: ConfigMapNames {
                logging: config.config_logging_name.clone(),
                observability: config.config_observability_name.clone(),
            },
            log_level,
            internal_tls,
            page_size: config.kube_page_size,
            default_ids: config.default_ids,
        };
        let source = KnativeSource::connect(
            knative,
            publisher,
            health.clone(),
            (kube, stats.knative.clone()),
            telemetry.clone(),
        )
        .await?;
        tokio::spawn(source.run());
    } else if config.mode == Mode::Standalone {
        let kube_metrics = (kube, stats.knative.clone());
        let source = StandaloneSource::connect(
            publisher,
            health.clone(),
            kube_metrics,
            cluster_domain.clone(),
            config.kube_page_size,
        )
        .await?;
        tokio::spawn(source.run());
    }
    let pins = open_pins(&config, pin_metrics)?;
    if config.pin_store() == PinStore::Redis {
        health.require_pin_store();
    }
    let handler = Arc::new(Handler {
        world,
        health,
        stats,
        pins,
        cookie_keys: CookieKeys::from_file(config.pin_cookie_keys.clone())?,
        reporter,
        prober,
        debug_headers: config.debug_headers,
        cluster_domain,
        decisions,
        handshakes_failed,
        telemetry,
        tunnels: TaskTracker::new(),
    });
    spawn_pin_tasks(&handler, &config, session_ends, seats)?;
    if config.pod_deletion_cost && config.mode.in_cluster() {
        let client = kube::Client::try_default().await.context("--pod-deletion-cost needs the Kubernetes API")?;
        let writer = DeletionCost { client, interval: config.pod_deletion_cost_interval, metrics: deletion_cost };
        let writing = handler.clone();
        tokio::spawn(async move { writer.run(writing.world.clone(), &writing.pins).await });
    }
    server::serve(listeners, handler, stop_accepting, config.grace_timeout, limits, connections).await;
    Ok(())
}

/// The bounds of client connections: as many as half the open files the process may hold (at
/// least 1024) unless `--max-connections` says otherwise.
fn connection_limits(config: &Config) -> Limits {
    let open_files = raise_open_files_limit();
    Limits {
        max_connections: config
            .max_connections
            .unwrap_or_else(|| usize::try_from(open_files / 2).unwrap_or(usize::MAX).max(1024)),
        send_timeout: config.send_timeout,
        idle_timeout: config.idle_timeout,
        header_read_timeout: config.header_read_timeout,
    }
}

/// Reports demand to the autoscaler, where there is one to report to.
fn start_reporter(config: &Config, cluster_domain: &str, health: &Arc<Health>, metrics: ReporterMetrics) -> Reporter {
    let autoscaler =
        config.autoscaler_url(cluster_domain).map(|url| ReporterConfig { url, pod_name: config.pod_name.clone() });
    Reporter::start(autoscaler, health.clone(), metrics)
}

/// Binds the data-plane listeners (plain, h2c, TLS) and the admin port, which starts serving at
/// once; prints each bound address.
async fn bind_listeners(
    config: &Config,
    internal_tls: &Arc<InternalTls>,
    health: &Arc<Health>,
    stats: &Stats,
    telemetry: &Telemetry,
) -> anyhow::Result<Vec<Listener>> {
    let addrs = config.listeners();
    let bind = |addr: SocketAddr| async move { socket::listen(addr).with_context(|| format!("binding {addr}")) };
    let mut listeners = Vec::new();
    for (name, addr, tls) in [("proxy", Some(addrs.proxy), false), ("h2c", addrs.h2c, false), ("tls", addrs.tls, true)]
    {
        let Some(addr) = addr else { continue };
        let socket = bind(addr).await?;
        println!("listening {name} {}", socket.local_addr()?);
        let tls = if tls {
            // Upstream refuses to start with settings it cannot use.
            let settings = ServerSettings::from_env(|name| std::env::var(name).ok()).map_err(anyhow::Error::msg)?;
            Some(TlsServing { tls: internal_tls.clone(), settings })
        } else {
            None
        };
        listeners.push(Listener { socket, tls });
    }
    let admin_listener = bind(addrs.admin).await?;
    println!("listening admin {}", admin_listener.local_addr()?);
    telemetry.serve_prometheus_with(Arc::new(admin::MovedMetrics::new(stats.clone(), admin_listener.local_addr()?)));
    tokio::spawn(admin::serve(admin_listener, health.clone(), stats.clone()));
    Ok(listeners)
}

/// Completes once SIGTERM (or Ctrl-C) came and the drain period passed: unready from the signal
/// on, still serving until then. With `second_signal_exits`, a second signal ends the process at
/// once, whatever is still open.
fn drain_on_signal(
    health: Arc<Health>,
    drain_period: Duration,
    second_signal_exits: bool,
) -> anyhow::Result<impl Future<Output = ()>> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
        health.start_draining();
        let period = humantime::format_duration(drain_period);
        if second_signal_exits {
            tracing::info!("draining for {period}, then finishing open requests; a second Ctrl-C exits now");
            tokio::spawn(async move {
                tokio::select! {
                    _ = sigterm.recv() => {}
                    _ = sigint.recv() => {}
                }
                eprintln!("second signal: exiting now");
                std::process::exit(130);
            });
        } else {
            tracing::info!("draining for {period}: unready now, still serving until it ends");
        }
        tokio::time::sleep(drain_period).await;
    })
}

/// The pin store `--pin-store` names.
fn open_pins(config: &Config, metrics: PinMetrics) -> anyhow::Result<Pins> {
    let pins = match config.pin_store() {
        PinStore::Memory => Pins::local(config.max_pins, metrics),
        PinStore::Redis => {
            let shared = SharedConfig {
                url: config.redis_url.clone().context("--pin-store redis needs --redis-url (or REDIS_URL)")?,
                timeout: config.redis_timeout,
                revalidate_after: config.pin_revalidate_after,
                refresh_interval: config.pin_refresh_interval,
                tls: config.redis_tls(),
                deployment: config.redis_deployment(),
            };
            Pins::shared(config.max_pins, shared, metrics)?
        }
    };
    Ok(pins)
}

/// The pin store's background work: upkeep, the seats' census, session ends, the split's count exchange (with
/// Redis), and readiness once the store was tried.
fn spawn_pin_tasks(
    handler: &Arc<Handler>,
    config: &Config,
    session_ends: SessionEndMetrics,
    seat_metrics: SeatMetrics,
) -> anyhow::Result<()> {
    tokio::spawn(maintain_pins(handler.clone()));
    let census = Census {
        world: handler.world.clone(),
        reporter: handler.reporter.clone(),
        metrics: seat_metrics,
        reserve_in_stats: config.mode == Mode::Knative,
    };
    let counting = handler.clone();
    tokio::spawn(async move { seats::census_loop(census, &counting.pins).await });
    let ending = handler.clone();
    let end_keys = KeyFile::from_file("--session-end-keys", config.session_end_keys.clone())?;
    tokio::spawn(async move { session_end::run(&ending.pins, session_ends, &ending.world, end_keys).await });
    if config.pin_store() == PinStore::Redis {
        let exchanging = handler.clone();
        let interval = config.pin_refresh_interval;
        tokio::spawn(async move { share::exchange_loop(&exchanging.world, &exchanging.pins, interval).await });
    }
    let tried = handler.clone();
    tokio::spawn(async move {
        tried.pins.first_attempt().await;
        tried.health.set_pin_store_tried();
    });
    Ok(())
}

/// Once a second: applies the pin store's pending evictions, publishes its size (and every few
/// seconds gives the pods their live session counts), re-reads the pin cookies' key file, and
/// returns memory a burst freed.
async fn maintain_pins(handler: Arc<Handler>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut trimmer = trim::Trimmer::default();
    loop {
        tick.tick().await;
        if let Some(counts) = handler.pins.maintain() {
            handler.world.load().set_session_counts(&counts);
        }
        handler.cookie_keys.reload();
        // What a burst of connections or queued requests freed goes back to the system.
        trimmer = tokio::task::spawn_blocking(move || {
            trimmer.tick();
            trimmer
        })
        .await
        .unwrap_or_default();
    }
}

/// A proxy holds two sockets per request; the usual soft limit of 1024 open files is too few.
/// Raise it to the hard limit, as Go's runtime does for upstream's activator. Returns the limit
/// in force.
fn raise_open_files_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return 1024 };
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            tracing::warn!(soft, hard, error = %e, "could not raise the open-files limit");
            return soft;
        }
        return hard;
    }
    soft
}
