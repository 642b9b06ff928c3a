//! The Kubernetes client the cluster sources (Knative and standalone) watch with: kube-rs's own stack (service account in a
//! cluster, `KUBECONFIG` outside one), each answer of the API counted as upstream's client-go
//! metrics count it (`kn.k8s.client.http.response.status_code`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use kube::client::ClientBuilder;
use tower::{Layer, Service};

use crate::stats::knative::KnativeMetrics;

/// Whether a watch failed because RBAC forbids listing or watching its resource (403).
pub(crate) fn forbidden(error: &kube::runtime::watcher::Error) -> bool {
    use kube::runtime::watcher::Error;
    matches!(error, Error::InitialListFailed(kube::Error::Api(status))
        | Error::WatchStartFailed(kube::Error::Api(status)) if status.code == 403)
}

pub(crate) async fn connect(metrics: KnativeMetrics) -> anyhow::Result<kube::Client> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| anyhow::anyhow!("connecting to the Kubernetes API (service account or KUBECONFIG): {e}"))?;
    let host = config.cluster_url.authority().map_or_else(|| "none".to_owned(), |a| a.to_string());
    let builder =
        ClientBuilder::try_from(config).map_err(|e| anyhow::anyhow!("building the Kubernetes client: {e}"))?;
    Ok(builder.with_layer(&Counted { metrics, host }).build())
}

struct Counted {
    metrics: KnativeMetrics,
    /// The API server's address, the one `server.address` this client ever has.
    host: String,
}

impl<S> Layer<S> for Counted {
    type Service = CountedService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CountedService { inner, metrics: self.metrics.clone(), host: self.host.clone() }
    }
}

#[derive(Clone)]
pub(crate) struct CountedService<S> {
    inner: S,
    metrics: KnativeMetrics,
    host: String,
}

impl<S, B, R> Service<Request<B>> for CountedService<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let method = req.method().clone();
        let (metrics, host) = (self.metrics.clone(), self.host.clone());
        let answered = self.inner.call(req);
        Box::pin(async move {
            let answer = answered.await;
            let code = answer.as_ref().ok().map(|resp| resp.status().as_u16());
            metrics.kube_response(&host, method.as_str(), code);
            answer
        })
    }
}
