//! The stat websocket server: accepts the activators' connections and decodes Knative's
//! `WireStatMessages` from binary frames, exactly as Knative's autoscaler does. Frames that do
//! not decode are logged and skipped; other frame types are ignored.

use contract::wire::WireStatMessages;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::scaler::Report;

/// Accepts connections forever, sending every decoded stat to `reports`. With `print`, each one
/// is also written to stdout as `stat <ns>/<revision> pod=<pod> concurrency=<c> requests=<n>`.
pub async fn serve(listener: TcpListener, reports: mpsc::Sender<Report>, print: bool) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else { continue };
        let reports = reports.clone();
        tokio::spawn(async move {
            let mut socket = match tokio_tungstenite::accept_async(stream).await {
                Ok(socket) => socket,
                Err(e) => return tracing::debug!(%peer, error = %e, "not a websocket handshake"),
            };
            tracing::info!(%peer, "activator connected");
            while let Some(message) = socket.next().await {
                match message {
                    Ok(Message::Binary(frame)) => match WireStatMessages::decode(frame.as_ref()) {
                        Ok(stats) => {
                            for message in stats.messages {
                                let Some(stat) = message.stat else { continue };
                                if print {
                                    println!(
                                        "stat {}/{} pod={} concurrency={} requests={}",
                                        message.namespace,
                                        message.name,
                                        stat.pod_name,
                                        stat.average_concurrent_requests,
                                        stat.request_count
                                    );
                                }
                                let report = Report {
                                    namespace: message.namespace,
                                    revision: message.name,
                                    concurrency: stat.average_concurrent_requests
                                        - stat.average_proxied_concurrent_requests,
                                    requests: stat.request_count - stat.proxied_request_count,
                                };
                                if reports.send(report).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => tracing::warn!(%peer, error = %e, "skipping a frame that is not WireStatMessages"),
                    },
                    // Answer pings now: nothing else is ever written on this socket.
                    Ok(Message::Ping(_)) => {
                        let _ = socket.flush().await;
                    }
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            tracing::info!(%peer, "activator disconnected");
        });
    }
}
