//! Command line and environment: every flag of the activator has an `ACTIVATOR_*` variable (the
//! `activator pins` commands' flags have none). Must not act on the values; `app` wires them.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::pins::{Deployment, RedisTls};
use crate::throttle;

#[derive(Parser, Debug)]
#[command(
    name = "activator",
    version,
    about = "affinity-activator: Knative's activator with revision and session affinity",
    long_about = "Buffers requests while a revision scales from zero, routes by revision affinity, then \
                  session affinity, then the weighted traffic split, and forwards to a ready pod."
)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: Config,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Inspect or delete pins in the shared Redis pin table (keys are hashed, so `redis-cli`
    /// cannot find them by id).
    Pins {
        #[command(subcommand)]
        action: PinsAction,
        /// The Redis the activators share.
        #[arg(long, env = "REDIS_URL", global = true)]
        redis_url: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum PinsAction {
    /// Print the key, value and remaining TTL of one session's or flow's pin.
    Get(PinSelector),
    /// Print every pin of one service.
    List {
        #[arg(long, default_value = "default")]
        namespace: String,
        #[arg(long)]
        service: String,
    },
    /// Delete one pin; its session or flow is balanced anew on its next request.
    Delete(PinSelector),
    /// Move every session pinned to one pod to other pods of the same revision (as when the pod
    /// leaves), before the pod is scaled down: from an operator's shell or a pre-stop hook.
    Drain {
        #[arg(long, default_value = "default")]
        namespace: String,
        #[arg(long)]
        service: String,
        /// The pod's `ip:port`, as `activator pins list` shows it.
        #[arg(long)]
        pod: std::net::SocketAddr,
        /// The pods to move them to (`ip:port`, repeatable); by default the revision's other pods
        /// that hold pins, the least pinned first.
        #[arg(long)]
        to: Vec<std::net::SocketAddr>,
    },
}

#[derive(Args, Debug)]
pub(crate) struct PinSelector {
    #[arg(long, default_value = "default")]
    pub namespace: String,
    #[arg(long)]
    pub service: String,
    /// The session id, as the client sends it.
    #[arg(long, required_unless_present = "flow", conflicts_with = "flow")]
    pub session: Option<String>,
    /// The flow id, as the client sends it.
    #[arg(long)]
    pub flow: Option<String>,
}

#[derive(Args, Debug)]
pub(crate) struct Config {
    /// Where the world view comes from: `local` reads a topology file; `knative` watches a
    /// knative-serving install's Revisions, Routes, Services, Endpoints and ConfigMaps;
    /// `standalone` watches plain Services annotated with `activator.knative.dev/deployment`,
    /// their Deployments and EndpointSlices (both in the cluster with the pod's service account,
    /// or through KUBECONFIG).
    #[arg(long, env = "ACTIVATOR_MODE", value_enum, default_value_t = Mode::Local)]
    pub mode: Mode,

    /// Topology file (local mode). Re-read when it changes; a broken file is rejected and the
    /// last good topology keeps serving.
    #[arg(long, env = "ACTIVATOR_TOPOLOGY")]
    pub topology: Option<PathBuf>,

    /// Endpoints published by `autoscaler-shim --backend process` (local mode), added to the
    /// topology's; watched like the topology.
    #[arg(long, env = "ACTIVATOR_ENDPOINTS_FILE")]
    pub endpoints_file: Option<PathBuf>,

    /// Readiness probe of a new pod: how long one may take (upstream's PROBE_TIMEOUT).
    #[arg(long, env = "PROBE_TIMEOUT", default_value = "300ms", value_parser = humantime::parse_duration)]
    pub probe_timeout: Duration,

    /// How often pods that have not passed their readiness probe are probed (upstream's
    /// PROBE_FREQUENCY).
    #[arg(long, env = "PROBE_FREQUENCY", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub probe_frequency: Duration,

    /// How often the topology file is checked for changes.
    #[arg(long, env = "ACTIVATOR_TOPOLOGY_POLL_INTERVAL", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub topology_poll_interval: Duration,

    /// Data-plane listener (HTTP/1.1 and h2c). Port 0 picks a free port; the bound address is
    /// printed on stdout as `listening proxy <addr>`. Default: 127.0.0.1:8012, and [::]:8012 (every
    /// address, IPv4 and IPv6) in knative mode.
    #[arg(long, env = "ACTIVATOR_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// A second data-plane listener with the same handling, for h2c revisions (Knative's port
    /// 8013), printed as `listening h2c <addr>`. Default: none, and [::]:8013 in knative mode.
    #[arg(long, env = "ACTIVATOR_LISTEN_H2C")]
    pub listen_h2c: Option<SocketAddr>,

    /// The TLS data-plane listener of system-internal TLS (Knative's port 8112, with the same
    /// handling), printed as `listening tls <addr>`; it serves while `config-network` enables
    /// `system-internal-tls` and Secret `routing-serving-certs` holds a certificate. Default: none,
    /// and [::]:8112 in knative mode.
    #[arg(long, env = "ACTIVATOR_LISTEN_TLS")]
    pub listen_tls: Option<SocketAddr>,

    /// Admin listener (/metrics, /readyz, /livez), printed as `listening admin <addr>`. Default:
    /// 127.0.0.1:9090, and [::]:9090 in knative mode.
    #[arg(long, env = "ACTIVATOR_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,

    /// This pod's IP (knative mode), which places it among the activators a revision's public
    /// Endpoints list, for subsetting.
    #[arg(long, env = "POD_IP")]
    pub pod_ip: Option<std::net::IpAddr>,

    /// The namespace of knative-serving's ConfigMaps and autoscaler.
    #[arg(long, env = "SYSTEM_NAMESPACE", default_value = "knative-serving")]
    pub system_namespace: String,

    /// The ConfigMap (in the system namespace) whose `loglevel.activator` sets the log level
    /// live in knative mode, as upstream's.
    #[arg(long, env = "CONFIG_LOGGING_NAME", default_value = "config-logging")]
    pub config_logging_name: String,

    /// The ConfigMap (in the system namespace) that says what is exported (knative mode).
    #[arg(long, env = "CONFIG_OBSERVABILITY_NAME", default_value = "config-observability")]
    pub config_observability_name: String,

    /// Knative mode: objects per page when listing (client-go's default, 500).
    #[arg(long, env = "ACTIVATOR_KUBE_PAGE_SIZE", default_value_t = 500)]
    pub kube_page_size: u32,

    /// The cluster's DNS domain. Default: the `svc.<domain>` search domain of /etc/resolv.conf,
    /// else cluster.local.
    #[arg(long, env = "CLUSTER_DOMAIN")]
    pub cluster_domain: Option<String>,

    /// After SIGTERM (or Ctrl-C): how long to keep serving new requests while readiness reports
    /// unready, so load balancers stop sending. Unset: 45 s in Knative mode, as upstream; 1 s in
    /// local mode, where nothing balances onto the activator.
    #[arg(long, env = "ACTIVATOR_DRAIN_PERIOD", value_parser = humantime::parse_duration)]
    pub drain_period: Option<Duration>,

    /// After the drain period: how long open requests may take to finish before exiting. Unset:
    /// as long as they take, as upstream (the pod's terminationGracePeriodSeconds bounds it).
    #[arg(long, env = "ACTIVATOR_GRACE_TIMEOUT", value_parser = humantime::parse_duration)]
    pub grace_timeout: Option<Duration>,

    /// Client connections served at once; beyond it new connections wait in the listen backlog.
    /// Default: half the open-files limit (each connection may need a pod connection too).
    #[arg(long, env = "ACTIVATOR_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// How long a client may accept no byte of a response (a full socket buffer) before its
    /// connection is closed and the pod's slot freed, as nginx's `send_timeout`.
    #[arg(long, env = "ACTIVATOR_SEND_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub send_timeout: Duration,

    /// A client that has not sent a request's complete headers this long after it started them,
    /// or after it connected, is disconnected (upstream's `ReadHeaderTimeout`).
    #[arg(long, env = "ACTIVATOR_HEADER_READ_TIMEOUT", default_value = "1m", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,

    /// A client connection on which no request starts for this long is closed gracefully.
    #[arg(long, env = "ACTIVATOR_IDLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Requests that may wait for capacity (or for a first pod) in one revision; beyond it, 503
    /// with Retry-After.
    #[arg(long, env = "ACTIVATOR_MAX_QUEUE", default_value_t = throttle::DEFAULT_MAX_WAITING)]
    pub max_queue: usize,

    /// Body bytes the requests waiting in one revision may make the activator hold (what each
    /// connection reads ahead of a waiting request: at most 64 KiB for HTTP/1.1, the 1 MiB
    /// stream window for HTTP/2, and one 1 MiB connection window for all the waiting streams of
    /// an HTTP/2 connection together).
    #[arg(long, env = "ACTIVATOR_MAX_QUEUE_BYTES", default_value_t = throttle::DEFAULT_MAX_BYTES, value_parser = size)]
    pub max_queue_bytes: u64,

    /// Requests that may wait across all revisions.
    #[arg(long, env = "ACTIVATOR_MAX_QUEUE_TOTAL", default_value_t = throttle::DEFAULT_MAX_WAITING_TOTAL)]
    pub max_queue_total: u64,

    /// Body bytes the waiting requests of all revisions may hold.
    #[arg(long, env = "ACTIVATOR_MAX_QUEUE_BYTES_TOTAL", default_value_t = throttle::DEFAULT_MAX_BYTES_TOTAL, value_parser = size)]
    pub max_queue_bytes_total: u64,

    /// The autoscaler's stat websocket, e.g. an `autoscaler-shim`. Unset: in knative mode
    /// `ws://autoscaler.<SYSTEM_NAMESPACE>.svc.<cluster domain>:8080`; otherwise nobody is told
    /// about demand (and readiness does not depend on it).
    #[arg(long, env = "ACTIVATOR_AUTOSCALER_URL")]
    pub autoscaler_url: Option<String>,

    /// This activator's pod name in its stat reports.
    #[arg(long, env = "POD_NAME", default_value = "activator")]
    pub pod_name: String,

    /// Most pins this replica keeps in memory; the least recently used go first.
    #[arg(long, env = "ACTIVATOR_MAX_PINS", default_value_t = 1_000_000)]
    pub max_pins: u64,

    /// Where pins live: `memory` (this replica only) or `redis` (shared by every replica).
    /// Unset: `redis` when `--redis-url` is given, else `memory`.
    #[arg(long, env = "ACTIVATOR_PIN_STORE", value_enum)]
    pub pin_store: Option<PinStore>,

    /// The Redis the pins live in (and with it `--pin-store redis`):
    /// `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,

    /// `--redis-url` lists the seed nodes of a Redis Cluster, comma-separated.
    #[arg(long, env = "REDIS_CLUSTER", global = true, conflicts_with = "redis_sentinel_primary", value_parser = BoolishValueParser::new())]
    pub redis_cluster: bool,

    /// `--redis-url` lists Redis Sentinels, comma-separated, that watch the primary of this name
    /// (`sentinel monitor <name> …`); the pin store follows the primary when they fail it over.
    #[arg(long, env = "REDIS_SENTINEL_PRIMARY", global = true)]
    pub redis_sentinel_primary: Option<String>,

    /// PEM file of the certificate authorities that sign the Redis server's certificate, for a
    /// `rediss://` URL whose server a public CA does not vouch for (a managed or in-cluster Redis).
    #[arg(long, env = "REDIS_CA_FILE", global = true)]
    pub redis_ca_file: Option<PathBuf>,

    /// PEM certificate and key this activator presents to Redis when it requires client
    /// certificates (`tls-auth-clients yes`); both or neither.
    #[arg(long, env = "REDIS_CLIENT_CERT", requires = "redis_client_key", global = true)]
    pub redis_client_cert: Option<PathBuf>,
    #[arg(long, env = "REDIS_CLIENT_KEY", requires = "redis_client_cert", global = true)]
    pub redis_client_key: Option<PathBuf>,

    /// Budget for one Redis answer on the request path; slower answers count as failures and the
    /// request routes with this replica's pins.
    #[arg(long, env = "ACTIVATOR_REDIS_TIMEOUT", default_value = "25ms", value_parser = humantime::parse_duration)]
    pub redis_timeout: Duration,

    /// How long a pin confirmed by Redis is used without asking Redis again.
    #[arg(long, env = "ACTIVATOR_PIN_REVALIDATE_AFTER", default_value = "5s", value_parser = humantime::parse_duration)]
    pub pin_revalidate_after: Duration,

    /// How often pins in use get their idle TTL slid in Redis (one pipelined batch), which also
    /// revalidates them.
    #[arg(long, env = "ACTIVATOR_PIN_REFRESH_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub pin_refresh_interval: Duration,

    /// Pin-aware scale-down: keep each pod's `controller.kubernetes.io/pod-deletion-cost`
    /// annotation at its live sessions, so a ReplicaSet scaling down removes the pod with the
    /// fewest first (Knative and standalone modes; needs the optional RBAC rule to patch pods).
    #[arg(long, env = "ACTIVATOR_POD_DELETION_COST", default_value_t = false, action = clap::ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub pod_deletion_cost: bool,

    /// How often `--pod-deletion-cost` brings the annotations up to date (at most 50 pods a round).
    #[arg(long, env = "ACTIVATOR_POD_DELETION_COST_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub pod_deletion_cost_interval: Duration,

    /// Whether services read the default id headers `K-Session` and `K-Revision` unless their
    /// `sticky-default-ids` annotation says otherwise. In Knative mode the ConfigMap
    /// `config-affinity-activator`'s `default-ids` key, when set, wins over this.
    #[arg(long, env = "ACTIVATOR_DEFAULT_IDS", default_value_t = true, action = clap::ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub default_ids: bool,

    /// Add `X-Activator-Decision: session-pin | revision-pin | split | ingress | new-pin | re-pin |
    /// session-lost | spill` to responses.
    #[arg(long, env = "ACTIVATOR_DEBUG_HEADERS", value_parser = BoolishValueParser::new())]
    pub debug_headers: bool,

    /// Runtime worker threads; defaults to the number of CPUs. Set it to the pod's CPU limit.
    #[arg(long, env = "ACTIVATOR_WORKER_THREADS")]
    pub worker_threads: Option<NonZeroUsize>,

    /// Keys for signed pin cookies (`sticky-session-mode: signed-cookie`): a file, typically a
    /// mounted Secret, of one key (32 bytes or more) per line. The first signs, every one
    /// verifies; it is re-read within a second of changing, so keys rotate without a restart.
    #[arg(long, env = "ACTIVATOR_PIN_COOKIE_KEYS")]
    pub pin_cookie_keys: Option<PathBuf>,

    /// Keys that sign the calls telling a pod a session ended (`sticky-session-end-path`), so the
    /// pod can check they came from the activator: a file of one key (32 bytes or more) per line,
    /// the first signing; re-read within a second of changing. Without it the calls go unsigned.
    #[arg(long, env = "ACTIVATOR_SESSION_END_KEYS")]
    pub session_end_keys: Option<PathBuf>,

    /// One JSON line per request on stdout (no raw ids: hashed key prefixes at most). In Knative
    /// mode `config-observability`'s `logging.enable-request-log` overrides it live.
    #[arg(long, env = "ACTIVATOR_REQUEST_LOG", value_parser = BoolishValueParser::new())]
    pub request_log: bool,

    /// Log format: `auto` is JSON lines unless stderr is a terminal.
    #[arg(long, env = "ACTIVATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Mode {
    Local,
    Knative,
    Standalone,
}

impl Mode {
    /// Whether the activator runs in a cluster, its world read from the Kubernetes API.
    pub(crate) fn in_cluster(self) -> bool {
        self != Mode::Local
    }
}

/// Where each listener binds: what was asked, else the mode's default.
pub(crate) struct Listeners {
    pub proxy: SocketAddr,
    pub h2c: Option<SocketAddr>,
    pub tls: Option<SocketAddr>,
    pub admin: SocketAddr,
}

/// A size in bytes, with a unit or without: `65536`, `64KiB`, `64 MiB`, `1GB`.
pub(crate) fn size(value: &str) -> Result<u64, String> {
    value.trim().parse::<bytesize::ByteSize>().map(|s| s.as_u64()).map_err(|_| {
        format!("{value:?} is not a size: give bytes, or a number with a unit such as 64KiB, 64MiB or 1GB")
    })
}

impl Config {
    /// How long to drain after the first signal: as asked, else the mode's default.
    pub(crate) fn drain_period(&self) -> Duration {
        let default = match self.mode {
            Mode::Knative | Mode::Standalone => Duration::from_secs(45),
            Mode::Local => Duration::from_secs(1),
        };
        self.drain_period.unwrap_or(default)
    }

    /// The pin store: as `--pin-store` says, else Redis when a Redis is named.
    pub(crate) fn pin_store(&self) -> PinStore {
        self.pin_store.unwrap_or(if self.redis_url.is_some() { PinStore::Redis } else { PinStore::Memory })
    }

    /// Settings that do nothing as given, said once at start.
    pub(crate) fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.pin_store == Some(PinStore::Memory) && self.redis_url.is_some() {
            warnings.push("--redis-url is ignored: --pin-store memory keeps pins in this replica only".to_owned());
        }
        if self.pod_deletion_cost && self.mode == Mode::Local {
            warnings.push("--pod-deletion-cost is ignored in local mode: there are no Kubernetes pods".to_owned());
        }
        warnings
    }

    pub(crate) fn redis_deployment(&self) -> Deployment {
        match (&self.redis_sentinel_primary, self.redis_cluster) {
            (Some(primary), _) => Deployment::Sentinel { primary: primary.clone() },
            (None, true) => Deployment::Cluster,
            (None, false) => Deployment::Server,
        }
    }

    /// The TLS files for Redis the flags name.
    pub(crate) fn redis_tls(&self) -> RedisTls {
        RedisTls {
            ca_file: self.redis_ca_file.clone(),
            client_cert: self.redis_client_cert.clone().zip(self.redis_client_key.clone()),
        }
    }

    pub(crate) fn listeners(&self) -> Listeners {
        // In a cluster it binds every address of both families, as upstream's `:8012`: an
        // IPv6-only cluster's kubelet and ingress must reach it too.
        let any = std::net::IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED);
        let host = if self.mode.in_cluster() { any } else { std::net::Ipv4Addr::LOCALHOST.into() };
        Listeners {
            proxy: self.listen.unwrap_or(SocketAddr::from((host, 8012))),
            h2c: self.listen_h2c.or(self.mode.in_cluster().then(|| SocketAddr::from((any, 8013)))),
            tls: self.listen_tls.or((self.mode == Mode::Knative).then(|| SocketAddr::from((any, 8112)))),
            admin: self.admin_listen.unwrap_or(SocketAddr::from((host, 9090))),
        }
    }

    /// The cluster's DNS domain: as configured, else the `svc.<domain>` search domain of
    /// `resolv_conf`, else `cluster.local` (upstream's order).
    pub(crate) fn cluster_domain(&self, resolv_conf: &str) -> String {
        if let Some(domain) = self.cluster_domain.as_deref().filter(|d| !d.is_empty()) {
            return domain.trim_end_matches('.').to_owned();
        }
        let search = resolv_conf.lines().filter_map(|l| l.strip_prefix("search")).flat_map(str::split_whitespace);
        search.filter_map(|d| d.strip_prefix("svc.")).next().unwrap_or("cluster.local").trim_end_matches('.').to_owned()
    }

    /// The autoscaler's websocket: as configured, else knative-serving's in knative mode.
    pub(crate) fn autoscaler_url(&self, cluster_domain: &str) -> Option<String> {
        let knative = format!("ws://autoscaler.{}.svc.{cluster_domain}:8080", self.system_namespace);
        self.autoscaler_url.clone().or((self.mode == Mode::Knative).then_some(knative))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum PinStore {
    Memory,
    Redis,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    Auto,
    Json,
    Text,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["activator", "pins", "get", "--service", "s", "--session", "abc"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Pins { action: PinsAction::Get(_), .. })));
        assert!(Cli::try_parse_from(["activator", "pins", "get", "--service", "s"]).is_err(), "needs an id");
        let serve = Cli::try_parse_from(["activator", "--topology", "t.yaml", "--pin-store", "redis"]).unwrap();
        assert_eq!(serve.serve.pin_store(), PinStore::Redis);
    }

    #[test]
    fn a_redis_url_alone_chooses_the_redis_store_and_memory_with_one_says_so() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["activator"], args].concat()).unwrap().serve;
        assert_eq!(parse(&[]).pin_store(), PinStore::Memory);
        let url = parse(&["--redis-url", "redis://127.0.0.1:6379"]);
        assert_eq!((url.pin_store(), url.warnings().len()), (PinStore::Redis, 0));
        let both = parse(&["--redis-url", "redis://127.0.0.1:6379", "--pin-store", "memory"]);
        assert_eq!(both.pin_store(), PinStore::Memory);
        assert_eq!(both.warnings(), ["--redis-url is ignored: --pin-store memory keeps pins in this replica only"]);
    }

    #[test]
    fn sizes_take_units_and_switches_take_what_people_write() {
        assert_eq!(size("65536"), Ok(65536));
        assert_eq!(size("64KiB"), Ok(64 << 10));
        assert_eq!(size("64MiB"), Ok(64 << 20));
        assert_eq!(size("64 MiB"), Ok(64 << 20));
        assert_eq!(size("1GB"), Ok(1_000_000_000));
        assert!(size("lots").unwrap_err().contains("64MiB"));
        let parse = |args: &[&str]| Cli::try_parse_from([&["activator"], args].concat());
        assert_eq!(parse(&["--max-queue-bytes", "64MiB"]).unwrap().serve.max_queue_bytes, 64 << 20);
        assert!(parse(&["--worker-threads", "0"]).is_err());
        assert_eq!(parse(&["--worker-threads", "2"]).unwrap().serve.worker_threads.map(NonZeroUsize::get), Some(2));
    }

    #[test]
    fn knative_mode_listens_on_every_interface_and_finds_its_autoscaler() {
        let local = Cli::try_parse_from(["activator"]).unwrap().serve;
        let listeners = local.listeners();
        assert_eq!((listeners.proxy.to_string(), listeners.h2c), ("127.0.0.1:8012".to_owned(), None));
        assert_eq!(local.autoscaler_url("cluster.local"), None);
        let knative =
            Cli::try_parse_from(["activator", "--mode", "knative", "--system-namespace", "kn"]).unwrap().serve;
        let listeners = knative.listeners();
        assert_eq!(listeners.proxy.to_string(), "[::]:8012");
        assert_eq!(listeners.h2c.map(|a| a.to_string()).as_deref(), Some("[::]:8013"));
        assert_eq!(listeners.admin.to_string(), "[::]:9090");
        assert_eq!(listeners.tls.map(|a| a.to_string()).as_deref(), Some("[::]:8112"));
        let resolv =
            "nameserver 10.96.0.10\nsearch kn.svc.corp.example svc.corp.example corp.example\noptions ndots:5\n";
        let domain = knative.cluster_domain(resolv);
        assert_eq!(domain, "corp.example");
        assert_eq!(knative.autoscaler_url(&domain).as_deref(), Some("ws://autoscaler.kn.svc.corp.example:8080"));
        assert_eq!(knative.cluster_domain("nameserver 1.1.1.1\n"), "cluster.local");
    }
}
