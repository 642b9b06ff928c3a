//! The `kubernetes` backend, for clusters without Knative: a revision's pods are the replicas of
//! the Deployment behind it, scaled through the Deployment's scale subresource (a merge patch of
//! `spec.replicas`). The Deployment is named by the revision's `activator.knative.dev/deployment`
//! annotation in the topology, else by `--deployment-name` (`{revision}-deployment`, as Knative
//! names it; `{revision}` in standalone mode, where the revision is the Deployment). Without a
//! topology, a revision's annotations are its Deployment's own, read each time its scale is
//! decided, and its current scale is read from the API the first time it is seen.

use std::collections::HashMap;

use anyhow::Context;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};

use crate::RevisionAnnotations;

/// Annotation naming the Deployment that backs a revision.
pub const DEPLOYMENT_ANNOTATION: &str = "activator.knative.dev/deployment";

pub struct KubernetesBackend {
    client: kube::Client,
    /// `--deployment-name`: the Deployment of `{revision}`.
    name_template: String,
    /// Replicas last set or read, per (namespace, revision).
    replicas: HashMap<(String, String), u32>,
}

impl KubernetesBackend {
    /// Connects with the in-cluster service account, or the local kubeconfig.
    pub async fn connect(name_template: String) -> anyhow::Result<Self> {
        // kube's error repeats each cause in its own text; said once, without the chain.
        let config = kube::Config::infer().await.map_err(|e| anyhow::anyhow!("no Kubernetes API to talk to: {e}"))?;
        let client = kube::Client::try_from(config).context("connecting to the Kubernetes API")?;
        Ok(Self::new(client, name_template))
    }

    pub fn new(client: kube::Client, name_template: String) -> Self {
        KubernetesBackend { client, name_template, replicas: HashMap::new() }
    }

    /// The Deployment behind `revision`: its annotation's, else `--deployment-name`'s.
    pub fn deployment_of(&self, revision: &str, annotations: Option<&RevisionAnnotations>) -> String {
        annotations
            .and_then(|a| a.get(DEPLOYMENT_ANNOTATION))
            .cloned()
            .unwrap_or_else(|| self.name_template.replace("{revision}", revision))
    }

    /// The revision's replicas: as last set or read, else read from its Deployment's scale;
    /// `None` if it cannot be read (nothing is then decided for it).
    pub async fn current(&mut self, namespace: &str, revision: &str, deployment: &str) -> Option<u32> {
        let key = (namespace.to_owned(), revision.to_owned());
        if let Some(replicas) = self.replicas.get(&key) {
            return Some(*replicas);
        }
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), namespace);
        match deployments.get_scale(deployment).await {
            Ok(scale) => {
                let replicas = scale.spec.and_then(|s| s.replicas).map_or(0, |r| u32::try_from(r).unwrap_or(0));
                self.replicas.insert(key, replicas);
                Some(replicas)
            }
            Err(e) => {
                tracing::warn!(%namespace, %deployment, error = %e, "cannot read the deployment's scale; not scaling it");
                None
            }
        }
    }

    /// The annotations of the Deployment behind a revision, which say how it scales; `None` if it
    /// cannot be read.
    pub async fn annotations(&self, namespace: &str, deployment: &str) -> Option<RevisionAnnotations> {
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), namespace);
        match deployments.get(deployment).await {
            Ok(found) => Some(found.metadata.annotations.unwrap_or_default()),
            Err(e) => {
                tracing::warn!(%namespace, %deployment, error = %e, "cannot read the deployment; not scaling it");
                None
            }
        }
    }

    pub async fn scale(
        &mut self,
        namespace: &str,
        revision: &str,
        deployment: &str,
        replicas: u32,
    ) -> anyhow::Result<()> {
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), namespace);
        let patch = serde_json::json!({ "spec": { "replicas": replicas } });
        let scale = deployments
            .patch_scale(deployment, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("scaling deployment {namespace}/{deployment}"))?;
        let now = scale.spec.and_then(|s| s.replicas).map_or(replicas, |r| u32::try_from(r).unwrap_or(0));
        self.replicas.insert((namespace.to_owned(), revision.to_owned()), now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Request, Response};
    use http_body_util::BodyExt;
    use kube::client::Body;

    #[tokio::test]
    async fn patches_the_scale_subresource_of_the_revisions_deployment() {
        let (service, mut api_server) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let mut backend = KubernetesBackend::new(kube::Client::new(service, "default"), "{revision}-deployment".into());
        let answer = tokio::spawn(async move {
            let (request, respond) = api_server.next_request().await.expect("the backend sends a request");
            let (parts, body) = request.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            let scale = serde_json::json!({
                "apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {"name": "counter-00001-deployment", "namespace": "shop"},
                "spec": {"replicas": 3}
            });
            respond.send_response(Response::new(Body::from(serde_json::to_vec(&scale).unwrap())));
            (parts, body)
        });

        backend.scale("shop", "counter-00001", "counter-00001-deployment", 3).await.unwrap();
        let (parts, body) = answer.await.unwrap();
        assert_eq!(parts.method, Method::PATCH);
        assert_eq!(parts.uri.path(), "/apis/apps/v1/namespaces/shop/deployments/counter-00001-deployment/scale");
        assert_eq!(parts.headers["content-type"], "application/merge-patch+json");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
            serde_json::json!({"spec": {"replicas": 3}})
        );
        assert_eq!(
            backend.current("shop", "counter-00001", "counter-00001-deployment").await,
            Some(3),
            "known once set"
        );
    }

    #[tokio::test]
    async fn the_deployment_comes_from_the_annotation_or_the_template() {
        let (service, _api_server) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let knative = KubernetesBackend::new(client.clone(), "{revision}-deployment".into());
        let annotated = [(DEPLOYMENT_ANNOTATION.to_owned(), "web".to_owned())].into();
        assert_eq!(knative.deployment_of("r-00001", Some(&annotated)), "web");
        assert_eq!(knative.deployment_of("r-00001", None), "r-00001-deployment");
        let standalone = KubernetesBackend::new(client, "{revision}".into());
        assert_eq!(standalone.deployment_of("cart", None), "cart");
    }
}
