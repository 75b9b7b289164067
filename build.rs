//! Compiles `proto/` to Rust with tonic + prost. The .proto files are parsed by
//! `protox` (a pure-Rust protobuf compiler), so no `protoc` binary is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/process.proto",
        "proto/filesystem.proto",
        "proto/transfer.proto",
        "proto/ports.proto",
        "proto/handover.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;

    // The encoded descriptor set (Connect JSON, gRPC reflection) goes without
    // the comments (source info): they made up two thirds of it, and a
    // descriptor pool built from it took ~1.5 MiB of envd's memory with them,
    // ~0.13 MiB without. The generated code keeps them.
    let mut bare = fds.clone();
    for f in &mut bare.file {
        f.source_code_info = None;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("envd_descriptor.bin"),
        prost::Message::encode_to_vec(&bare),
    )?;

    // `prost::Name` on every message: the Connect route table takes message
    // names from the types instead of hand-typed strings.
    let mut config = tonic_prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // `Process.Connect` would clash with the generated `connect()` constructor.
        .build_transport(false)
        .bytes(".")
        .compile_fds_with_config(fds, config)?;
    Ok(())
}
