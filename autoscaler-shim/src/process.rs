//! The `process` backend: a revision's pods are local processes started from a command template
//! (demo-service by default) on free loopback ports. Their endpoints are published to the
//! activator through an endpoints file, replaced atomically on every change. A pod leaving is
//! unpublished first and stopped `STOP_DELAY` later, so the activator stops sending before the
//! process stops listening.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Longer than the activator's endpoints-file poll interval.
const STOP_DELAY: Duration = Duration::from_secs(1);
const START_DEADLINE: Duration = Duration::from_secs(30);
const STOP_DEADLINE: Duration = Duration::from_secs(30);

struct Pod {
    addr: SocketAddr,
    child: Child,
}

pub struct ProcessBackend {
    /// Program and arguments; `{listen}`, `{pod}`, `{revision}` and `{namespace}` are replaced.
    command: Vec<String>,
    endpoints_file: PathBuf,
    pods: BTreeMap<(String, String), Vec<Pod>>,
    started: u64,
}

impl ProcessBackend {
    pub fn new(command: Vec<String>, endpoints_file: PathBuf) -> anyhow::Result<Self> {
        if command.is_empty() {
            bail!("--command is empty");
        }
        let backend = ProcessBackend { command, endpoints_file, pods: BTreeMap::new(), started: 0 };
        backend.publish()?;
        Ok(backend)
    }

    pub fn current(&self, namespace: &str, revision: &str) -> u32 {
        self.pods.get(&(namespace.to_owned(), revision.to_owned())).map_or(0, |p| p.len() as u32)
    }

    pub async fn scale(&mut self, namespace: &str, revision: &str, replicas: u32) -> anyhow::Result<()> {
        let key = (namespace.to_owned(), revision.to_owned());
        while self.current(namespace, revision) < replicas {
            let pod = self.start(namespace, revision).await?;
            self.pods.entry(key.clone()).or_default().push(pod);
            // Publish each pod as it comes, so the first one serves as soon as it is ready.
            self.publish()?;
        }
        let pods = self.pods.entry(key).or_default();
        if pods.len() > replicas as usize {
            let leaving = pods.split_off(replicas as usize);
            self.publish()?;
            for pod in leaving {
                tokio::spawn(stop(pod));
            }
        }
        Ok(())
    }

    async fn start(&mut self, namespace: &str, revision: &str) -> anyhow::Result<Pod> {
        self.started += 1;
        let name = format!("{revision}-{}", self.started);
        let args: Vec<String> = self
            .command
            .iter()
            .map(|a| {
                a.replace("{listen}", "127.0.0.1:0")
                    .replace("{pod}", &name)
                    .replace("{revision}", revision)
                    .replace("{namespace}", namespace)
            })
            .collect();
        let mut command = Command::new(&args[0]);
        command.args(&args[1..]).stdin(Stdio::null()).stdout(Stdio::piped()).kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe, which is all a pre_exec hook may call. It makes the
        // pod die with the shim even when the shim is killed outright.
        unsafe {
            command.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from));
        }
        let mut child = command.spawn().with_context(|| format!("starting {}", args[0]))?;
        let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        let listening = tokio::time::timeout(START_DEADLINE, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(addr) = line.strip_prefix("listening http ") {
                    return Ok(addr.trim().parse::<SocketAddr>()?);
                }
            }
            bail!("exited before printing `listening http <addr>`")
        });
        let addr = listening.await.context("waiting for the pod to listen")??;
        // Keep reading so a chatty pod never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        tracing::info!(pod = %name, %addr, "pod started");
        Ok(Pod { addr, child })
    }

    /// Writes every revision's endpoints to the endpoints file, by rename so the activator never
    /// reads half a file.
    fn publish(&self) -> anyhow::Result<()> {
        let endpoints: BTreeMap<String, Vec<SocketAddr>> = (self.pods.iter())
            .filter(|(_, pods)| !pods.is_empty())
            .map(|((ns, rev), pods)| (format!("{ns}/{rev}"), pods.iter().map(|p| p.addr).collect()))
            .collect();
        let text = serde_yaml_ng::to_string(&endpoints)?;
        let tmp = self.endpoints_file.with_extension("tmp");
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.endpoints_file)
            .with_context(|| format!("replacing {}", self.endpoints_file.display()))?;
        Ok(())
    }

    /// Unpublishes and stops every pod.
    pub async fn shutdown(&mut self) {
        let pods = std::mem::take(&mut self.pods);
        if let Err(e) = self.publish() {
            tracing::warn!(error = %e, "could not clear the endpoints file");
        }
        futures_util::future::join_all(pods.into_values().flatten().map(stop)).await;
    }
}

/// SIGTERM after the activator has let go, then SIGKILL if the pod does not exit.
async fn stop(mut pod: Pod) {
    tokio::time::sleep(STOP_DELAY).await;
    if let Some(pid) = pod.child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    if tokio::time::timeout(STOP_DEADLINE, pod.child.wait()).await.is_err() {
        let _ = pod.child.kill().await;
    }
    tracing::info!(addr = %pod.addr, "pod stopped");
}
