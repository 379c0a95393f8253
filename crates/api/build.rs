//! Compiles our protos with protox (pure Rust), so building needs no protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Ours, and the SPIFFE Workload API the sidecar serves to apps (no package: `_`).
    let protos = [
        "proto/bulkhead/v1/bulkhead.proto",
        "proto/spiffe/workload.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
