//! A real `redis-server` on a free loopback port, that tests can kill and bring back on the same
//! port, and talk to with `redis-cli`.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::wait_until;

pub struct Redis {
    port: u16,
    log: std::path::PathBuf,
    child: Option<Child>,
}

impl Redis {
    pub async fn start(dir: &Path) -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let mut redis = Redis { port, log: dir.join(format!("redis-{port}.log")), child: None };
        redis.restart().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again, on the same port, empty) and waits until it answers.
    pub async fn restart(&mut self) {
        let log = std::fs::File::create(&self.log).expect("redis log");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--enable-debug-command",
                "local",
            ])
            .stdout(log)
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is not installed: run `just deps` (Debian/Ubuntu: apt-get install redis-server)");
        self.child = Some(child);
        let port = self.port;
        wait_until(Duration::from_secs(10), "redis-server answers PING", || async move { ping(port).await }).await;
    }

    /// Kills the server outright, as a crash would.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("killing redis-server");
        }
    }

    /// Runs `redis-cli` against this server and returns its output.
    pub async fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .arg("-p")
            .arg(self.port.to_string())
            .args(args)
            .output()
            .await
            .expect("redis-cli is not installed: run `just deps` (Debian/Ubuntu: apt-get install redis-server)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Calls of one command so far (`INFO commandstats`).
    pub async fn calls(&self, command: &str) -> u64 {
        self.command_calls().await.get(command).copied().unwrap_or(0)
    }

    /// Calls of every command run so far, by lower-case name (`INFO commandstats`).
    pub async fn command_calls(&self) -> HashMap<String, u64> {
        parse_command_calls(&self.cli(&["INFO", "commandstats"]).await)
    }
}

/// `cmdstat_<name>:calls=<n>,…` lines of `INFO commandstats`.
pub fn parse_command_calls(info: &str) -> HashMap<String, u64> {
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(":calls=")?;
            Some((name.to_owned(), rest.split(',').next()?.parse().ok()?))
        })
        .collect()
}

async fn ping(port: u16) -> bool {
    let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)).await else { return false };
    let mut reply = [0u8; 7];
    conn.write_all(b"PING\r\n").await.is_ok() && conn.read_exact(&mut reply).await.is_ok() && &reply == b"+PONG\r\n"
}
