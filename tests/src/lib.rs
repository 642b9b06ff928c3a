//! Test harness: starts the workspace's binaries as real processes on free loopback ports,
//! writes topology files the way an operator would (atomically), and waits on conditions with
//! deadlines instead of sleeping.
//!
//! Binaries are taken from the target directory this test was built into (run `cargo build
//! --bins` first; `just test` does), or from `AA_BIN_DIR`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tokio::time::Instant;

pub mod fixtures;
pub mod haproxy;
pub mod knative;
pub mod kube_api;
pub mod load;
pub mod otlp;
pub mod pki;
pub mod redis;
pub mod replicas;
pub mod standalone;
pub mod topology;

/// How long a process may take to print its listening addresses.
const START_DEADLINE: Duration = Duration::from_secs(30);

pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("AA_BIN_DIR") {
        return dir.into();
    }
    // Test binaries live in target/<profile>/deps, the demo binary in target/<profile>.
    let exe = std::env::current_exe().expect("own executable path");
    let dir = exe.parent().expect("executable has a directory");
    if dir.ends_with("deps") { dir.parent().unwrap_or(dir).to_owned() } else { dir.to_owned() }
}

/// `activator pins <args>`, as an operator runs it: whether it succeeded, what it printed, and
/// what it said on stderr.
pub async fn activator_pins(args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(bin_dir().join("activator"))
        .arg("pins")
        .args(args)
        .output()
        .await
        .expect("running activator pins");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// Polls `condition` until it holds, failing with `what` after `within`.
pub async fn wait_until<F, Fut>(within: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if condition().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A running process of one of our binaries; killed when dropped (after a SIGTERM and a
/// moment to exit when `graceful`).
pub struct Process {
    name: String,
    child: Child,
    graceful: bool,
    addrs: HashMap<String, SocketAddr>,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr_path: PathBuf,
}

impl Process {
    /// Starts `bin` and waits until it has printed `listening <name> <addr>` for each of
    /// `listeners`.
    pub async fn start(dir: &Path, bin: &str, args: &[String], listeners: &[&str]) -> anyhow::Result<Process> {
        Self::start_with_env(dir, bin, args, &[], listeners).await
    }

    /// `start`, with environment variables set.
    pub async fn start_with_env(
        dir: &Path,
        bin: &str,
        args: &[String],
        env: &[(&str, String)],
        listeners: &[&str],
    ) -> anyhow::Result<Process> {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{bin}-{seq}");
        let stderr_path = dir.join(format!("{name}.log"));
        let stderr = std::fs::File::create(&stderr_path)?;
        let mut child = Command::new(bin_dir().join(bin))
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {bin} from {}", bin_dir().display()))?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let printed = Arc::new(Notify::new());
        let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        {
            let (stdout, printed) = (stdout.clone(), printed.clone());
            tokio::spawn(async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    stdout.lock().unwrap().push(line);
                    printed.notify_waiters();
                }
                printed.notify_waiters();
            });
        }
        let mut process = Process { name, child, graceful: false, addrs: HashMap::new(), stdout, stderr_path };
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let notified = printed.notified();
            process.addrs = parse_listening(&process.stdout.lock().unwrap());
            if listeners.iter().all(|l| process.addrs.contains_key(*l)) {
                return Ok(process);
            }
            if let Some(status) = process.child.try_wait()? {
                bail!("{} exited with {status} before listening:\n{}", process.name, process.logs());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                bail!("{} did not print its listeners in time:\n{}", process.name, process.logs());
            }
        }
    }

    /// Everything the process has printed on stdout so far.
    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.addrs[listener]
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("process is running")
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid() as i32), signal).expect("signalling our own child");
    }

    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.expect("waiting for our own child"),
            Err(_) => panic!("{} did not exit within {within:?}:\n{}", self.name, self.logs()),
        }
    }

    /// Everything the process has written to stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Resident memory now and at its peak, in KiB.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("reading /proc");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if !self.graceful {
            return;
        }
        if let Some(pid) = self.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            for _ in 0..100 {
                if self.child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn parse_listening(lines: &[String]) -> HashMap<String, SocketAddr> {
    lines
        .iter()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("listening")).then_some(())?;
            Some((words.next()?.to_owned(), words.next()?.parse().ok()?))
        })
        .collect()
}

/// A scratch directory with the processes of one test.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

impl Env {
    pub fn new() -> Self {
        Env { dir: tempfile::tempdir().expect("creating a temp dir") }
    }

    pub fn topology_path(&self) -> PathBuf {
        self.dir.path().join("topology.yaml")
    }

    /// Replaces the topology file in one rename, as an operator's tooling would.
    pub fn write_topology(&self, yaml: &str) {
        let tmp = self.dir.path().join(".topology.yaml.tmp");
        std::fs::write(&tmp, yaml).expect("writing topology");
        std::fs::rename(&tmp, self.topology_path()).expect("renaming topology");
    }

    /// Writes a new topology and waits until `activator` has applied it.
    pub async fn reload(&self, activator: &Process, yaml: &str) {
        self.reload_all(&[activator], yaml).await;
    }

    /// Writes a new topology and waits until every one of `activators` has applied it.
    pub async fn reload_all(&self, activators: &[&Process], yaml: &str) {
        let applied = |activator: &Process| {
            let admin = activator.addr("admin");
            async move { metric(admin, "activator_topology_reloads_total", &[("result", "applied")]).await.unwrap_or(0.0) }
        };
        let mut before = Vec::new();
        for activator in activators {
            before.push(applied(activator).await);
        }
        self.write_topology(yaml);
        wait_until(Duration::from_secs(10), "the topology is applied", || async {
            for (activator, before) in activators.iter().zip(&before) {
                if applied(activator).await <= *before {
                    return false;
                }
            }
            true
        })
        .await;
    }

    /// The simplest world: one pod of revision `<name>-1`, the service `<name>` (at `<name>.test`)
    /// sending it all traffic, and an activator started with `flags`.
    pub async fn one_pod_service(&self, name: &str, flags: &[&str]) -> (Process, Process) {
        let revision = format!("{name}-1");
        let pod = self.demo("pod", &revision).await;
        let service = topology::Service::new(name).revision(&revision, 100, &[pod.addr("http")]);
        self.write_topology(&topology::yaml(&[service]));
        (pod, self.activator(flags).await)
    }

    pub async fn demo(&self, pod: &str, revision: &str) -> Process {
        self.demo_with(pod, revision, &[]).await
    }

    /// `n` pods of one revision, named `<revision>-pod-<i>`.
    pub async fn pods(&self, revision: &str, n: usize) -> Vec<Process> {
        let mut pods = Vec::with_capacity(n);
        for i in 0..n {
            pods.push(self.demo(&format!("{revision}-pod-{i}"), revision).await);
        }
        pods
    }

    pub async fn demo_with(&self, pod: &str, revision: &str, extra: &[&str]) -> Process {
        let mut args = strings(&["--listen", "127.0.0.1:0", "--pod", pod, "--revision", revision]);
        args.extend(strings(extra));
        Process::start(self.dir.path(), "demo-service", &args, &["http"]).await.expect("demo-service starts")
    }

    /// A pod brought back at the address it had, as a restarted container keeps its pod's IP.
    pub async fn demo_at(&self, pod: &str, revision: &str, addr: SocketAddr) -> Process {
        let args = strings(&["--listen", &addr.to_string(), "--pod", pod, "--revision", revision]);
        Process::start(self.dir.path(), "demo-service", &args, &["http"]).await.expect("demo-service starts")
    }

    pub fn endpoints_path(&self) -> PathBuf {
        self.dir.path().join("endpoints.yaml")
    }

    /// An autoscaler-shim with the process backend publishing to `endpoints_path`, stopped
    /// gracefully (with its pods) when dropped.
    pub async fn shim(&self, extra: &[&str]) -> Process {
        let mut args = strings(extra);
        if !extra.contains(&"--listen") {
            args.extend(strings(&["--listen", "127.0.0.1:0"]));
        }
        args.extend(strings(&["--endpoints-file", &self.endpoints_path().display().to_string()]));
        let mut shim =
            Process::start(self.dir.path(), "autoscaler-shim", &args, &["stats"]).await.expect("shim starts");
        shim.graceful = true;
        shim
    }

    /// An autoscaler-shim scaling Deployments through the API server `api` (`--backend
    /// kubernetes`), stopped gracefully when dropped.
    pub async fn kubernetes_shim(&self, api: &kube_api::ApiServer, extra: &[&str]) -> Process {
        let mut args = strings(&["--listen", "127.0.0.1:0", "--backend", "kubernetes"]);
        args.extend(strings(extra));
        let env = [("KUBECONFIG", api.kubeconfig(self.dir.path()).display().to_string())];
        let mut shim = Process::start_with_env(self.dir.path(), "autoscaler-shim", &args, &env, &["stats"])
            .await
            .expect("the shim starts with the kubernetes backend");
        shim.graceful = true;
        shim
    }

    /// An activator in standalone mode watching `api`, on loopback, with `extra` flags (which
    /// replace the defaults of the same name).
    pub async fn standalone_activator(&self, api: &kube_api::ApiServer, extra: &[&str]) -> Process {
        let mut flags = vec!["--mode", "standalone", "--listen-h2c", "127.0.0.1:0"];
        flags.extend_from_slice(extra);
        let env = [("KUBECONFIG", api.kubeconfig(self.dir.path()).display().to_string())];
        self.activator_with_env(&flags, &env).await
    }

    /// An activator reporting to `shim` and taking the endpoints it publishes.
    pub async fn activator_with_shim(&self, shim: &Process, extra: &[&str]) -> Process {
        let url = format!("ws://{}", shim.addr("stats"));
        let endpoints = self.endpoints_path().display().to_string();
        let mut args = vec!["--autoscaler-url", url.as_str(), "--endpoints-file", endpoints.as_str()];
        args.extend_from_slice(extra);
        self.activator(&args).await
    }

    /// An activator sharing pins through `redis`, with `--debug-headers`, once it is connected.
    pub async fn shared_activator(&self, redis: &redis::Redis) -> Process {
        self.shared_activator_with(redis, &[]).await
    }

    /// `shared_activator`, with `extra` flags.
    pub async fn shared_activator_with(&self, redis: &redis::Redis, extra: &[&str]) -> Process {
        let url = redis.url();
        let mut flags = vec!["--pin-store", "redis", "--redis-url", &url, "--debug-headers"];
        flags.extend_from_slice(extra);
        let activator = self.activator(&flags).await;
        wait_pin_store_up(activator.addr("admin")).await;
        activator
    }

    /// An activator in knative mode watching `api`, as upstream's Deployment starts it (POD_NAME,
    /// POD_IP, SYSTEM_NAMESPACE), on loopback, with a short drain for tests and `extra` flags.
    /// Flags in `extra` replace the defaults of the same name (`--listen [::1]:0` for IPv6).
    pub async fn knative_activator(&self, api: &kube_api::ApiServer, pod_ip: &str, extra: &[&str]) -> Process {
        self.knative_activator_with_env(api, pod_ip, extra, &[]).await
    }

    /// `knative_activator`, with more environment variables set.
    pub async fn knative_activator_with_env(
        &self,
        api: &kube_api::ApiServer,
        pod_ip: &str,
        extra: &[&str],
        more_env: &[(&str, String)],
    ) -> Process {
        let defaults = [
            ("--mode", "knative"),
            ("--listen", "127.0.0.1:0"),
            ("--listen-h2c", "127.0.0.1:0"),
            ("--listen-tls", "127.0.0.1:0"),
            ("--admin-listen", "127.0.0.1:0"),
            ("--drain-period", "1s"),
            ("--log-format", "json"),
        ];
        let args = with_defaults(extra, &defaults);
        let env = [
            ("KUBECONFIG", api.kubeconfig(self.dir.path()).display().to_string()),
            ("POD_NAME", format!("activator-{pod_ip}")),
            ("POD_IP", pod_ip.to_owned()),
            ("SYSTEM_NAMESPACE", knative::SYSTEM_NAMESPACE.to_owned()),
            // Spans leave at once when config-observability turns tracing on, not after 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "50".to_owned()),
            ("ACTIVATOR_REDIS_TIMEOUT", LOADED_MACHINE_REDIS_BUDGET.to_owned()),
        ];
        let env = [&env[..], more_env].concat();
        Process::start_with_env(self.dir.path(), "activator", &args, &env, &["proxy", "h2c", "admin"])
            .await
            .expect("the activator starts in knative mode")
    }

    /// An activator in local mode on the topology file, with a short drain for tests. Flags in
    /// `extra` replace the defaults of the same name.
    pub async fn activator(&self, extra: &[&str]) -> Process {
        self.activator_with_env(extra, &[]).await
    }

    /// `activator`, with environment variables set.
    pub async fn activator_with_env(&self, extra: &[&str], env: &[(&str, String)]) -> Process {
        let topology = self.topology_path().display().to_string();
        let defaults = [
            ("--mode", "local"),
            ("--listen", "127.0.0.1:0"),
            ("--admin-listen", "127.0.0.1:0"),
            ("--drain-period", "1s"),
            ("--log-format", "json"),
            ("--topology", topology.as_str()),
        ];
        let args = with_defaults(extra, &defaults);
        let mut env = env.to_vec();
        if !env.iter().any(|(name, _)| *name == "ACTIVATOR_REDIS_TIMEOUT") {
            env.push(("ACTIVATOR_REDIS_TIMEOUT", LOADED_MACHINE_REDIS_BUDGET.to_owned()));
        }
        Process::start_with_env(self.dir.path(), "activator", &args, &env, &["proxy", "admin"])
            .await
            .expect("activator starts")
    }
}

/// The Redis budget of the activators tests start, unless a test sets its own with
/// `--redis-timeout`. `just test` runs many test binaries at once on two cores, which can stall a
/// process for longer than the production budget of 25 ms; a stall counted as an outage would
/// change what a test about sharing observes. Tests of outages make Redis fail for seconds, which
/// this budget still tells apart.
const LOADED_MACHINE_REDIS_BUDGET: &str = "250ms";

/// `extra`, then each default flag `extra` does not name.
fn with_defaults(extra: &[&str], defaults: &[(&str, &str)]) -> Vec<String> {
    let mut args = strings(extra);
    for (flag, value) in defaults {
        if !extra.contains(flag) {
            args.extend(strings(&[flag, value]));
        }
    }
    args
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

/// A reply as the tests look at it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    pub fn pod(&self) -> &str {
        self.header("x-demo-pod")
    }

    pub fn revision(&self) -> &str {
        self.header("x-demo-revision")
    }
}

/// HTTP/1.1 client that sends requests to an activator with a chosen `Host`.
#[derive(Clone)]
pub struct Client {
    proxy: SocketAddr,
    http: reqwest::Client,
}

impl Client {
    pub fn new(proxy: SocketAddr) -> Self {
        let http = reqwest::Client::builder()
            .http1_only()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("building the test client");
        Client { proxy, http }
    }

    pub fn request(&self, method: reqwest::Method, host: &str, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("http://{}{path}", self.proxy)).header(reqwest::header::HOST, host)
    }

    pub async fn get(&self, host: &str, path: &str) -> Reply {
        self.send(self.request(reqwest::Method::GET, host, path)).await
    }

    pub async fn get_with(&self, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = self.request(reqwest::Method::GET, host, path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req).await
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Reply {
        self.try_send(req).await.expect("request reaches the activator")
    }

    pub async fn try_send(&self, req: reqwest::RequestBuilder) -> reqwest::Result<Reply> {
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.text().await?;
        Ok(Reply { status, headers, body })
    }
}

/// Plain GET of an admin endpoint, returning status and body.
pub async fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
        .get(format!("http://{admin}{path}"))
        .send()
        .await
        .expect("admin port answers");
    (resp.status().as_u16(), resp.text().await.unwrap_or_default())
}

/// One scrape of an admin port's `/metrics` (Prometheus text exposition).
pub struct Metrics(pub String);

impl Metrics {
    pub async fn scrape(admin: SocketAddr) -> Metrics {
        Metrics(admin_get(admin, "/metrics").await.1)
    }

    fn samples<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        self.0.lines().filter(move |l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
    }

    /// The value of the sample of `name` whose labels include `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples(name)
            .find(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// The sum of every sample of `name`, whatever its labels.
    pub fn sum(&self, name: &str) -> f64 {
        self.samples(name).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    }
}

impl std::fmt::Display for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One sample of the metrics an admin port serves now.
pub async fn metric(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    Metrics::scrape(admin).await.value(name, labels)
}

/// Waits until an activator reports its shared pin store answering.
pub async fn wait_pin_store_up(admin: SocketAddr) {
    wait_until(Duration::from_secs(30), "the activator shares pins through Redis", || async {
        metric(admin, "activator_pin_store_up", &[]).await == Some(1.0)
    })
    .await;
}

/// How many exchanges an activator has had with Redis on the request path (lookups, new pins,
/// re-pins), as it times each call once: round trips, whatever a script runs inside Redis.
pub async fn pin_store_round_trips(admin: SocketAddr) -> f64 {
    let text = Metrics::scrape(admin).await;
    let calls = |op| text.value("activator_pin_store_duration_seconds_count", &[("op", op)]).unwrap_or(0.0);
    calls("get") + calls("create") + calls("replace") + calls("claim")
}

/// The command that starts a demo-service pod, for `autoscaler-shim --command`, with `extra`
/// flags.
pub fn demo_command(extra: &str) -> String {
    let bin = bin_dir().join("demo-service");
    format!("{} --listen {{listen}} --pod {{pod}} --revision {{revision}} {extra}", bin.display())
}

/// Lets this process (and the processes it starts) hold as many sockets as the hard limit allows.
pub fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// A loopback address whose connections are refused, for as long as the returned socket lives:
/// the socket holds the port but never listens, so no other process (another test's pod or
/// activator) can start listening there meanwhile, as it could on a port merely found free.
pub fn refusing_addr() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("binding a loopback port");
    let addr = socket.local_addr().expect("the bound address");
    (socket, addr)
}

/// A loopback port free now, for a listener a process opens itself later on a port it is told
/// (another process could take it in between; tests use it only where the address must be named
/// before the listener exists).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    listener.local_addr().expect("the bound address").port()
}

/// The addresses demo pods listen on.
pub fn addrs(pods: &[Process]) -> Vec<SocketAddr> {
    pods.iter().map(|p| p.addr("http")).collect()
}

/// Sends raw bytes to `addr` and returns everything the peer sends until it closes the
/// connection (the request should say `Connection: close`), within `within`.
pub async fn raw_exchange(addr: SocketAddr, request: &str, within: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connecting");
        stream.write_all(request.as_bytes()).await.expect("sending");
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.expect("reading");
        String::from_utf8_lossy(&out).into_owned()
    };
    tokio::time::timeout(within, exchange).await.expect("the peer answers and closes in time")
}
