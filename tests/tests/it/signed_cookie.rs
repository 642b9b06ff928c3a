//! Pins that need no store (`sticky-session-mode: signed-cookie`): two activators without Redis
//! keep a session on its pod through a signed cookie either can verify; a changed, expired or
//! foreign cookie is refused and replaced; keys rotate through the key file without a restart.

use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::topology::{Service, yaml};
use integration_tests::{Client, Env, Process, Reply, addrs, wait_until};

const P: &str = "activator.knative.dev/";
const K1: &str = "the-first-key-of-at-least-thirty-two-bytes";
const K2: &str = "the-second-key-of-at-least-thirty-two-bytes";

fn write_keys(path: &Path, keys: &[&str]) {
    // Replaced at once, as a Secret's volume is.
    let scratch = path.with_extension("new");
    std::fs::write(&scratch, keys.join("\n")).unwrap();
    std::fs::rename(scratch, path).unwrap();
}

/// The pin cookie a response sets, as a request sends it back.
fn pin_cookie(reply: &Reply) -> Option<String> {
    reply
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("activator-pin="))
        .map(|v| v.split(';').next().unwrap_or_default().to_owned())
}

async fn get(client: &Client, host: &str, cookie: Option<&str>) -> Reply {
    let headers: Vec<(&str, &str)> = cookie.map(|c| ("Cookie", c)).into_iter().collect();
    let reply = client.get_with(host, "/incr?session_id=s", &headers).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    reply
}

async fn activator(env: &Env, keys: &Path) -> Process {
    env.activator(&["--pin-cookie-keys", &keys.display().to_string(), "--debug-headers"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_cookie_keeps_a_session_on_its_pod_through_every_replica_without_a_store() {
    let env = Env::new();
    let pods = env.pods("counter-1", 3).await;
    let other = env.pods("other-1", 1).await;
    let signed = |s: Service| s.annotation(&format!("{P}sticky-session-mode"), "signed-cookie");
    env.write_topology(&yaml(&[
        signed(Service::new("counter")).revision("counter-1", 100, &addrs(&pods)),
        signed(Service::new("brief")).annotation(&format!("{P}sticky-ttl"), "1s").revision(
            "brief-1",
            100,
            &addrs(&pods),
        ),
        signed(Service::new("other")).revision("other-1", 100, &addrs(&other)),
        signed(Service::new("capped"))
            .annotation(&format!("{P}sticky-ttl"), "10s")
            .annotation(&format!("{P}sticky-max-age"), "2s")
            .revision("capped-1", 100, &addrs(&pods)),
    ]));
    let keys = env.dir.path().join("cookie-keys");
    write_keys(&keys, &[K1]);
    let (a, b) = (activator(&env, &keys).await, activator(&env, &keys).await);
    let (via_a, via_b) = (Client::new(a.addr("proxy")), Client::new(b.addr("proxy")));

    let first = get(&via_a, "counter.test", None).await;
    assert_eq!(first.header("x-activator-decision"), "new-pin");
    let cookie = pin_cookie(&first).expect("the pin travels in a cookie");
    assert!(!cookie.contains(' '), "{cookie}");
    for (n, client) in [&via_b, &via_a, &via_b, &via_a].into_iter().enumerate() {
        let reply = get(client, "counter.test", Some(&cookie)).await;
        assert_eq!((reply.pod(), reply.header("x-activator-decision")), (first.pod(), "session-pin"), "request {n}");
        assert_eq!(reply.body, format!("session=s, count={}\n", n + 2));
        assert_eq!(pin_cookie(&reply), None, "a fresh cookie is not sent again");
    }

    // Changed, foreign or garbage: refused, balanced anew, and replaced.
    let mut changed = cookie.clone().into_bytes();
    let last = changed.len() - 2;
    changed[last] = if changed[last] == b'A' { b'B' } else { b'A' };
    let changed = String::from_utf8(changed).unwrap();
    for (host, value) in
        [("counter.test", changed.as_str()), ("other.test", &cookie), ("counter.test", "activator-pin=1|2|x")]
    {
        let reply = get(&via_b, host, Some(value)).await;
        assert_eq!(reply.header("x-activator-decision"), "new-pin", "{host} {value}");
        assert!(pin_cookie(&reply).is_some_and(|c| c != value), "{host}: a new cookie replaces it");
    }

    // Expired: the one-second pin of `brief` is refused once its second is over.
    let brief = pin_cookie(&get(&via_a, "brief.test", None).await).expect("a cookie");
    wait_until(Duration::from_secs(10), "the expired cookie is refused", || async {
        get(&via_b, "brief.test", Some(&brief)).await.header("x-activator-decision") == "new-pin"
    })
    .await;

    // Capped: with sticky-max-age a pin in use ends at its age however often its cookie is
    // signed again, well before its idle lifetime of 10 s.
    let started = Instant::now();
    let mut capped = pin_cookie(&get(&via_a, "capped.test", None).await).expect("a cookie");
    let mut pace = tokio::time::interval(Duration::from_millis(200));
    let ended = loop {
        pace.tick().await;
        let reply = get(&via_b, "capped.test", Some(&capped)).await;
        if reply.header("x-activator-decision") == "new-pin" {
            break started.elapsed();
        }
        capped = pin_cookie(&reply).unwrap_or(capped);
        assert!(started.elapsed() < Duration::from_secs(8), "a pin in use outlived its max-age");
    };
    assert!(ended >= Duration::from_secs(1), "ended after {ended:?}");

    // Rotation: the new key signs first while the old one still verifies, then the old one goes.
    let only_new = env.dir.path().join("only-new-key");
    write_keys(&only_new, &[K2]);
    let checking = activator(&env, &only_new).await;
    let checker = Client::new(checking.addr("proxy"));
    write_keys(&keys, &[K2, K1]);
    wait_until(Duration::from_secs(10), "new cookies are signed with the new key", || async {
        let fresh = pin_cookie(&get(&via_a, "counter.test", None).await).expect("a cookie");
        get(&checker, "counter.test", Some(&fresh)).await.header("x-activator-decision") == "session-pin"
    })
    .await;
    assert_eq!(get(&via_b, "counter.test", Some(&cookie)).await.header("x-activator-decision"), "session-pin");
    write_keys(&keys, &[K2]);
    wait_until(Duration::from_secs(10), "the old key no longer verifies", || async {
        get(&via_a, "counter.test", Some(&cookie)).await.header("x-activator-decision") == "new-pin"
    })
    .await;
}

/// Issue 25, item 3: in signed-cookie mode, ids the client sends (`K-Session`, the service's own
/// header, its application cookie) keep their store pins, as in the default mode; the signed pin
/// cookie serves only clients without one, under its own name, never overwriting theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_cookie_mode_keeps_every_other_session_source() {
    let env = Env::new();
    let pods = env.pods("counter-1", 3).await;
    env.write_topology(&yaml(&[Service::new("counter")
        .annotation(&format!("{P}sticky-session-mode"), "signed-cookie")
        .annotation(&format!("{P}sticky-session-cookie-name"), "app")
        .revision("counter-1", 100, &addrs(&pods))]));
    let keys = env.dir.path().join("cookie-keys");
    write_keys(&keys, &[K1]);
    let activator = activator(&env, &keys).await;
    let client = Client::new(activator.addr("proxy"));
    for (header, value) in [("K-Session", "hdr"), ("Cookie", "app=mine")] {
        let mut landed = std::collections::HashSet::new();
        for n in 1..=8 {
            let reply = client.get_with("counter.test", "/incr?session_id=x", &[(header, value)]).await;
            assert_eq!(reply.status, 200);
            assert!(pin_cookie(&reply).is_none(), "{header}: an id of its own needs no pin cookie");
            let cookies: Vec<&str> =
                reply.headers.get_all("set-cookie").iter().filter_map(|v| v.to_str().ok()).collect();
            assert!(
                cookies.iter().all(|c| !c.starts_with("app=")),
                "the application's cookie is never set: {cookies:?}"
            );
            assert_eq!(
                reply.header("x-activator-decision"),
                if n == 1 { "new-pin" } else { "session-pin" },
                "{header} {n}"
            );
            landed.insert(reply.pod().to_owned());
        }
        assert_eq!(landed.len(), 1, "{header}: one pod for the session");
    }
    let without = get(&client, "counter.test", None).await;
    assert!(pin_cookie(&without).is_some(), "a client without an id gets the pin cookie");
}
