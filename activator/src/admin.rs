//! The admin port: Prometheus `/metrics`, `/readyz` (fails as soon as draining starts) and
//! `/livez`. Must not touch the data path.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::health::Health;
use crate::stats::Stats;

#[derive(Clone)]
struct Admin {
    health: Arc<Health>,
    stats: Stats,
}

pub async fn serve(listener: TcpListener, health: Arc<Health>, stats: Stats) -> std::io::Result<()> {
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
