//! autoscaler-shim: stands in for Knative's autoscaler where there is none. It serves Knative's
//! stat websocket protocol (so the activator needs no second code path), keeps per-revision
//! concurrency windows, decides each revision's scale, and actuates it through a backend.

mod kubernetes;
mod process;
mod scaler;
mod statserver;

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use contract::topology as file;
use contract::watched::WatchedFile;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::kubernetes::KubernetesBackend;
use crate::process::ProcessBackend;
use crate::scaler::{Policy, Scaler, desired};

#[derive(Parser, Debug)]
#[command(
    name = "autoscaler-shim",
    version,
    about = "Stat server and scaler standing in for Knative's autoscaler (clusters or laptops without Knative)",
    long_about = "Receives the activators' concurrency reports over Knative's websocket protocol (binary \
                  protobuf WireStatMessages), keeps a window of each revision's concurrency, decides its \
                  scale (target concurrency per pod, an immediate scale-up on a poke from zero, scale to \
                  zero after an idle grace period, min/max scale) and actuates it. The `process` backend \
                  starts and stops local processes (demo-service by default) and publishes their endpoints \
                  to the activator through --endpoints-file; the `kubernetes` backend patches the scale \
                  subresource of the Deployment behind each revision."
)]
struct Args {
    /// Stat websocket listener; the bound address is printed as `listening stats <addr>`. Point
    /// the activator's --autoscaler-url at ws://<addr>.
    #[arg(long, env = "SHIM_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// How the decided scale is actuated.
    #[arg(long, env = "SHIM_BACKEND", value_enum, default_value_t = Backend::Process)]
    backend: Backend,
    /// Where the process backend publishes endpoints (the activator's --endpoints-file).
    #[arg(long, env = "SHIM_ENDPOINTS_FILE")]
    endpoints_file: Option<PathBuf>,
    /// Command that starts one pod. `{listen}`, `{pod}`, `{revision}` and `{namespace}` are
    /// replaced; words are split on spaces. The pod must print `listening http <addr>`.
    /// Default: the demo-service next to this binary.
    #[arg(long, env = "SHIM_COMMAND")]
    command: Option<String>,
    /// Topology file. With it, the shim manages only the revisions listed there without
    /// endpoints of their own, and their annotations `autoscaling.knative.dev/min-scale`,
    /// `max-scale` and `target` override the defaults below. Without it, every revision the
    /// activators report is managed.
    #[arg(long, env = "SHIM_TOPOLOGY")]
    topology: Option<PathBuf>,
    /// Concurrent requests per pod.
    #[arg(long, env = "SHIM_TARGET", default_value_t = 10.0, value_parser = positive)]
    target: f64,
    #[arg(long, env = "SHIM_MIN_SCALE", default_value_t = 0)]
    min_scale: u32,
    /// 0 means no upper bound.
    #[arg(long, env = "SHIM_MAX_SCALE", default_value_t = 10)]
    max_scale: u32,
    /// Idle time before a revision scales to zero.
    #[arg(long, env = "SHIM_SCALE_TO_ZERO_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    scale_to_zero_grace: Duration,
    /// Window over which reported concurrency is averaged.
    #[arg(long, env = "SHIM_WINDOW", default_value = "6s", value_parser = nonzero_duration)]
    window: Duration,
    /// The Deployment behind a revision (`--backend kubernetes`) where the topology's
    /// `activator.knative.dev/deployment` does not name one: `{revision}` is replaced. Knative
    /// names it `{revision}-deployment`; in the activator's standalone mode the revision is the
    /// Deployment, `{revision}`.
    #[arg(long, env = "SHIM_DEPLOYMENT_NAME", default_value = "{revision}-deployment")]
    deployment_name: String,
    /// Print every decoded stat on stdout (`stat <ns>/<revision> pod=… concurrency=… requests=…`).
    #[arg(long, env = "SHIM_PRINT_STATS", value_parser = clap::builder::BoolishValueParser::new())]
    print_stats: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Backend {
    /// Local processes.
    Process,
    /// The scale subresource of the Deployment behind each revision.
    Kubernetes,
}

/// Where decided scales go.
enum Actuator {
    Process(ProcessBackend),
    Kubernetes(KubernetesBackend),
}

impl Actuator {
    /// The revision's replicas now; `None` when they cannot be known (nothing is decided then).
    async fn current(
        &mut self,
        namespace: &str,
        revision: &str,
        annotations: Option<&RevisionAnnotations>,
    ) -> Option<u32> {
        match self {
            Actuator::Process(b) => Some(b.current(namespace, revision)),
            Actuator::Kubernetes(b) => {
                let deployment = b.deployment_of(revision, annotations);
                b.current(namespace, revision, &deployment).await
            }
        }
    }

    /// A revision's annotations where no topology gives them: none for local processes, its
    /// Deployment's own for the kubernetes backend. `Err` when the Deployment cannot be read: its
    /// policy is unknown, and nothing is decided for it.
    async fn annotations(&self, namespace: &str, revision: &str) -> Result<Option<RevisionAnnotations>, ()> {
        match self {
            Actuator::Process(_) => Ok(None),
            Actuator::Kubernetes(b) => {
                b.annotations(namespace, &b.deployment_of(revision, None)).await.map(Some).ok_or(())
            }
        }
    }

    async fn scale(
        &mut self,
        namespace: &str,
        revision: &str,
        annotations: Option<&RevisionAnnotations>,
        replicas: u32,
    ) -> anyhow::Result<()> {
        match self {
            Actuator::Process(b) => b.scale(namespace, revision, replicas).await,
            Actuator::Kubernetes(b) => {
                let deployment = b.deployment_of(revision, annotations);
                b.scale(namespace, revision, &deployment, replicas).await
            }
        }
    }

    async fn shutdown(&mut self) {
        if let Actuator::Process(b) = self {
            b.shutdown().await;
        }
    }
}

pub(crate) type RevisionAnnotations = std::collections::BTreeMap<String, String>;

/// How often scales are re-decided (a poke from zero acts at once).
const TICK: Duration = Duration::from_secs(1);

/// A target of concurrent requests: a number above zero.
fn positive(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(n) if n > 0.0 && n.is_finite() => Ok(n),
        _ => Err(format!("{value:?} is not a number above zero")),
    }
}

/// A window: a duration above zero, such as 6s.
fn nonzero_duration(value: &str) -> Result<Duration, String> {
    match humantime::parse_duration(value) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("the window must be longer than zero".to_owned()),
        Err(e) => Err(format!("{value:?} is not a duration such as 6s: {e}")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    // JSON lines, as the activator logs, unless a person is watching the terminal.
    let logs = tracing_subscriber::fmt().with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        logs.init();
    } else {
        logs.json().init();
    }
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // As clap says a bad flag: one plain line.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.max_scale == 0 || args.min_scale <= args.max_scale,
        "--min-scale {} is above --max-scale {}",
        args.min_scale,
        args.max_scale
    );
    // A topology that cannot be read now is a mistake to say at once; later, a bad edit keeps
    // the revisions managed so far.
    let mut managed = args.topology.as_deref().map(Managed::open).transpose()?;
    let command = match &args.command {
        Some(command) => command.split_whitespace().map(str::to_owned).collect(),
        None => {
            let exe = std::env::current_exe().context("locating this binary")?;
            let demo = exe.with_file_name("demo-service").display().to_string();
            [demo.as_str(), "--listen", "{listen}", "--pod", "{pod}", "--revision", "{revision}"]
                .map(str::to_owned)
                .to_vec()
        }
    };
    let mut backend = match args.backend {
        Backend::Process => {
            let endpoints_file = args.endpoints_file.clone().context("the process backend needs --endpoints-file")?;
            Actuator::Process(ProcessBackend::new(command, endpoints_file)?)
        }
        Backend::Kubernetes => Actuator::Kubernetes(KubernetesBackend::connect(args.deployment_name.clone()).await?),
    };

    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    println!("listening stats {}", listener.local_addr()?);
    let (reports, mut incoming) = mpsc::channel(1024);
    tokio::spawn(statserver::serve(listener, reports, args.print_stats));

    let mut scaler = Scaler::new(args.window);
    let mut tick = tokio::time::interval(TICK);
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    loop {
        let woken: Vec<(String, String)> = tokio::select! {
            report = incoming.recv() => {
                let Some(report) = report else { break };
                let demand = scaler.record(&report, Instant::now());
                // A poke (or any demand) for a revision at zero scales it up at once.
                let annotations = managed.as_ref().and_then(|m| m.revisions.get(&(report.namespace.clone(), report.revision.clone())));
                if demand && backend.current(&report.namespace, &report.revision, annotations).await == Some(0) {
                    vec![(report.namespace, report.revision)]
                } else {
                    continue;
                }
            }
            _ = tick.tick() => {
                // Managed revisions nobody reported yet still get their min-scale and reserve.
                let mut revisions = scaler.revisions();
                if let Some(managed) = &managed {
                    revisions.extend(managed.revisions.keys().filter(|r| !revisions.contains(r)).cloned().collect::<Vec<_>>());
                }
                revisions
            }
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        if let Some(managed) = &mut managed {
            managed.refresh();
        }
        for (namespace, revision) in woken {
            let key = (namespace.clone(), revision.clone());
            let annotations = match &managed {
                Some(managed) => match managed.revisions.get(&key) {
                    Some(annotations) => Some(annotations.clone()),
                    None => continue,
                },
                None => match backend.annotations(&namespace, &revision).await {
                    Ok(annotations) => annotations,
                    Err(()) => continue,
                },
            };
            let annotations = annotations.as_ref();
            let policy = policy(&args, annotations);
            let (average, idle_for) = scaler.observe(&namespace, &revision, Instant::now());
            let Some(current) = backend.current(&namespace, &revision, annotations).await else { continue };
            let want = desired(&policy, current, average, idle_for);
            if want != current {
                tracing::info!(%namespace, %revision, current, want, average, "scaling");
                if let Err(e) = backend.scale(&namespace, &revision, annotations, want).await {
                    tracing::error!(%namespace, %revision, error = format!("{e:#}"), "scaling failed");
                }
            }
        }
    }
    backend.shutdown().await;
    Ok(())
}

/// The revisions the topology leaves to the shim (listed without endpoints of their own), with
/// their annotations (the service's overlaid by the revision's), re-read when the file changes.
struct Managed {
    file: WatchedFile,
    revisions: ManagedRevisions,
}

/// Each managed revision, by namespace and name, with its annotations.
type ManagedRevisions = std::collections::HashMap<(String, String), RevisionAnnotations>;

impl Managed {
    fn open(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading --topology {}", path.display()))?;
        let topology = file::parse(&text).with_context(|| format!("--topology {}", path.display()))?;
        Ok(Managed { file: WatchedFile::read_as(path, text), revisions: Self::revisions_of(&topology) })
    }

    /// Takes a changed topology; a file that does not parse leaves the revisions as they were.
    fn refresh(&mut self) {
        let Some(text) = self.file.changed() else { return };
        match file::parse(&text) {
            Ok(topology) => self.revisions = Self::revisions_of(&topology),
            Err(e) => {
                tracing::warn!(path = %self.file.path().display(), error = %e, "topology rejected; keeping the revisions managed so far");
            }
        }
    }

    /// The revisions `topology` lists without endpoints of their own, with their annotations.
    fn revisions_of(topology: &file::TopologyFile) -> ManagedRevisions {
        let spec = topology.to_spec(&file::EndpointsFile::new());
        spec.services
            .iter()
            .flat_map(|svc| {
                svc.revisions
                    .iter()
                    .filter(|r| r.backends.probed.is_empty() && r.backends.trusted.is_empty())
                    .map(move |r| ((svc.namespace.clone(), r.name.clone()), svc.annotations_of(r)))
            })
            .collect()
    }
}

/// A revision's policy: the flags, overridden by its annotations. A revision whose pods hold a
/// bounded number of sessions (`activator.knative.dev/sticky-sessions-per-pod`) targets that
/// many per pod unless `autoscaling.knative.dev/target` says otherwise: the activators report its
/// sessions (held and waiting) as its concurrency, so each pod's worth of sessions is a pod. Its
/// `sticky-session-reserve` is kept beyond them.
fn policy(args: &Args, annotations: Option<&RevisionAnnotations>) -> Policy {
    let get = |key: &str| annotations.and_then(|a| a.get(key)).map(|v| v.trim());
    let autoscaling = |key: &str| get(&format!("autoscaling.knative.dev/{key}"));
    let per_pod =
        get("activator.knative.dev/sticky-sessions-per-pod").and_then(|v| v.parse::<u32>().ok()).filter(|n| *n > 0);
    let reserve = per_pod.and(get("activator.knative.dev/sticky-session-reserve")).and_then(|v| v.parse().ok());
    let target = autoscaling("target").and_then(|v| v.parse().ok()).filter(|t: &f64| *t > 0.0);
    Policy {
        target: target.or(per_pod.map(f64::from)).unwrap_or(args.target),
        min_scale: autoscaling("min-scale").and_then(|v| v.parse().ok()).unwrap_or(args.min_scale),
        max_scale: autoscaling("max-scale").and_then(|v| v.parse().ok()).unwrap_or(args.max_scale),
        idle_grace: args.scale_to_zero_grace,
        reserve: reserve.unwrap_or(0),
    }
}
