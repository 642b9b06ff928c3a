//! Two activator replicas sharing pins through one real `redis-server`, in front of demo pods of
//! one revision: the fixture of every test about what replicas agree on. The caller says how many
//! pods and writes the topology over them; the replicas start once Redis answers them.

use std::net::SocketAddr;

use crate::redis::Redis;
use crate::{Client, Env, Process, activator_pins, addrs};

pub struct Replicas {
    pub env: Env,
    pub redis: Redis,
    /// The pods of the revision, named `<revision>-pod-<i>` by their answers.
    pub pods: Vec<Process>,
    pub a: Process,
    pub b: Process,
    pub via_a: Client,
    pub via_b: Client,
}

impl Replicas {
    /// `pods` pods of `revision`, the topology `topology` writes over their addresses, and two
    /// activators with `flags` (beyond `--pin-store redis` and `--debug-headers`).
    pub async fn start(
        revision: &str,
        pods: usize,
        topology: impl FnOnce(&[SocketAddr]) -> String,
        flags: &[&str],
    ) -> Replicas {
        let env = Env::new();
        let redis = Redis::start(env.dir.path()).await;
        let pods = env.pods(revision, pods).await;
        env.write_topology(&topology(&addrs(&pods)));
        let a = env.shared_activator_with(&redis, flags).await;
        let b = env.shared_activator_with(&redis, flags).await;
        let (via_a, via_b) = (Client::new(a.addr("proxy")), Client::new(b.addr("proxy")));
        Replicas { env, redis, pods, a, b, via_a, via_b }
    }

    /// `activator pins <args>` against the replicas' Redis: whether it succeeded, and its output.
    pub async fn pins(&self, args: &[&str]) -> (bool, String) {
        let url = self.redis.url();
        let (ok, out, _) = activator_pins(&[args, &["--redis-url", &url]].concat()).await;
        (ok, out)
    }
}
