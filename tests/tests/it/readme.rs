//! The README's local walk-through, run as a person pastes it: every `console` block marked
//! `<!-- tested: local walk-through` is read from README.md, each `$ ` line is run in one shell
//! (so `&` and `jobs` work as they do for a person) and what it prints is compared with the lines
//! under it, `…` standing for text that varies. When the README drifts from what the binaries
//! do, this fails.
//!
//! Two liberties: `cargo build` is not run again (`just test` has built the binaries), and
//! `target/debug/` is the harness's binary directory, which is the same unless `AA_BIN_DIR` says
//! otherwise.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use integration_tests::bin_dir;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::sync::mpsc;

const MARK: &str = "<!-- tested: local walk-through";
/// How long one command may take to print what the README says it prints.
const ANSWER_DEADLINE: Duration = Duration::from_secs(30);

/// One `$ ` line and the lines the README shows under it.
#[derive(Debug)]
struct Step {
    command: String,
    expected: Vec<String>,
}

/// The steps of every marked block, in order.
fn walk_through(readme: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        if !line.starts_with(MARK) {
            continue;
        }
        assert_eq!(lines.next(), Some("```console"), "a marked block is a console block");
        for line in lines.by_ref().take_while(|l| *l != "```") {
            match line.strip_prefix("$ ") {
                Some(command) => steps.push(Step { command: command.to_owned(), expected: Vec::new() }),
                None => steps.last_mut().expect("a block starts with a command").expected.push(line.to_owned()),
            }
        }
    }
    steps
}

/// Whether `line` reads as `pattern`, where each `…` stands for any text.
fn matches(pattern: &str, line: &str) -> bool {
    let parts: Vec<&str> = pattern.split('…').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if parts.len() == 1 {
        return line == pattern;
    }
    if !line.starts_with(first) || line.len() < first.len() + last.len() || !line.ends_with(last) {
        return false;
    }
    let mut rest = &line[first.len()..line.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// The shell the steps run in, and everything it started, killed together when dropped.
struct Shell {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: mpsc::UnboundedReceiver<String>,
}

impl Drop for Shell {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

impl Shell {
    fn start(dir: &Path, log: &Path) -> Shell {
        let mut child = tokio::process::Command::new("bash")
            .args(["--norc", "--noprofile", "-s"])
            .current_dir(dir)
            .env_remove("REDIS_URL")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("bash starts");
        let stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (tx, stdout) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Shell { child, stdin, stdout }
    }

    async fn send(&mut self, text: &str) {
        self.stdin.write_all(text.as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
    }

    async fn line(&mut self, waiting_for: &str, logs: &Path) -> String {
        match tokio::time::timeout(ANSWER_DEADLINE, self.stdout.recv()).await {
            Ok(Some(line)) => line,
            _ => panic!("no answer to `{waiting_for}`; logs:\n{}", std::fs::read_to_string(logs).unwrap_or_default()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_local_walk_through_works_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let steps = walk_through(&std::fs::read_to_string(root.join("README.md")).unwrap());
    assert!(steps.len() >= 10, "the walk-through is found: {steps:?}");
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("stderr.log");
    let mut shell = Shell::start(root, &log);
    let bins = format!("{}/", bin_dir().display());
    for step in &steps {
        if step.command.starts_with("cargo build") {
            continue;
        }
        let command = step.command.replace("target/debug/", &bins);
        if command.ends_with('&') {
            // A server: it answers with its `listening` lines, whenever it gets to them.
            shell.send(&format!("{command}\n")).await;
            for expected in &step.expected {
                let line = shell.line(&step.command, &log).await;
                assert!(matches(expected, &line), "`{}` printed {line:?}, the README says {expected:?}", step.command);
            }
            continue;
        }
        shell.send(&format!("{command}\nprintf '\\n#done %s\\n' $?\n")).await;
        let mut printed = Vec::new();
        let status = loop {
            let line = shell.line(&step.command, &log).await;
            match line.strip_prefix("#done ") {
                Some(status) => break status.to_owned(),
                None if line.is_empty() => {}
                None => printed.push(line),
            }
        };
        assert_eq!(status, "0", "`{}` failed: {printed:?}", step.command);
        let agrees = printed.len() == step.expected.len()
            && printed.iter().zip(&step.expected).all(|(line, expected)| matches(expected, line));
        assert!(
            agrees,
            "`{}` printed\n{}\nthe README says\n{}",
            step.command,
            printed.join("\n"),
            step.expected.join("\n")
        );
    }
}

#[test]
fn an_ellipsis_stands_for_any_text_and_nothing_else_varies() {
    assert!(matches("ttl    …s", "ttl    86399.5s"));
    assert!(matches("value  counter-00001 127.0.0.1:808… …", "value  counter-00001 127.0.0.1:8082 1764748800000"));
    assert!(!matches("ttl    …s", "ttl    none"));
    assert!(!matches("session=abc, count=2", "session=abc, count=1"));
    assert!(matches("a…b…c", "a-b-c") && !matches("a…b…c", "a-c-b"));
}
