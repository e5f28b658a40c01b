//! Compiles `proto/portcullis/v1/*.proto` with pure-Rust tooling: protox parses and links the
//! files into a descriptor set (no system `protoc`), tonic-prost-build generates the client
//! and server code from it, and the encoded set is kept for gRPC reflection.

use std::path::PathBuf;

const PROTO_DIR: &str = "proto";
const FILES: &[&str] = &[
    "portcullis/v1/decision.proto",
    "portcullis/v1/policy.proto",
    "portcullis/v1/dataplane.proto",
    "portcullis/v1/control.proto",
];

fn main() {
    println!("cargo:rerun-if-changed={PROTO_DIR}");
    for f in FILES {
        println!("cargo:rerun-if-changed={PROTO_DIR}/{f}");
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let mut compiler = protox::Compiler::new([PROTO_DIR]).expect("proto include path");
    compiler.include_source_info(true).include_imports(true);
    if let Err(e) = compiler.open_files(FILES) {
        // A broken contract must fail the build with the file and position.
        panic!("proto error: {e:?}");
    }
    let fds = compiler.file_descriptor_set();
    std::fs::write(
        out.join("portcullis_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )
    .expect("write descriptor set");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)
        .expect("generate gRPC code");
}
