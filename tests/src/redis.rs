//! A real `redis-server` on a free loopback port, that tests can kill and bring back on the same
//! port, and talk to with `redis-cli`; optionally behind a password and serving TLS only, with a
//! certificate authority made for the test.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

pub struct Redis {
    port: u16,
    log: std::path::PathBuf,
    child: Option<Child>,
    security: Security,
    /// Its part in a cluster, replication or Sentinel, as `redis-server` arguments; a
    /// configuration file among them comes first.
    role: Vec<String>,
}

/// How a test's Redis is secured.
#[derive(Clone, Default)]
pub struct Security {
    /// `requirepass`.
    pub password: Option<String>,
    /// Serve TLS only, with these files.
    pub tls: Option<Tls>,
}

/// A certificate authority and a server certificate for 127.0.0.1 it signed, as PEM files.
#[derive(Clone)]
pub struct Tls {
    pub ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Tls {
    /// Makes a new authority and server certificate in `dir`.
    pub fn generate(dir: &Path) -> Tls {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct names: a certificate whose subject is its issuer's looks self-signed to OpenSSL.
        ca_params.distinguished_name.push(DnType::CommonName, "affinity-activator test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("a CA key")).expect("a CA");
        let key = KeyPair::generate().expect("a server key");
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).expect("server parameters");
        params.distinguished_name.push(DnType::CommonName, "127.0.0.1");
        let cert = params.signed_by(&key, &ca).expect("a server certificate");
        let tls =
            Tls { ca: dir.join("redis-ca.pem"), cert: dir.join("redis-cert.pem"), key: dir.join("redis-key.pem") };
        for (path, pem) in [(&tls.ca, ca.pem()), (&tls.cert, cert.pem()), (&tls.key, key.serialize_pem())] {
            std::fs::write(path, pem).expect("writing a PEM file");
        }
        tls
    }
}

impl Redis {
    pub async fn start(dir: &Path) -> Redis {
        Self::start_secured(dir, Security::default()).await
    }

    pub async fn start_secured(dir: &Path, security: Security) -> Redis {
        Self::start_as(dir, security, Vec::new()).await
    }

    /// A server on a free port. The port is free when chosen, but another process may take it
    /// before the server binds it (an outgoing connection's ephemeral port): then another one.
    async fn start_as(dir: &Path, security: Security, role: Vec<String>) -> Redis {
        let mut tries = 0;
        loop {
            let port = free_port();
            let log = dir.join(format!("redis-{port}.log"));
            let mut redis = Redis { port, log, child: None, security: security.clone(), role: role.clone() };
            match redis.launch().await {
                Ok(()) => return redis,
                Err(log) if log.contains("Address already in use") && tries < 5 => tries += 1,
                Err(log) => panic!("redis-server does not answer PING; its log:\n{log}"),
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL an activator is given, with the password if there is one.
    pub fn url(&self) -> String {
        self.url_with_password(self.security.password.as_deref())
    }

    pub fn url_with_password(&self, password: Option<&str>) -> String {
        let scheme = if self.security.tls.is_some() { "rediss" } else { "redis" };
        let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
        format!("{scheme}://{auth}127.0.0.1:{}", self.port)
    }

    /// Starts the server (again, on the same port, empty) and waits until it answers.
    pub async fn restart(&mut self) {
        if let Err(log) = self.launch().await {
            panic!("redis-server does not answer PING; its log:\n{log}");
        }
    }

    /// Starts the server and waits until it answers; its log if it exits first or never answers.
    async fn launch(&mut self) -> Result<(), String> {
        let log = std::fs::File::create(&self.log).expect("redis log");
        let port = self.port.to_string();
        // A directory of its own for what a replica or a snapshot writes, never the working tree
        // (a role's own `--dir` comes later and wins).
        let dir = self.log.with_extension("dir");
        std::fs::create_dir_all(&dir).expect("a Redis directory");
        let dir = dir.to_str().expect("a UTF-8 temp path").to_owned();
        let mut secured: Vec<&str> = vec!["--dir", &dir];
        if let Some(password) = &self.security.password {
            secured.extend(["--requirepass", password]);
        }
        if let Some(tls) = &self.security.tls {
            let files = [&tls.cert, &tls.key, &tls.ca].map(|p| p.to_str().expect("a UTF-8 temp path"));
            secured.extend(["--port", "0", "--tls-port", &port, "--tls-auth-clients", "no"]);
            secured.extend(["--tls-cert-file", files[0], "--tls-key-file", files[1], "--tls-ca-cert-file", files[2]]);
        } else {
            secured.extend(["--port", &port]);
        }
        // Replicas sync at once rather than after the default 5 s wait for more of them.
        secured.extend(["--repl-diskless-sync-delay", "0"]);
        let (config_file, role): (Vec<&String>, Vec<&String>) = self.role.iter().partition(|a| a.ends_with(".conf"));
        secured.extend(role.iter().map(|a| a.as_str()));
        let child = Command::new("redis-server")
            .args(config_file)
            .args(secured)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--enable-debug-command", "local"])
            .stdout(log)
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is not installed: run `just deps` (Debian/Ubuntu: apt-get install redis-server)");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !self.answers().await {
            let exited = self.child.as_mut().is_some_and(|c| c.try_wait().is_ok_and(|status| status.is_some()));
            if exited || tokio::time::Instant::now() >= deadline {
                self.child = None;
                return Err(std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Kills the server outright, as a crash would.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("killing redis-server");
        }
    }

    /// Waits until this server is a primary, or a replica that finished its first sync: one
    /// that has not would not take over from its primary.
    async fn wait_synced(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let replication = self.cli(&["INFO", "replication"]).await;
            if replication.contains("role:master") || replication.contains("master_link_status:up") {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "replica {} never synced:\n{replication}", self.port);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn answers(&self) -> bool {
        match self.security {
            Security { password: None, tls: None } => ping(self.port).await,
            _ => self.cli(&["PING"]).await.trim() == "PONG",
        }
    }

    /// Runs `redis-cli` against this server (with its password and CA) and returns its output.
    pub async fn cli(&self, args: &[&str]) -> String {
        let mut secured: Vec<&str> = Vec::new();
        if let Some(password) = &self.security.password {
            secured.extend(["-a", password, "--no-auth-warning"]);
        }
        if let Some(tls) = &self.security.tls {
            secured.extend(["--tls", "--cacert", tls.ca.to_str().expect("a UTF-8 temp path")]);
        }
        let out = Command::new("redis-cli")
            .arg("-p")
            .arg(self.port.to_string())
            .args(secured)
            .args(args)
            .output()
            .await
            .expect("redis-cli is not installed: run `just deps` (Debian/Ubuntu: apt-get install redis-server)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Calls of one command so far (`INFO commandstats`).
    pub async fn calls(&self, command: &str) -> u64 {
        self.command_calls().await.get(command).copied().unwrap_or(0)
    }

    /// Calls of every command run so far, by lower-case name (`INFO commandstats`).
    pub async fn command_calls(&self) -> HashMap<String, u64> {
        parse_command_calls(&self.cli(&["INFO", "commandstats"]).await)
    }
}

/// `cmdstat_<name>:calls=<n>,…` lines of `INFO commandstats`.
pub fn parse_command_calls(info: &str) -> HashMap<String, u64> {
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(":calls=")?;
            Some((name.to_owned(), rest.split(',').next()?.parse().ok()?))
        })
        .collect()
}

async fn ping(port: u16) -> bool {
    let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)).await else { return false };
    let mut reply = [0u8; 7];
    conn.write_all(b"PING\r\n").await.is_ok() && conn.read_exact(&mut reply).await.is_ok() && &reply == b"+PONG\r\n"
}

/// A Redis Cluster of real processes on loopback: three primaries, each with one replica.
pub struct RedisCluster {
    nodes: Vec<Redis>,
}

impl RedisCluster {
    pub async fn start(dir: &Path) -> RedisCluster {
        let mut nodes = Vec::new();
        for i in 0..6 {
            let node_dir = dir.join(format!("cluster-node-{i}"));
            std::fs::create_dir_all(&node_dir).expect("a node directory");
            let node_dir = node_dir.to_str().expect("a UTF-8 temp path");
            let role = ["--cluster-enabled", "yes", "--cluster-node-timeout", "1000", "--dir", node_dir];
            nodes.push(Redis::start_as(dir, Security::default(), role.map(str::to_owned).to_vec()).await);
        }
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .await
            .expect("redis-cli is not installed: run `just deps` (Debian/Ubuntu: apt-get install redis-server)");
        assert!(out.status.success(), "redis-cli --cluster create failed: {}", String::from_utf8_lossy(&out.stdout));
        let cluster = RedisCluster { nodes };
        cluster.wait_healthy().await;
        for node in &cluster.nodes {
            node.wait_synced().await;
        }
        cluster
    }

    /// Seed nodes for `--redis-url` with `--redis-cluster`.
    pub fn url(&self) -> String {
        self.nodes.iter().map(Redis::url).collect::<Vec<_>>().join(",")
    }

    fn live(&self) -> impl Iterator<Item = &Redis> {
        self.nodes.iter().filter(|n| n.child.is_some())
    }

    /// Waits until every live node reports the cluster healthy, with every slot served.
    pub async fn wait_healthy(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut unhealthy = None;
            for node in self.live() {
                let info = node.cli(&["CLUSTER", "INFO"]).await;
                if !(info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")) {
                    unhealthy = Some((node.port, info));
                }
            }
            let Some((port, info)) = unhealthy else { return };
            assert!(tokio::time::Instant::now() < deadline, "cluster node {port} is not healthy:\n{info}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The port of the primary that holds `key`'s slot now.
    pub async fn primary_of(&self, key: &str) -> u16 {
        let node = self.live().next().expect("a live node");
        let slot: u16 = node.cli(&["CLUSTER", "KEYSLOT", key]).await.trim().parse().expect("a slot number");
        let nodes = node.cli(&["CLUSTER", "NODES"]).await;
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(addr), Some(flags)) = (fields.get(1), fields.get(2)) else { continue };
            if !flags.contains("master") || flags.contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let (from, to) = range.split_once('-').unwrap_or((range, range));
                matches!((from.parse::<u16>(), to.parse::<u16>()), (Ok(f), Ok(t)) if (f..=t).contains(&slot))
            });
            if serves {
                let port = addr.split('@').next().and_then(|a| a.rsplit(':').next()).and_then(|p| p.parse().ok());
                return port.expect("a node address");
            }
        }
        panic!("no primary serves slot {slot}:\n{nodes}");
    }

    /// Kills the primary listening on `port`, as a crash would, and waits until its replica has
    /// taken over.
    pub async fn kill_primary(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|n| n.port == port).expect("a node of this cluster");
        node.kill().await;
        let (addr, deadline) = (format!("127.0.0.1:{port}@"), tokio::time::Instant::now() + Duration::from_secs(30));
        loop {
            let nodes = self.live().next().expect("a live node").cli(&["CLUSTER", "NODES"]).await;
            let flags = nodes.lines().find(|l| l.contains(&addr)).and_then(|l| l.split_whitespace().nth(2));
            if flags.is_some_and(|f| f.split(',').any(|flag| flag == "fail")) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the cluster never marked {addr} failed:\n{nodes}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.wait_healthy().await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// A primary, its replica, and three Sentinels watching it (quorum 2), on loopback.
pub struct RedisSentinels {
    pub primary: Redis,
    pub replica: Redis,
    sentinels: Vec<Redis>,
}

impl RedisSentinels {
    /// The name the Sentinels know the primary by.
    pub const PRIMARY: &'static str = "pins";

    pub async fn start(dir: &Path) -> RedisSentinels {
        let primary = Redis::start(dir).await;
        let replica_of = ["--replicaof", "127.0.0.1", &primary.port.to_string()].map(str::to_owned).to_vec();
        let replica = Redis::start_as(dir, Security::default(), replica_of).await;
        replica.wait_synced().await;
        let mut sentinels = Vec::new();
        for i in 0..3 {
            // A Sentinel rewrites its configuration file, so each gets its own.
            let config = dir.join(format!("sentinel-{i}.conf"));
            let monitor = format!(
                "sentinel monitor {name} 127.0.0.1 {port} 2\n\
                 sentinel down-after-milliseconds {name} 1000\n\
                 sentinel failover-timeout {name} 5000\n",
                name = Self::PRIMARY,
                port = primary.port
            );
            std::fs::write(&config, monitor).expect("writing a Sentinel configuration");
            let role = [config.to_str().expect("a UTF-8 temp path"), "--sentinel"].map(str::to_owned).to_vec();
            sentinels.push(Redis::start_as(dir, Security::default(), role).await);
        }
        let set = RedisSentinels { primary, replica, sentinels };
        // Every Sentinel knows the replica and the other two before anything may fail.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for sentinel in &set.sentinels {
            loop {
                let master = sentinel.cli(&["SENTINEL", "MASTER", Self::PRIMARY]).await;
                let field = |name: &str| master.lines().skip_while(|l| *l != name).nth(1).map(str::to_owned);
                if field("num-slaves").as_deref() == Some("1") && field("num-other-sentinels").as_deref() == Some("2") {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "Sentinel {} never saw the set:\n{master}",
                    sentinel.port
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        set
    }

    /// The Sentinels, for `--redis-url` with `--redis-sentinel-primary`.
    pub fn url(&self) -> String {
        self.sentinels.iter().map(Redis::url).collect::<Vec<_>>().join(",")
    }

    /// Kills the primary, as a crash would, and waits until the Sentinels have promoted the
    /// replica.
    pub async fn kill_primary(&mut self) {
        self.primary.kill().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let addr = self.sentinels[0].cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", Self::PRIMARY]).await;
            let promoted = addr.lines().nth(1).is_some_and(|port| port.trim() == self.replica.port.to_string());
            if promoted && self.replica.cli(&["INFO", "replication"]).await.contains("role:master") {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "the Sentinels never promoted the replica: {addr}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
