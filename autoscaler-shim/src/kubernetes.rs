//! The `kubernetes` backend, for clusters without Knative: a revision's pods are the replicas of
//! the Deployment behind it, scaled through the Deployment's scale subresource (a merge patch of
//! `spec.replicas`). The Deployment is named by the revision's `activator.knative.dev/deployment`
//! annotation, or `<revision>-deployment` as Knative names it.

use std::collections::HashMap;

use anyhow::Context;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};

/// Annotation naming the Deployment that backs a revision.
pub const DEPLOYMENT_ANNOTATION: &str = "activator.knative.dev/deployment";

pub struct KubernetesBackend {
    client: kube::Client,
    /// Replicas last set or read, per (namespace, revision).
    replicas: HashMap<(String, String), u32>,
}

impl KubernetesBackend {
    /// Connects with the in-cluster service account, or the local kubeconfig.
    pub async fn connect() -> anyhow::Result<Self> {
        // kube's error repeats each cause in its own text; said once, without the chain.
        let config = kube::Config::infer().await.map_err(|e| anyhow::anyhow!("no Kubernetes API to talk to: {e}"))?;
        let client = kube::Client::try_from(config).context("connecting to the Kubernetes API")?;
        Ok(Self::new(client))
    }

    pub fn new(client: kube::Client) -> Self {
        KubernetesBackend { client, replicas: HashMap::new() }
    }

    pub fn current(&self, namespace: &str, revision: &str) -> u32 {
        self.replicas.get(&(namespace.to_owned(), revision.to_owned())).copied().unwrap_or(0)
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

/// The Deployment behind a revision.
pub fn deployment_name(revision: &str, annotations: Option<&std::collections::BTreeMap<String, String>>) -> String {
    annotations.and_then(|a| a.get(DEPLOYMENT_ANNOTATION)).cloned().unwrap_or_else(|| format!("{revision}-deployment"))
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
        let mut backend = KubernetesBackend::new(kube::Client::new(service, "default"));
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
        assert_eq!(backend.current("shop", "counter-00001"), 3);
    }

    #[test]
    fn the_deployment_comes_from_the_annotation_or_knatives_naming() {
        let annotated = [(DEPLOYMENT_ANNOTATION.to_owned(), "web".to_owned())].into();
        assert_eq!(deployment_name("r-00001", Some(&annotated)), "web");
        assert_eq!(deployment_name("r-00001", None), "r-00001-deployment");
    }
}
