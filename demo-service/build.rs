//! Generates the gRPC counter's server and client from `proto/counter.proto`; protoc comes from
//! the protoc-bin-vendored crate, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/counter.proto");
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(config, &["proto/counter.proto"], &["proto"])?;
    Ok(())
}
