#!/usr/bin/env bash
# Installs what `just test` needs and this machine lacks, with apt-get (through sudo when not
# root). Tools a test cannot do without are required: when they cannot be installed, this says in
# one line how to get them and fails, so `just test` stops there rather than in a hundred tests.
# Optional tools only enable more tests (those skip with a printed reason without them).
#
#   tests/deps.sh            install what is missing
#   tests/deps.sh --dry-run  say what would be installed, and how, without doing it
set -euo pipefail

dry_run=false
[[ "${1:-}" == "--dry-run" ]] && dry_run=true

# tool:Debian package
required=(redis-server:redis-server redis-cli:redis-server)
optional=(kubectl:kubectl haproxy:haproxy)

missing_tools=()
missing_packages=()
add() {
    missing_tools+=("$1")
    [[ " ${missing_packages[*]} " == *" $2 "* ]] || missing_packages+=("$2")
}
for entry in "${required[@]}"; do
    command -v "${entry%%:*}" >/dev/null 2>&1 || add "${entry%%:*}" "${entry##*:}"
done
required_packages=("${missing_packages[@]}")
for entry in "${optional[@]}"; do
    command -v "${entry%%:*}" >/dev/null 2>&1 || add "${entry%%:*}" "${entry##*:}"
done

if ((${#missing_tools[@]} == 0)); then
    echo "test dependencies: all present"
    exit 0
fi

sudo=""
how=""
if ! command -v apt-get >/dev/null 2>&1; then
    how="no apt-get here"
elif [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo="sudo"
    else
        how="not root and sudo needs a password"
    fi
fi

if [[ -n "$how" ]]; then
    echo "test dependencies: missing ${missing_tools[*]}, and cannot install them ($how)."
    if ((${#required_packages[@]})); then
        echo "Install the Redis 7 server and CLI (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis), then run just test again."
        $dry_run || exit 1
    fi
    exit 0
fi

echo "test dependencies: installing ${missing_packages[*]} (for ${missing_tools[*]}) with ${sudo:+sudo }apt-get"
$dry_run && exit 0
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# Optional packages (kubectl for the manifest tests, haproxy for the rolling restart) may not exist
# in every release (kubectl is not in Debian 12): install them one by one so a missing one does not
# stop the others. Debian starts haproxy as a service on install where it can; the test runs its
# own on loopback, so the service is stopped.
$sudo apt-get install -y -qq --no-install-recommends "${required_packages[@]}" >/dev/null
for package in "${missing_packages[@]}"; do
    [[ " ${required_packages[*]} " == *" $package "* ]] && continue
    $sudo apt-get install -y -qq --no-install-recommends "$package" >/dev/null 2>&1 \
        || echo "test dependencies: $package is not available here; the tests that need it are skipped"
done
$sudo service haproxy stop >/dev/null 2>&1 || true
