//! The appliance's management API: the service definition (generated from
//! `proto/appliance.proto`), the client end over a unix socket, and the
//! server end's listener. `appliance` implements the service trait
//! [`pb::appliance_server::Appliance`]; nothing here knows the daemon.

pub mod client;
pub mod latency;
pub mod server;

/// Generated messages, client and server trait.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("appliance.v1");

    /// The encoded descriptors of the service, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/appliance_descriptor.bin"));
}

/// How enum fields are written as JSON: by name.
mod pb_json {
    /// A `Level` field by its name (LEVEL_RAID5); a number the enum does
    /// not know stays a number.
    pub fn level<S: serde::Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        match crate::pb::Level::try_from(*v) {
            Ok(l) => s.serialize_str(l.as_str_name()),
            Err(_) => s.serialize_i32(*v),
        }
    }
}

/// Version of the API messages (bumped on incompatible changes).
pub const API_VERSION: u32 = 1;
