//! Compiles our protos with protox (pure Rust), so building needs no protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Ours, and the SPIFFE Workload API the sidecar serves to apps (no package: `_`).
    let protos = [
        "proto/bulkhead/v1/bulkhead.proto",
        "proto/spiffe/workload.proto",
    ];
    // The part of etcd's v3 API the control plane's etcd client calls: a client only.
    let etcd = ["proto/etcd/mvccpb.proto", "proto/etcd/etcdserverpb.proto"];
    for proto in protos.iter().chain(&etcd) {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    let fds = protox::compile(etcd, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
