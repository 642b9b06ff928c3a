//! How the pin store reaches Redis: one server, a primary that Redis Sentinel fails over, or a
//! Redis Cluster, over plain TCP or TLS. One client type and one connection type run the same
//! commands either way, so the store above does not know which it talks to, except that a
//! cluster takes a pipeline only when every key in it shares a slot.
//!
//! Owns clients, connections and their timeouts; must not know what a pin is.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, PubSub};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    Client, ClientTlsConfig, Cmd, ConnectionAddr, IntoConnectionInfo, Pipeline, RedisFuture, RedisResult,
    TlsCertificates, TlsMode, Value,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::Notify;

/// How long connecting to a server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest pause between reconnection attempts of a connection.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(5);
/// The least time between two questions to the Sentinels about where the primary is.
const REDISCOVER_PAUSE: Duration = Duration::from_millis(250);

/// TLS files for Redis, each a PEM file.
#[derive(Clone, Debug, Default)]
pub struct RedisTls {
    /// Certificate authorities to trust instead of the public ones.
    pub ca_file: Option<PathBuf>,
    /// Certificate and key to present to a Redis that asks for a client certificate.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl RedisTls {
    /// The certificates these files hold; `None` without files. An error names the file that
    /// cannot be read, or the URL that cannot use them.
    fn certificates(&self, url: &str) -> anyhow::Result<Option<TlsCertificates>> {
        if self.ca_file.is_none() && self.client_cert.is_none() {
            return Ok(None);
        }
        anyhow::ensure!(
            url.starts_with("rediss://"),
            "--redis-ca-file and --redis-client-cert need rediss:// URLs in --redis-url"
        );
        let read = |flag: &str, path: &PathBuf, holds: Pem| {
            let pem = std::fs::read(path).with_context(|| format!("reading {flag} {}", path.display()))?;
            // The Redis client's own error names neither the flag nor the file, and says it twice.
            let found = match holds {
                Pem::Certificates => CertificateDer::pem_slice_iter(&pem).next().is_some_and(|c| c.is_ok()),
                Pem::Key => PrivateKeyDer::from_pem_slice(&pem).is_ok(),
            };
            anyhow::ensure!(found, "{flag} {}: no PEM {} in the file", path.display(), holds.what());
            Ok(pem)
        };
        let root_cert = self.ca_file.as_ref().map(|ca| read("--redis-ca-file", ca, Pem::Certificates)).transpose()?;
        let client_tls = match &self.client_cert {
            Some((cert, key)) => Some(ClientTlsConfig {
                client_cert: read("--redis-client-cert", cert, Pem::Certificates)?,
                client_key: read("--redis-client-key", key, Pem::Key)?,
            }),
            None => None,
        };
        Ok(Some(TlsCertificates { client_tls, root_cert }))
    }
}

/// What a PEM file given for Redis must hold.
#[derive(Clone, Copy)]
enum Pem {
    Certificates,
    Key,
}

impl Pem {
    fn what(self) -> &'static str {
        match self {
            Pem::Certificates => "certificate",
            Pem::Key => "private key",
        }
    }
}

/// What `--redis-url` names: one server, the Sentinels that watch a primary (by its name), or
/// the seed nodes of a Redis Cluster.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Deployment {
    #[default]
    Server,
    Sentinel {
        primary: String,
    },
    Cluster,
}

/// A client for the pin store's Redis.
#[derive(Clone)]
pub(crate) struct RedisClient {
    /// The server, or each seed node of a cluster: a cluster delivers every `PUBLISH` to every
    /// node, so the pub/sub subscription may use any of them.
    servers: Vec<Client>,
    cluster: Option<ClusterClient>,
    /// Where the primary is, when Sentinels say.
    sentinels: Option<Arc<Sentinels>>,
}

impl RedisClient {
    /// A client for `urls`: one URL for a server, comma-separated seed nodes for a cluster.
    /// Connects to nothing yet.
    pub(crate) fn new(urls: &str, deployment: &Deployment, tls: &RedisTls) -> anyhow::Result<Self> {
        let urls: Vec<&str> = urls.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
        let first = urls.first().copied().context("--redis-url is empty")?;
        let certificates = tls.certificates(first)?;
        let client = |url: &str| -> anyhow::Result<Client> {
            let client = match &certificates {
                Some(certificates) => Client::build_with_tls(url, certificates.clone()),
                None => Client::open(url),
            };
            client.with_context(|| format!("{url:?} in --redis-url is not a valid Redis URL"))
        };
        match deployment {
            Deployment::Server => {
                anyhow::ensure!(
                    urls.len() == 1,
                    "--redis-url names several servers: add --redis-cluster for a Redis Cluster, or \
                     --redis-sentinel-primary for a primary that Sentinels watch"
                );
                Ok(RedisClient { servers: vec![client(first)?], cluster: None, sentinels: None })
            }
            Deployment::Sentinel { primary } => {
                let sentinels = Sentinels::new(&urls, primary, certificates)?;
                Ok(RedisClient { servers: Vec::new(), cluster: None, sentinels: Some(Arc::new(sentinels)) })
            }
            Deployment::Cluster => {
                let servers = urls.iter().map(|url| client(url)).collect::<anyhow::Result<Vec<_>>>()?;
                let mut builder = ClusterClientBuilder::new(urls.clone()).connection_timeout(CONNECT_TIMEOUT);
                if let Some(certificates) = certificates {
                    builder = builder.certs(certificates);
                }
                let cluster = builder.build().context("--redis-url does not name a Redis Cluster's nodes")?;
                Ok(RedisClient { servers, cluster: Some(cluster), sentinels: None })
            }
        }
    }

    /// A connection that reconnects by itself, whose every answer must come within
    /// `response_timeout`.
    pub(crate) async fn connect(&self, response_timeout: Duration) -> RedisResult<RedisConnection> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(response_timeout))
            .set_number_of_retries(1)
            .set_max_delay(MAX_RECONNECT_DELAY);
        match (&self.cluster, &self.sentinels) {
            (_, Some(sentinels)) => Ok(RedisConnection::Failover(Failover::connect(sentinels.clone(), config).await?)),
            (None, None) => {
                let server = self.servers[0].clone();
                Ok(RedisConnection::Server(ConnectionManager::new_with_config(server, config).await?))
            }
            (Some(cluster), None) => {
                let config =
                    ClusterConfig::new().set_connection_timeout(CONNECT_TIMEOUT).set_response_timeout(response_timeout);
                Ok(RedisConnection::Cluster(cluster.get_async_connection_with_config(config).await?))
            }
        }
    }

    /// A pub/sub connection; in a cluster, to seed node `attempt` (modulo their number), so
    /// retries go round the seeds when one is down.
    pub(crate) async fn pubsub(&self, attempt: usize) -> RedisResult<PubSub> {
        match &self.sentinels {
            // The primary's pub/sub, wherever it is now.
            Some(sentinels) => sentinels.primary().await?.get_async_pubsub().await,
            None => self.servers[attempt % self.servers.len()].get_async_pubsub().await,
        }
    }
}

/// A connection to the pin store's Redis; cheap to clone, every clone multiplexed on the same
/// sockets.
#[derive(Clone)]
pub(crate) enum RedisConnection {
    Server(ConnectionManager),
    Failover(Arc<Failover>),
    Cluster(ClusterConnection),
}

impl RedisConnection {
    /// `INFO server` of one server (in a cluster, any node: they run one version).
    pub(crate) async fn server_info(&mut self) -> RedisResult<String> {
        let mut info = redis::cmd("INFO");
        info.arg("server");
        match self {
            RedisConnection::Server(_) | RedisConnection::Failover(_) => info.query_async(self).await,
            RedisConnection::Cluster(conn) => {
                let reply = conn.route_command(info, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random)).await?;
                Ok(redis::from_redis_value(reply)?)
            }
        }
    }

    /// Every key matching `pattern`, whose hash tag puts them all in one slot: in a cluster, that
    /// slot's primary is scanned.
    pub(crate) async fn scan_one_slot(&mut self, pattern: &str) -> RedisResult<Vec<String>> {
        let route = match self {
            RedisConnection::Server(_) | RedisConnection::Failover(_) => None,
            RedisConnection::Cluster(conn) => {
                let slot: u16 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(pattern).query_async(conn).await?;
                Some(RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master))))
            }
        };
        let (mut cursor, mut keys) = (0u64, Vec::new());
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000);
            let (next, batch): (u64, Vec<String>) = match (&mut *self, &route) {
                (RedisConnection::Cluster(conn), Some(route)) => {
                    redis::from_redis_value(conn.route_command(scan, route.clone()).await?)?
                }
                (conn, _) => scan.query_async(conn).await?,
            };
            keys.extend(batch);
            if next == 0 {
                return Ok(keys);
            }
            cursor = next;
        }
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Server(conn) => conn.req_packed_command(cmd),
            RedisConnection::Failover(failover) => Box::pin(async move {
                let answer = failover.current().req_packed_command(cmd).await;
                failover.judge(&answer);
                answer
            }),
            RedisConnection::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Server(conn) => conn.req_packed_commands(pipeline, offset, count),
            RedisConnection::Failover(failover) => Box::pin(async move {
                let answers = failover.current().req_packed_commands(pipeline, offset, count).await;
                failover.judge(&answers);
                answers
            }),
            RedisConnection::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Server(conn) => conn.get_db(),
            RedisConnection::Failover(failover) => failover.current().get_db(),
            RedisConnection::Cluster(conn) => conn.get_db(),
        }
    }
}

/// The Sentinels that watch the primary, asked where it is.
struct Sentinels {
    client: tokio::sync::Mutex<SentinelClient>,
}

impl Sentinels {
    /// Sentinels at `urls` watching the primary named `primary`. The URLs' user, password and
    /// TLS apply to the Sentinels and to the primary alike.
    fn new(urls: &[&str], primary: &str, certificates: Option<TlsCertificates>) -> anyhow::Result<Self> {
        let infos = urls
            .iter()
            .map(|url| url.into_connection_info().with_context(|| format!("{url:?} in --redis-url is not a valid URL")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let settings = infos[0].redis_settings();
        let mut builder = SentinelClientBuilder::new(
            infos.iter().map(|info| info.addr().clone()),
            primary,
            SentinelServerType::Master,
        )?;
        if let Some(user) = settings.username() {
            builder = builder.set_client_to_redis_username(user).set_client_to_sentinel_username(user);
        }
        if let Some(password) = settings.password() {
            builder = builder.set_client_to_redis_password(password).set_client_to_sentinel_password(password);
        }
        if let ConnectionAddr::TcpTls { insecure, .. } = infos[0].addr() {
            let mode = if *insecure { TlsMode::Insecure } else { TlsMode::Secure };
            builder = builder.set_client_to_redis_tls_mode(mode).set_client_to_sentinel_tls_mode(mode);
            if let Some(certificates) = certificates {
                builder = builder
                    .set_client_to_redis_certificates(certificates.clone())
                    .set_client_to_sentinel_certificates(certificates);
            }
        }
        let client = builder.build().context("--redis-url does not name Sentinels")?;
        Ok(Sentinels { client: tokio::sync::Mutex::new(client) })
    }

    /// A client for the primary the Sentinels name now.
    async fn primary(&self) -> RedisResult<Client> {
        self.client.lock().await.async_get_client().await
    }
}

/// A connection to the primary that follows it when Sentinels fail it over: a failure that says
/// the primary may be gone (no connection, no answer, a read-only replica) asks the Sentinels
/// where it is, and a new primary gets a new connection.
pub(crate) struct Failover {
    current: ArcSwap<ConnectionManager>,
    /// Pulsed by failures that may mean the primary moved.
    lost: Notify,
}

impl Failover {
    async fn connect(sentinels: Arc<Sentinels>, config: ConnectionManagerConfig) -> RedisResult<Arc<Failover>> {
        let primary = sentinels.primary().await?;
        let mut addr = primary.get_connection_info().addr().clone();
        let conn = ConnectionManager::new_with_config(primary, config.clone()).await?;
        let failover = Arc::new(Failover { current: ArcSwap::from_pointee(conn), lost: Notify::new() });
        let following = Arc::downgrade(&failover);
        tokio::spawn(async move {
            let mut last_error = String::new();
            loop {
                let Some(failover) = following.upgrade() else { return };
                failover.lost.notified().await;
                match sentinels.primary().await {
                    Ok(primary) if *primary.get_connection_info().addr() != addr => {
                        let moved_to = primary.get_connection_info().addr().clone();
                        match ConnectionManager::new_with_config(primary, config.clone()).await {
                            Ok(conn) => {
                                tracing::info!(primary = %moved_to, "Sentinels failed the Redis primary over; following it");
                                failover.current.store(Arc::new(conn));
                                addr = moved_to;
                            }
                            Err(e) => {
                                tracing::warn!(primary = %moved_to, error = %e, "cannot reach the new Redis primary yet")
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // The Sentinels are mid-failover (the old primary is down, the new one not
                        // named yet) or out of reach: ask again after the pause, whether or not
                        // another command fails meanwhile.
                        let error = e.to_string();
                        if error != last_error {
                            tracing::warn!(%error, "cannot ask the Redis Sentinels where the primary is; asking again");
                            last_error = error;
                        }
                        failover.lost.notify_one();
                        drop(failover);
                        tokio::time::sleep(REDISCOVER_PAUSE).await;
                        continue;
                    }
                }
                last_error.clear();
                drop(failover);
                // Failures meanwhile leave a pulse, so the next round starts at once after this.
                tokio::time::sleep(REDISCOVER_PAUSE).await;
            }
        });
        Ok(failover)
    }

    fn current(&self) -> ConnectionManager {
        ConnectionManager::clone(&self.current.load())
    }

    fn judge<T>(&self, answer: &RedisResult<T>) {
        if let Err(e) = answer
            && (e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || matches!(e.code(), Some("READONLY" | "MASTERDOWN")))
        {
            self.lost.notify_one();
        }
    }
}
