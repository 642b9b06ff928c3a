//! What a new user meets in the first minutes: every mistake on the command line, in a key file or
//! in a topology is said in one plain line that names the flag or the file; no backtrace, no JSON
//! log record, nothing said twice.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use integration_tests::bin_dir;

/// Runs one of our binaries to its end (it must end by itself: every case is refused at start)
/// and returns its first line on stderr, after checking that the process failed and said nothing
/// else but clap's pointer to `--help`.
fn refused(bin: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut command = Command::new(bin_dir().join(bin));
    command.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    // As on a fresh shell: none of the variables that would answer for a missing flag.
    command.env_remove("RUST_BACKTRACE").env_remove("REDIS_URL").env_remove("KUBECONFIG").envs(env.iter().copied());
    let child = command.spawn().expect("the binary starts");
    let out = wait_with_deadline(child, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{bin} {args:?} must be refused: {stderr}");
    let mut lines = stderr.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next().unwrap_or_default().to_owned();
    let rest: Vec<&str> = lines.collect();
    assert!(first.starts_with("error: "), "a plain error line: {stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
    assert!(!first.contains("{\""), "not a JSON log record: {stderr}");
    assert!(rest.iter().all(|l| l.starts_with("For more information")), "one line: {stderr}");
    first
}

fn wait_with_deadline(mut child: std::process::Child, within: Duration) -> std::process::Output {
    let deadline = std::time::Instant::now() + within;
    loop {
        if child.try_wait().expect("waiting for the binary").is_some() {
            return child.wait_with_output().expect("its output");
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running after {within:?}: {:?}", child.wait_with_output().map(|o| o.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

const TOPOLOGY: &str = "services:
  - name: counter
    hosts: [counter.localhost]
    traffic: [{revision: counter-1, percent: 100}]
    revisions: [{name: counter-1}]
";

/// Flags the activator takes on the data port and admin port of its own, so a case that would be
/// accepted does not collide with anything.
const LOOPBACK: [&str; 4] = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];

#[test]
fn the_activators_bad_flags_are_one_line_each() {
    let worker = refused("activator", &["--worker-threads", "0"], &[]);
    assert!(worker.contains("'--worker-threads <WORKER_THREADS>'") && worker.contains("zero"), "{worker}");
    let size = refused("activator", &["--max-queue-bytes", "lots"], &[]);
    assert!(size.contains("--max-queue-bytes") && size.contains("64MiB"), "{size}");
    let switch = refused("activator", &[], &[("ACTIVATOR_DEBUG_HEADERS", "maybe")]);
    assert!(switch.contains("maybe") && switch.contains("--debug-headers"), "{switch}");
}

#[test]
fn sizes_with_units_and_switches_as_people_write_them_are_taken() {
    let dir = tempfile::tempdir().unwrap();
    // Accepted flags, then a topology that does not exist: the refusal names the topology, so
    // everything before it was taken.
    let mut args = vec!["--max-queue-bytes", "64MiB", "--max-queue-bytes-total", "1 GiB", "--topology"];
    let missing = dir.path().join("nope.yaml").display().to_string();
    args.push(&missing);
    args.extend(LOOPBACK);
    for yes in ["1", "yes", "on", "true"] {
        let said = refused("activator", &args, &[("ACTIVATOR_DEBUG_HEADERS", yes), ("ACTIVATOR_REQUEST_LOG", "0")]);
        assert!(said.contains(&format!("reading topology {missing}")), "{yes}: {said}");
    }
}

#[test]
fn key_files_that_hold_no_key_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let topology = write(dir.path(), "topology.yaml", TOPOLOGY);
    let short = write(dir.path(), "cookie-keys", "too-short\n");
    let mut args = vec!["--topology", &topology, "--pin-cookie-keys", &short];
    args.extend(LOOPBACK);
    let said = refused("activator", &args, &[]);
    assert!(said.contains(&format!("--pin-cookie-keys {short}")) && said.contains("shorter than 32 bytes"), "{said}");

    let not_pem = write(dir.path(), "client.key", "not a key\n");
    let cert = write(dir.path(), "client.crt", "not a certificate\n");
    let mut args = vec!["--topology", &topology, "--redis-url", "rediss://127.0.0.1:1"];
    args.extend(["--redis-client-cert", &cert, "--redis-client-key", &not_pem]);
    args.extend(LOOPBACK);
    let said = refused("activator", &args, &[]);
    assert!(said.contains(&format!("--redis-client-cert {cert}: no PEM certificate")), "{said}");
    assert_eq!(said.matches(&cert).count(), 1, "said once: {said}");
}

#[test]
fn topologies_kubernetes_would_refuse_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("", "the file is empty"),
        (
            "services:\n  - name: counter\n    hosts: [\"http://x:8080/\"]\n    traffic: [{revision: counter-1, percent: 100}]\n    revisions: [{name: counter-1}]\n",
            "can never match a Host header",
        ),
        (
            "services:\n  - name: counter\n    traffic: [{revision: a, percent: 50, tag: t}, {revision: b, percent: 50, tag: t}]\n    revisions: [{name: a}, {name: b}]\n",
            "tag t is given twice",
        ),
        (
            "services:\n  - name: counter\n    traffic: [{revision: a, percent: 50}, {revision: a, percent: 50}]\n    revisions: [{name: a}]\n",
            "lists revision a twice",
        ),
        (
            "services:\n  - name: Counter_1\n    traffic: [{revision: a, percent: 100}]\n    revisions: [{name: a}]\n",
            "not a name Kubernetes accepts",
        ),
    ];
    for (i, (text, needle)) in cases.into_iter().enumerate() {
        let path = write(dir.path(), &format!("topology-{i}.yaml"), text);
        let mut args = vec!["--topology", &path];
        args.extend(LOOPBACK);
        let said = refused("activator", &args, &[]);
        assert!(said.contains(&format!("topology {path}")) && said.contains(needle), "{needle}: {said}");
    }
}

#[test]
fn activator_pins_says_what_it_needs_in_a_sentence() {
    let said = refused("activator", &["pins", "list", "--service", "counter"], &[]);
    assert_eq!(said, "error: activator pins needs --redis-url (or REDIS_URL): the Redis the activators share");
}

#[test]
fn the_shims_bad_flags_are_one_line_each() {
    let dir = tempfile::tempdir().unwrap();
    let endpoints = dir.path().join("endpoints.yaml").display().to_string();
    let base = ["--listen", "127.0.0.1:0", "--endpoints-file", &endpoints];
    fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [base, extra].concat()
    }
    let target = refused("autoscaler-shim", &with(&base, &["--target", "0"]), &[]);
    assert!(target.contains("--target") && target.contains("above zero"), "{target}");
    let window = refused("autoscaler-shim", &with(&base, &["--window", "0s"]), &[]);
    assert!(window.contains("--window") && window.contains("longer than zero"), "{window}");
    let scales = refused("autoscaler-shim", &with(&base, &["--min-scale", "5", "--max-scale", "2"]), &[]);
    assert_eq!(scales, "error: --min-scale 5 is above --max-scale 2");
    let missing = dir.path().join("nope.yaml").display().to_string();
    let topology = refused("autoscaler-shim", &with(&base, &["--topology", &missing]), &[]);
    assert!(topology.contains(&format!("reading --topology {missing}")), "{topology}");
    let kubeconfig = dir.path().join("kubeconfig").display().to_string();
    let env = [("KUBECONFIG", kubeconfig.as_str())];
    let kube = refused("autoscaler-shim", &["--listen", "127.0.0.1:0", "--backend", "kubernetes"], &env);
    assert_eq!(kube.matches(&kubeconfig).count(), 1, "said once: {kube}");
    assert!(kube.len() < 400, "{kube}");
}

/// A start that works says only what matters: a Redis named beside the memory store is said to
/// be ignored, and nothing is a Rust `Debug` dump.
#[tokio::test]
async fn a_good_start_says_what_is_ignored_and_dumps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let topology = write(dir.path(), "topology.yaml", TOPOLOGY);
    let mut args: Vec<String> =
        ["--topology", &topology, "--pin-store", "memory", "--redis-url", "redis://127.0.0.1:1"]
            .map(str::to_owned)
            .to_vec();
    args.extend(LOOPBACK.map(str::to_owned));
    let activator =
        integration_tests::Process::start(dir.path(), "activator", &args, &["proxy", "admin"]).await.unwrap();
    let logs = activator.logs();
    assert!(logs.contains("--redis-url is ignored: --pin-store memory keeps pins in this replica only"), "{logs}");
    assert!(!logs.contains(" { ") && !logs.contains("None"), "no Debug dump: {logs}");
}

/// Ctrl-C in local mode: the drain is short by default, and a second Ctrl-C ends it at once even
/// when the drain was set long.
#[tokio::test]
async fn ctrl_c_stops_local_mode_soon_and_twice_stops_it_now() {
    use nix::sys::signal::Signal;
    let dir = tempfile::tempdir().unwrap();
    let topology = write(dir.path(), "topology.yaml", TOPOLOGY);
    let start = |extra: &[&str]| {
        let mut args: Vec<String> = ["--topology", topology.as_str()].map(str::to_owned).to_vec();
        args.extend(LOOPBACK.iter().chain(extra).map(|a| (*a).to_owned()));
        let dir = dir.path().to_owned();
        async move { integration_tests::Process::start(&dir, "activator", &args, &["proxy", "admin"]).await.unwrap() }
    };

    let mut default = start(&[]).await;
    default.signal(Signal::SIGINT);
    assert!(default.wait_exit(Duration::from_secs(15)).await.success(), "{}", default.logs());

    let mut long = start(&["--drain-period", "10m"]).await;
    long.signal(Signal::SIGINT);
    integration_tests::wait_until(Duration::from_secs(10), "the drain has begun", || async {
        long.logs().contains("a second Ctrl-C exits now")
    })
    .await;
    long.signal(Signal::SIGINT);
    let status = long.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(130), "{}", long.logs());
    assert!(long.logs().contains("second signal: exiting now"), "{}", long.logs());
}

/// `just demo --keep`: the walk-through shows two activators sharing pins through Redis, then
/// leaves everything running so the curls it printed still work, and Ctrl-C (SIGINT to the
/// terminal's process group) stops all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_shows_shared_pins_and_keeps_running_until_ctrl_c() {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    use tokio::io::AsyncBufReadExt as _;

    let mut demo = tokio::process::Command::new(bin_dir().join("demo"))
        .arg("--keep")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .expect("the demo starts");
    let group = Pid::from_raw(demo.id().expect("running") as i32);
    let mut lines = tokio::io::BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let keeps_running = line.contains("Everything keeps running");
            printed.push(line);
            if keeps_running {
                return true;
            }
        }
        false
    };
    let kept = tokio::time::timeout(Duration::from_secs(180), read).await;
    let text = printed.join("\n");
    assert!(matches!(kept, Ok(true)), "the demo reaches --keep:\n{text}");
    assert!(
        text.contains("== Two more activators, A and B, sharing their pins through a Redis of their own"),
        "{text}"
    );
    assert!(text.contains("(new-pin): session=shared, count=1"), "{text}");
    for count in 2..=4 {
        assert!(
            text.contains(&format!("(session-pin): session=shared, count={count}")),
            "one pod through A and B: {text}"
        );
    }
    assert!(text.contains("(re-pin): session=shared, count=1"), "a pod leaving re-pins: {text}");
    assert!(text.contains("key    aa:{default/counter}:s:"), "activator pins get: {text}");

    // The last curl printed (through activator B) still works, and continues the session.
    let last = printed.iter().rev().find(|l| l.contains("session_id=shared")).expect("a shared curl");
    let url = last.split('\'').find(|part| part.starts_with("http://")).expect("a URL");
    let reply = reqwest::Client::new().get(url).header("Host", "counter.localhost").send().await.unwrap();
    assert_eq!(reply.status(), 200);
    let body = reply.text().await.unwrap();
    assert!(body.starts_with("session=shared, count=") && !body.contains("count=1\n"), "{body}");

    killpg(group, Signal::SIGINT).expect("Ctrl-C");
    let status = tokio::time::timeout(Duration::from_secs(15), demo.wait()).await.expect("the demo ends").unwrap();
    assert!(status.success(), "{status}");
    integration_tests::wait_until(Duration::from_secs(10), "nothing the demo started survives it", || async {
        killpg(group, None).is_err()
    })
    .await;
}
