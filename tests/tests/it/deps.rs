//! `tests/deps.sh`, which `just test` runs first: it finds what is missing on PATH and says what
//! it would install, or how to get it when it cannot install.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deps.sh")
}

/// Runs the script with `--dry-run` and only `tools` (scripts that do nothing) on PATH; `id` is
/// there to say the user is root.
fn dry_run(tools: &[&str]) -> (bool, String) {
    let bin = tempfile::tempdir().unwrap();
    for tool in tools {
        let path = bin.path().join(tool);
        let body = if *tool == "id" { "#!/bin/sh\necho 0\n" } else { "#!/bin/sh\n" };
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let bash = ["/bin/bash", "/usr/bin/bash"].into_iter().find(|b| Path::new(b).exists()).expect("bash");
    let out = Command::new(bash).arg(script()).arg("--dry-run").env("PATH", bin.path()).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn missing_redis_is_named_with_how_to_get_it() {
    let (ok, said) = dry_run(&["id"]);
    assert!(ok, "{said}");
    assert!(said.contains("missing redis-server redis-cli"), "{said}");
    assert!(said.contains("no apt-get here"), "{said}");
    assert!(said.contains("sudo apt-get install redis-server"), "a one-line instruction: {said}");
    assert!(!said.contains("panicked"), "{said}");
}

#[test]
fn with_apt_it_says_what_it_would_install() {
    let (ok, said) = dry_run(&["apt-get", "id", "redis-cli"]);
    assert!(ok, "{said}");
    assert!(said.contains("installing redis-server kubectl haproxy (for redis-server kubectl haproxy)"), "{said}");
}

#[test]
fn nothing_to_do_when_everything_is_there() {
    let (ok, said) = dry_run(&["redis-server", "redis-cli", "kubectl", "haproxy"]);
    assert!(ok && said.trim() == "test dependencies: all present", "{said}");
}
