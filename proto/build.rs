//! Compiles the `.proto` contracts with `protox` (pure Rust), so no system `protoc`
//! is needed on build machines or in CI.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/node.proto", "proto/supervisor.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
