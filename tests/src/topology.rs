//! Builds topology files for tests, so each test states only what it varies.

use std::fmt::Write;
use std::net::SocketAddr;

pub struct Service {
    pub name: String,
    pub namespace: String,
    pub host: String,
    pub traffic: Vec<(String, u32)>,
    pub revisions: Vec<Revision>,
    pub annotations: Vec<(String, String)>,
}

pub struct Revision {
    pub name: String,
    /// `http` (default), `queue` or `none`.
    pub probe: &'static str,
    pub endpoints: Vec<SocketAddr>,
    pub container_concurrency: u32,
    pub timeout_seconds: u64,
    pub response_start_timeout_seconds: Option<u64>,
    pub idle_timeout_seconds: Option<u64>,
    pub annotations: Vec<(String, String)>,
}

impl Service {
    /// A service reached at `<name>.test`.
    pub fn new(name: &str) -> Self {
        Service {
            name: name.to_owned(),
            namespace: "default".to_owned(),
            host: format!("{name}.test"),
            traffic: Vec::new(),
            revisions: Vec::new(),
            annotations: Vec::new(),
        }
    }

    /// Two revisions of one pod each, split 50/50.
    pub fn halves(name: &str, a: (&str, SocketAddr), b: (&str, SocketAddr)) -> Self {
        Service::new(name).revision(a.0, 50, &[a.1]).revision(b.0, 50, &[b.1])
    }

    /// Moves the service to `namespace`, reached at `<name>.<namespace>.test`.
    pub fn in_namespace(mut self, namespace: &str) -> Self {
        self.namespace = namespace.to_owned();
        self.host = format!("{}.{namespace}.test", self.name);
        self
    }

    /// Adds a revision that receives `percent` of the split.
    pub fn revision(mut self, name: &str, percent: u32, endpoints: &[SocketAddr]) -> Self {
        self.traffic.push((name.to_owned(), percent));
        self.revisions.push(Revision {
            name: name.to_owned(),
            probe: "http",
            endpoints: endpoints.to_vec(),
            container_concurrency: 0,
            timeout_seconds: 300,
            response_start_timeout_seconds: None,
            idle_timeout_seconds: None,
            annotations: Vec::new(),
        });
        self
    }

    /// Changes the last added revision.
    pub fn with(mut self, change: impl FnOnce(&mut Revision)) -> Self {
        change(self.revisions.last_mut().expect("a revision was added"));
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.push((key.to_owned(), value.to_owned()));
        self
    }

    fn write(&self, out: &mut String) {
        let _ = writeln!(out, "  - name: {}\n    namespace: {}\n    hosts: [{}]", self.name, self.namespace, self.host);
        write_annotations(out, "    ", &self.annotations);
        out.push_str("    traffic:\n");
        for (rev, percent) in &self.traffic {
            let _ = writeln!(out, "      - {{revision: {rev}, percent: {percent}}}");
        }
        out.push_str("    revisions:\n");
        for rev in &self.revisions {
            let endpoints: Vec<String> = rev.endpoints.iter().map(|e| format!("\"{e}\"")).collect();
            let _ = writeln!(
                out,
                "      - name: {}\n        probe: {}\n        containerConcurrency: {}\n        timeoutSeconds: {}\n        endpoints: [{}]",
                rev.name,
                rev.probe,
                rev.container_concurrency,
                rev.timeout_seconds,
                endpoints.join(", ")
            );
            for (key, value) in [
                ("responseStartTimeoutSeconds", rev.response_start_timeout_seconds),
                ("idleTimeoutSeconds", rev.idle_timeout_seconds),
            ] {
                if let Some(value) = value {
                    let _ = writeln!(out, "        {key}: {value}");
                }
            }
            write_annotations(out, "        ", &rev.annotations);
        }
    }
}

fn write_annotations(out: &mut String, indent: &str, annotations: &[(String, String)]) {
    if annotations.is_empty() {
        return;
    }
    let _ = writeln!(out, "{indent}annotations:");
    for (k, v) in annotations {
        let _ = writeln!(out, "{indent}  {k}: \"{v}\"");
    }
}

pub fn yaml(services: &[Service]) -> String {
    let mut out = String::from("services:\n");
    for svc in services {
        svc.write(&mut out);
    }
    out
}
