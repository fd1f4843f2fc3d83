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
    // JSON (applctl --json) shows enums by name, as protobuf's JSON
    // mapping does, not as numbers.
    let mut build =
        tonic_prost_build::configure().type_attribute(".", "#[derive(serde::Serialize)]");
    for field in [
        "appliance.v1.Volume.level",
        "appliance.v1.CreateVolumeRequest.level",
        "appliance.v1.TakeoverRequest.level",
    ] {
        build = build.field_attribute(
            field,
            "#[serde(serialize_with = \"crate::pb_json::level\")]",
        );
    }
    build.compile_fds(fds)?;
    Ok(())
}
