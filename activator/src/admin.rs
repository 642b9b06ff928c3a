//! The admin port: Prometheus `/metrics`, `/readyz` (fails as soon as draining starts) and
//! `/livez`; and `/metrics` alone where `config-observability`'s `metrics-endpoint` moves
//! upstream's Prometheus listener. Must not touch the data path.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::health::Health;
use crate::stats::Stats;
use crate::sync::lock;
use crate::telemetry::PrometheusListener;

#[derive(Clone)]
struct Admin {
    health: Arc<Health>,
    stats: Stats,
}

pub(crate) async fn serve(listener: TcpListener, health: Arc<Health>, stats: Stats) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/readyz", get(readyz))
        .route("/livez", get(|| async { "ok\n" }))
        .with_state(Admin { health, stats });
    axum::serve(listener, app).await
}

async fn metrics(State(admin): State<Admin>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], admin.stats.encode())
}

async fn readyz(State(admin): State<Admin>) -> impl IntoResponse {
    match admin.health.check() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}

/// `/metrics` on the address `metrics-endpoint` names, as upstream's Prometheus server, which
/// answers nothing else; the admin port keeps serving everything.
pub(crate) struct MovedMetrics {
    stats: Stats,
    /// The admin listener's port: an endpoint on it is already served.
    admin_port: u16,
    serving: Mutex<Option<tokio::task::AbortHandle>>,
}

impl MovedMetrics {
    pub(crate) fn new(stats: Stats, admin: SocketAddr) -> Self {
        MovedMetrics { stats, admin_port: admin.port(), serving: Mutex::new(None) }
    }
}

impl PrometheusListener for MovedMetrics {
    fn listen_at(&self, at: Option<SocketAddr>) {
        if let Some(previous) = lock(&self.serving).take() {
            previous.abort();
        }
        let Some(at) = at.filter(|at| at.port() != self.admin_port) else { return };
        let listener = match crate::socket::listen(at) {
            Ok(listener) => listener,
            Err(e) => return tracing::warn!(%at, error = %e, "cannot serve /metrics where metrics-endpoint says"),
        };
        tracing::info!(%at, "serving /metrics where metrics-endpoint says");
        let app = Router::new()
            .route("/metrics", get(metrics))
            .with_state(Admin { health: Arc::new(Health::default()), stats: self.stats.clone() });
        let task = tokio::spawn(async move { axum::serve(listener, app).await });
        *lock(&self.serving) = Some(task.abort_handle());
    }
}
