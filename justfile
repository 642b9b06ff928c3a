# affinity-activator tasks. `just demo` and `just test` are the quick start.

set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes.
default:
    @just --list

# Build every binary of the workspace (debug).
build:
    cargo build --workspace --bins

# Walk through the activator in local mode: starts what it needs, prints each request as a curl command with its answer, and stops everything.
demo: build
    cargo run --quiet -p integration-tests --bin demo

# Unit and integration tests; the integration tests start real processes of our binaries.
test: build
    cargo test --workspace --no-fail-fast

# Formatting and clippy, warnings as errors.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Benchmarks against a direct connection and nginx.
bench:
    @echo "not yet: the benchmarks arrive with issue 6"
