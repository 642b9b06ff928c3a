# affinity-activator tasks. `just demo` and `just test` are the quick start.

set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes.
default:
    @just --list

# Build every binary of the workspace (debug).
build:
    cargo build --workspace --bins

# Walk through the activator in local mode: starts what it needs (two activators share pins through a Redis of their own), prints each request as a curl command with its answer, and stops everything; `just demo --keep` leaves it all running until Ctrl-C.
demo *flags: deps build
    cargo run --quiet -p integration-tests --bin demo -- {{flags}}

# Build and push the image (REGISTRY; with docker buildx) and render target/release-VERSION/affinity-activator.yaml and affinity-activator-redis.yaml, every image pinned by digest; without a container runtime, IMAGE=…@sha256:… (and REDIS_IMAGE) render the YAML for an image built elsewhere.
release VERSION:
    bash manifests/release/release.sh {{VERSION}}

# Install what the tests need and this machine lacks (redis-server; kubectl where it can be had), with apt-get. `just deps --dry-run` only says what it would do.
deps *flags:
    bash tests/deps.sh {{flags}}

# Unit and integration tests; the integration tests start real processes of our binaries.
test: deps build
    cargo test --workspace --no-fail-fast

# Formatting and clippy, warnings as errors.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Benchmarks against a direct connection and nginx, measured in one run (figures with their targets, then the targets table; the log stays in target/bench.log; and docs/latency.svg); installs wrk, h2load, nginx and redis-server when missing. Never fails on a missed target.
bench:
    #!/usr/bin/env bash
    set -euo pipefail
    need=()
    command -v wrk >/dev/null || need+=(wrk)
    command -v h2load >/dev/null || need+=(nghttp2-client)
    command -v nginx >/dev/null || need+=(nginx-light)
    command -v redis-server >/dev/null || need+=(redis-server)
    command -v curl >/dev/null || need+=(curl)
    if ((${#need[@]})); then
        sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
        $sudo apt-get update -qq
        # Debian starts nginx on port 80 when it installs it; the bench runs its own on loopback.
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
        $sudo service nginx stop >/dev/null 2>&1 || true
    fi
    cargo build --release --workspace --bins
    mkdir -p target
    {
        echo "== pin store (in process)"
        cargo bench -q -p activator --bench pins
        echo "== Redis round trips per pin operation"
        cargo bench -q -p integration-tests --bench redis_round_trips
        echo "== proxy figures (backend and proxies on CPU 1, load on CPU 0)"
        target/release/bench
    } | tee target/bench.log
    target/release/bench --summary target/bench.log

# Draw the Grafana dashboard of manifests/observability from a real run into docs/dashboard.png (DASHBOARD_SECONDS, default 120): two activators, Redis (away for a while), an autoscaler-shim, a Prometheus scraping them, headless Chromium for the picture; installs prometheus and chromium when missing. Not part of CI.
dashboard: deps
    #!/usr/bin/env bash
    set -euo pipefail
    need=()
    command -v prometheus >/dev/null || need+=(prometheus)
    command -v chromium >/dev/null || need+=(chromium)
    if ((${#need[@]})); then
        sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
        # Debian starts its own Prometheus on :9090; the run starts one of its own on loopback.
        $sudo service prometheus stop >/dev/null 2>&1 || true
    fi
    cargo build --release --workspace --bins
    target/release/dashboard

# A bounded soak of everything at once on loopback (SOAK_SECONDS, default 600): load at ~70 % of saturation with session churn, topology changes, pods killed and added, Redis and one activator restarted; prints failures, memory and open-file drift, and pins lost once a minute. Not part of CI.
soak: deps
    cargo build --release --workspace --bins
    target/release/soak
