//! Compiles the `.proto` contracts with `protox` (pure Rust), so no system `protoc`
//! is needed on build machines or in CI. The descriptor set is also kept in
//! OUT_DIR: agentd-proto's tests read it to hold the contracts to their
//! naming rule (see common.proto).

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/common.proto", "proto/node.proto", "proto/supervisor.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out.join("descriptors.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
