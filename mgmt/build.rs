//! Compiles the .proto with protox, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/appliance.proto");
    let fds = protox::compile(["proto/appliance.proto"], ["proto"])?;
    // For server reflection: the service's descriptors, as grpcurl and
    // other generic clients ask for them.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("appliance_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_fds(fds)?;
    Ok(())
}
