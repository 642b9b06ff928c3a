//! A split that holds although sessions stick (`sticky-split-mode: requests`): 20 heavy sessions
//! and 200 light ones over a 90/10 split. By default the percents apply to new sessions, so where
//! the heavy ones land decides the realised split; by requests, new pins steer the request share
//! to the percents.

use std::collections::BTreeMap;

use integration_tests::topology::{Service, yaml};
use integration_tests::{Client, Env, addrs};

const P: &str = "activator.knative.dev/";

/// Heavy session `i` starts at round `i` and sends one request a round for 300 rounds; light
/// session `j` starts at round `2j` and sends 20: 10 000 requests in all.
fn schedule() -> BTreeMap<usize, Vec<String>> {
    let mut rounds: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for i in 0..20 {
        (0..300).for_each(|k| rounds.entry(i + k).or_default().push(format!("heavy-{i}")));
    }
    for j in 0..200 {
        (0..20).for_each(|k| rounds.entry(2 * j + k).or_default().push(format!("light-{j}")));
    }
    rounds
}

/// The canary's share, in percent, of the 10 000 requests.
async fn canary_share(mode: Option<&str>) -> f64 {
    let env = Env::new();
    let (stable, canary) = (env.pods("stable-1", 2).await, env.pods("canary-1", 1).await);
    let mut service = Service::new("split");
    if let Some(mode) = mode {
        service = service.annotation(&format!("{P}sticky-split-mode"), mode);
    }
    env.write_topology(&yaml(&[service.revision("stable-1", 90, &addrs(&stable)).revision(
        "canary-1",
        10,
        &addrs(&canary),
    )]));
    let activator = env.activator(&[]).await;
    let client = Client::new(activator.addr("proxy"));
    let (mut total, mut on_canary) = (0, 0);
    for sessions in schedule().into_values() {
        let replies = futures_util::future::join_all(sessions.iter().map(|session| {
            let client = client.clone();
            async move { client.get_with("split.test", "/incr", &[("K-Session", session)]).await }
        }))
        .await;
        for reply in replies {
            assert_eq!(reply.status, 200, "{reply:?}");
            total += 1;
            on_canary += usize::from(reply.revision() == "canary-1");
        }
    }
    assert_eq!(total, 10_000);
    100.0 * on_canary as f64 / total as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splitting_by_requests_keeps_the_percents_although_sessions_stick() {
    let by_sessions = canary_share(None).await;
    let by_requests = canary_share(Some("requests")).await;
    eprintln!("canary share of 10 000 requests: {by_sessions:.1} % by sessions, {by_requests:.1} % by requests");
    assert!((by_requests - 10.0).abs() <= 3.0, "by requests: {by_requests:.1} % of 10 %");
}
