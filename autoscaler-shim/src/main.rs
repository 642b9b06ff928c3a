//! autoscaler-shim: stands in for Knative's autoscaler where there is none. It will serve
//! Knative's stat websocket protocol, keep per-revision concurrency windows, decide a scale and
//! actuate it through a backend (local processes or a Deployment's scale subresource). Until the
//! scale-from-zero work lands it only describes itself.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "autoscaler-shim",
    version,
    about = "Stat server and scaler standing in for Knative's autoscaler (clusters or laptops without Knative)",
    long_about = "Receives the activator's concurrency reports over Knative's websocket protocol \
                  (binary protobuf WireStatMessages), decides each revision's scale, and actuates it: \
                  `process` starts and stops demo-service processes and publishes their endpoints to \
                  the activator; `kubernetes` patches the scale subresource of the revision's Deployment.\n\n\
                  Not implemented yet: the scaler arrives with the scale-from-zero work."
)]
struct Args {
    /// Address of the stat websocket server.
    #[arg(long, env = "SHIM_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// How the decided scale is actuated.
    #[arg(long, env = "SHIM_BACKEND", value_enum, default_value_t = Backend::Process)]
    backend: Backend,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Backend {
    Process,
    Kubernetes,
}

fn main() -> ExitCode {
    let args = Args::parse();
    eprintln!("autoscaler-shim: the {:?} backend on {} is not implemented yet; see --help", args.backend, args.listen);
    ExitCode::from(2)
}
