//! How demo-service serves its listeners: HTTP/1.1 with upgrades and HTTP/2 (h2c with prior
//! knowledge, or ALPN over TLS), each connection in a task of its own, with a bound on HTTP/2
//! streams per connection as queue-proxy's server has; and the TLS listener that stands in for
//! queue-proxy's 8112 under Knative's system-internal TLS.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub fn acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `app` on `listener` (over TLS with `tls`) until `stop` completes, then lets open
/// connections finish.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    max_streams: Option<u32>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    if let Some(streams) = max_streams {
        builder.http2().max_concurrent_streams(streams);
    }
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
            () = &mut stop => break,
        };
        let app = app.clone().layer(axum::Extension(ConnectInfo::<SocketAddr>(peer)));
        let builder = builder.clone();
        let watcher = graceful.watcher();
        match &tls {
            None => {
                let served = builder.serve_connection_with_upgrades(TokioIo::new(tcp), TowerToHyperService::new(app));
                let served = watcher.watch(served.into_owned());
                tokio::spawn(async move {
                    if let Err(e) = served.await {
                        tracing::debug!(%peer, error = %e, "connection ended");
                    }
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let app = app.layer(axum::middleware::map_response(mark_tls));
                tokio::spawn(async move {
                    let tls = match acceptor.accept(tcp).await {
                        Ok(tls) => tls,
                        Err(e) => return tracing::info!(%peer, error = %e, "TLS handshake failed"),
                    };
                    let service = TowerToHyperService::new(app);
                    let served =
                        watcher.watch(builder.serve_connection_with_upgrades(TokioIo::new(tls), service).into_owned());
                    if let Err(e) = served.await {
                        tracing::debug!(%peer, error = %e, "TLS connection ended");
                    }
                });
            }
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Tells the client (and the tests) that the request came over TLS.
async fn mark_tls(mut resp: axum::response::Response) -> axum::response::Response {
    resp.headers_mut().insert("x-demo-tls", http::HeaderValue::from_static("1"));
    resp
}
