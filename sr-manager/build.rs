//! Compiles `proto/shale.proto` (storage API) and `proto/vm.proto` (daemon-run VMs) into the tonic client and
//! server used by the daemon and the CLI.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/shale.proto");
    println!("cargo:rerun-if-changed=proto/vm.proto");
    tonic_prost_build::configure()
        // The CLI prints replies as JSON (`--json`) straight from the generated types.
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .compile_protos(&["proto/shale.proto", "proto/vm.proto"], &["proto"])?;
    Ok(())
}
