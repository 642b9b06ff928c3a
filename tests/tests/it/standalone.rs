//! Standalone mode (issue 31): plain Services and Deployments, no Knative. The activator watches
//! the in-process API server; autoscaler-shim scales the Deployment through its scale
//! subresource; the test's controller runs the Deployment's replicas as demo-service processes
//! with their EndpointSlices, as Kubernetes would.

use std::collections::BTreeSet;
use std::time::Duration;

use integration_tests::kube_api::{ApiServer, Kind};
use integration_tests::standalone::{Controller, deployment, service};
use integration_tests::{Client, Env, Reply, admin_get, wait_until};

async fn session(client: &Client, id: &str) -> Reply {
    client.get_with("cart.shop", &format!("/incr?session_id={id}"), &[("K-Session", id)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_at_zero_is_scaled_for_a_waiting_request_and_sessions_keep_their_pods() {
    let env = Env::new();
    let api = ApiServer::start().await;
    api.put(Kind::Service, service("shop", "cart", "cart", &[]));
    api.put(Kind::Deployment, deployment("shop", "cart", 0, &[]));
    let controller = Controller::start(&api, env.dir.path().to_owned(), "shop", "cart", "cart");
    let shim = env.kubernetes_shim(&api, &["--deployment-name", "{revision}", "--scale-to-zero-grace", "60s"]).await;
    let url = format!("ws://{}", shim.addr("stats"));
    let activator = env.standalone_activator(&api, &["--autoscaler-url", &url, "--debug-headers"]).await;
    let admin = activator.addr("admin");
    wait_until(Duration::from_secs(20), "the watches have listed once", || async {
        admin_get(admin, "/readyz").await.0 == 200
    })
    .await;
    let client = Client::new(activator.addr("proxy"));

    // At zero: the request waits while the shim scales the Deployment to one.
    let first = {
        let client = client.clone();
        tokio::spawn(async move { session(&client, "s0").await })
    };
    wait_until(Duration::from_secs(20), "the shim scales the deployment to one", || async {
        controller.pods().len() == 1
    })
    .await;
    let first = first.await.unwrap();
    assert_eq!((first.status, first.body.trim()), (200, "session=s0, count=1"), "{}", first.body);
    assert_eq!(first.pod(), controller.pods()[0].0);
    let scale = api.patches(Kind::Deployment);
    assert_eq!(scale.first().map(|p| p.patch.clone()), Some(serde_json::json!({"spec": {"replicas": 1}})));

    // Three pods (the Deployment's min-scale, read by the shim), and sessions keep theirs.
    api.put(Kind::Deployment, deployment("shop", "cart", 1, &[("autoscaling.knative.dev/min-scale", "3")]));
    wait_until(Duration::from_secs(20), "three pods run", || async { controller.pods().len() == 3 }).await;
    let seen = std::sync::Mutex::new(BTreeSet::new());
    wait_until(Duration::from_secs(20), "the activator balances over all three", || async {
        let pod = client.get("cart.shop", "/incr").await.pod().to_owned();
        let mut seen = seen.lock().unwrap();
        seen.insert(pod);
        seen.len() == 3
    })
    .await;
    let mut used = BTreeSet::new();
    for i in 1..=12 {
        let id = format!("s{i}");
        let home = session(&client, &id).await;
        assert_eq!((home.status, home.body.trim()), (200, format!("session={id}, count=1").as_str()));
        for n in 2..=3 {
            let again = session(&client, &id).await;
            assert_eq!((again.pod(), again.body.trim()), (home.pod(), format!("session={id}, count={n}").as_str()));
        }
        used.insert(home.pod().to_owned());
    }
    assert!(used.len() > 1, "sessions spread over the pods: {used:?}");
    assert_eq!(session(&client, "s0").await.body.trim(), "session=s0, count=2", "the first session kept its pod");
}
