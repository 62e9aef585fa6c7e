//! Compiles `proto/nixdispatch/v1/*.proto` with `protox` (pure Rust: no system `protoc`)
//! and generates the tonic clients and servers. The encoded file descriptor set is written
//! to `$OUT_DIR/nixdispatch_descriptor.bin` for server reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/nixdispatch/v1/agent.proto",
        "proto/nixdispatch/v1/lease.proto",
        "proto/nixdispatch/v1/admin.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("nixdispatch_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
