//! Generates the Knative stat protocol types from `proto/stat.proto` with prost. protoc comes
//! from the protoc-bin-vendored crate, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/stat.proto");
    prost_build::Config::new()
        .protoc_executable(protoc_bin_vendored::protoc_bin_path()?)
        .compile_protos(&["proto/stat.proto"], &["proto"])?;
    Ok(())
}
