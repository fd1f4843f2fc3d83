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
    // mapping does, not as numbers: every enum field, found here, is
    // written by the function of its enum in pb_json (named after the enum
    // in snake case; a new enum without one does not compile).
    let mut build =
        tonic_prost_build::configure().type_attribute(".", "#[derive(serde::Serialize)]");
    for file in &fds.file {
        let package = file.package();
        for msg in &file.message_type {
            for field in &msg.field {
                if field.r#type() != prost_types::field_descriptor_proto::Type::Enum {
                    continue;
                }
                let enum_name = field.type_name().rsplit('.').next().unwrap_or_default();
                build = build.field_attribute(
                    format!("{package}.{}.{}", msg.name(), field.name()),
                    format!(
                        "#[serde(serialize_with = \"crate::pb_json::{}\")]",
                        snake(enum_name)
                    ),
                );
            }
        }
    }
    build.compile_fds(fds)?;
    Ok(())
}

/// `JournalMode` -> `journal_mode`.
fn snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}
