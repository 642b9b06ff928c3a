//! The integration tests, one module per area, linked into one binary: each starts real processes
//! of the workspace's binaries (and real Redis, haproxy, an in-process Kubernetes API server) on
//! loopback, through the harness in `tests/src`. Run one area with
//! `cargo test -p integration-tests --test it <module>::`.

mod affinity;
mod chat;
mod data_path;
mod deps;
mod failures;
mod first_minutes;
mod grpc;
mod knative;
mod knative_objects;
mod knative_routes;
mod manifests;
mod observability;
mod pins_at_scale;
mod readme;
mod redis_failover;
mod scale_from_zero;
mod session_end;
mod session_semantics;
mod sessions_capacity;
mod shared_pins;
mod signed_cookie;
mod split;
mod standalone;
