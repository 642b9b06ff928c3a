//! A real HAProxy on loopback in front of activators, as a Kubernetes Service is in front of
//! their pods: it checks each activator's `/readyz` on its admin port and sends requests only to
//! those that pass, and retries a request no activator answered on another one.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::wait_until;

pub struct Haproxy {
    pub addr: SocketAddr,
    _child: Child,
}

/// An activator as HAProxy sees it: where it serves, and where it says whether it is ready.
pub struct Backend {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
}

impl Haproxy {
    /// Whether `haproxy` is installed (`just deps` installs it where it can).
    pub fn installed() -> bool {
        std::process::Command::new("haproxy").arg("-v").output().is_ok_and(|out| out.status.success())
    }

    pub async fn start(dir: &Path, backends: &[Backend]) -> Haproxy {
        let addr = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port");
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, b)| format!("    server activator-{i} {} check port {}\n", b.proxy, b.admin.port()))
            .collect();
        // Checks every 100 ms, one failure takes a server out and one success brings it back:
        // an activator that starts draining is out before it stops accepting connections.
        let config = format!(
            "global\n    maxconn 4096\n\
             defaults\n    mode http\n    timeout connect 1s\n    timeout client 30s\n    timeout server 30s\n\
             \x20   retries 3\n    option redispatch\n    retry-on conn-failure empty-response\n\
             frontend activators\n    bind {addr}\n    default_backend activators\n\
             backend activators\n    balance roundrobin\n    option httpchk GET /readyz\n\
             \x20   http-check expect status 200\n    default-server inter 100ms fall 1 rise 1\n{servers}"
        );
        let path = dir.join(format!("haproxy-{}.cfg", addr.port()));
        std::fs::write(&path, config).expect("writing the HAProxy configuration");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("haproxy-{}.log", addr.port()))).expect("a log file"))
            .kill_on_drop(true)
            .spawn()
            .expect("haproxy is not installed: run `just deps` (Debian/Ubuntu: apt-get install haproxy)");
        wait_until(Duration::from_secs(10), "HAProxy accepts connections", || async {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await;
        Haproxy { addr, _child: child }
    }
}
