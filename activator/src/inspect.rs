//! `activator pins get|list|delete|drain`: lets an operator read, delete and move pins in the
//! shared Redis table, where keys are hashes of the ids and cannot be found by eye. Must not route
//! anything.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::config::{PinSelector, PinsAction};
use crate::pins::{
    DRAINED_POD, Deployment, PinKey, PinKind, RedisClient, RedisTls, delete_pin, drain_pod, key_report, pin_targets,
};

/// How long the command waits for each of Redis's answers.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn run(
    action: PinsAction,
    redis_url: Option<String>,
    tls: &RedisTls,
    deployment: Deployment,
) -> anyhow::Result<ExitCode> {
    let url = redis_url.context("activator pins needs --redis-url (or REDIS_URL): the Redis the activators share")?;
    let client = RedisClient::new(&url, &deployment, tls)?;
    let mut conn = client.connect(ANSWER_TIMEOUT).await.context("connecting to Redis")?;
    match action {
        PinsAction::Get(selector) => {
            let key = selector.key().to_string();
            match key_report(&mut conn, &key).await? {
                Some(report) => {
                    println!("{report}");
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    println!("key    {key}\nno pin");
                    Ok(ExitCode::from(1))
                }
            }
        }
        PinsAction::List { namespace, service } => {
            let pattern = PinKey::service_pattern(&namespace, &service);
            let mut keys = conn.scan_one_slot(&pattern).await?;
            keys.sort();
            for key in &keys {
                if let Some(report) = key_report(&mut conn, key).await? {
                    println!("{report}\n");
                }
            }
            println!("{} pins for {namespace}/{service}", keys.len());
            // Sessions per pod, what a scale-down of that pod would move.
            let mut by_pod: BTreeMap<(String, String), usize> = BTreeMap::new();
            for (pin, _) in pin_targets(&mut conn, &keys).await?.into_iter().flatten() {
                if let Some(pod) = pin.pod.filter(|p| *p != DRAINED_POD) {
                    *by_pod.entry((pin.revision.to_string(), pod.to_string())).or_default() += 1;
                }
            }
            for ((revision, pod), n) in by_pod {
                println!("{revision} {pod} {n} sessions");
            }
            Ok(ExitCode::SUCCESS)
        }
        PinsAction::Delete(selector) => {
            let key = selector.key().to_string();
            let deleted = delete_pin(&mut conn, &key).await?;
            if !deleted {
                println!("no pin at {key}");
                return Ok(ExitCode::from(1));
            }
            println!("deleted {key}");
            Ok(ExitCode::SUCCESS)
        }
        PinsAction::Drain { namespace, service, pod, to } => {
            let keys = conn.scan_one_slot(&PinKey::service_pattern(&namespace, &service)).await?;
            let drained = drain_pod(&mut conn, &keys, pod, &to).await?;
            let moved: usize = drained.moved.values().sum();
            if moved == 0 {
                println!("moved no session of {namespace}/{service} off {pod}");
            } else {
                let places: Vec<String> = drained.moved.iter().map(|(pod, n)| format!("{n} to {pod}")).collect();
                println!("moved {moved} sessions of {namespace}/{service} off {pod}: {}", places.join(", "));
            }
            if drained.released > 0 {
                println!(
                    "released {} sessions of {namespace}/{service} off {pod}: no other pod of their revision holds \
                     pins, so each is placed anew on its next request, possibly on {pod} again while it serves; \
                     name the pods to move them to with --to",
                    drained.released
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

impl PinSelector {
    fn key(&self) -> PinKey {
        let scope: Arc<str> = format!("{}/{}", self.namespace, self.service).into();
        match (&self.session, &self.flow) {
            (Some(session), _) => PinKey::new(&scope, PinKind::Session, session.as_bytes()),
            (None, Some(flow)) => PinKey::new(&scope, PinKind::Flow, flow.as_bytes()),
            (None, None) => unreachable!("clap requires --session or --flow"),
        }
    }
}
