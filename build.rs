//! Generates the gRPC control plane's code from `proto/` with a vendored protoc (no system
//! install needed), and its file descriptor set for server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("control_descriptor.bin"))
        .compile_with_config(
            config,
            &["proto/fraiseql/observers/v1/control.proto"],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
