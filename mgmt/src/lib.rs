//! The appliance's management API: the service definition (generated from
//! `proto/appliance.proto`), the client end over a unix socket, and the
//! server end's listener. `appliance` implements the service trait
//! [`pb::appliance_server::Appliance`]; nothing here knows the daemon.

pub mod client;
pub mod latency;
pub mod peers;
pub mod server;

/// Generated messages, client and server trait.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("appliance.v2");

    /// The encoded descriptors of the service, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/appliance_descriptor.bin"));
}

/// The API's enums and the names the daemon, its state file and applctl
/// use for their values ("raid5", "degraded", "write-back"): one table
/// each, both ways.
macro_rules! labels {
    ($($ty:ident { $($v:ident => $s:literal),* $(,)? })*) => {$(
        impl pb::$ty {
            /// The value's name in the state file and applctl ("" for
            /// unspecified).
            pub fn label(self) -> &'static str {
                match self {
                    $(pb::$ty::$v => $s,)*
                    #[allow(unreachable_patterns)]
                    _ => "",
                }
            }

            /// The value with that name.
            pub fn from_label(s: &str) -> Option<Self> {
                match s {
                    $($s => Some(pb::$ty::$v),)*
                    _ => None,
                }
            }

            /// Every name, for messages.
            pub const LABELS: &'static [&'static str] = &[$($s),*];
        }
    )*};
}

labels! {
    Level { Single => "single", Raid1 => "raid1", Raid5 => "raid5" }
    HealthStatus { Ok => "ok", Degraded => "degraded" }
    DeviceHealth { Ok => "ok", Failed => "failed", Rebuilding => "rebuilding", Missing => "missing" }
    Layout {
        LeftAsymmetric => "left-asymmetric",
        RightAsymmetric => "right-asymmetric",
        LeftSymmetric => "left-symmetric",
        RightSymmetric => "right-symmetric",
    }
    JournalMode { WriteThrough => "write-through", WriteBack => "write-back" }
    MemberState {
        InSync => "in_sync",
        Rebuilding => "rebuilding",
        Failed => "failed",
        Removed => "removed",
    }
    VolumeState {
        Optimal => "optimal",
        Degraded => "degraded",
        Failed => "failed",
        Unavailable => "unavailable",
    }
    WorkKind { Rebuild => "rebuild", Scrub => "scrub", Replace => "replace" }
    ConsistencyPolicy {
        None => "none",
        Resync => "resync",
        Bitmap => "bitmap",
        Journal => "journal",
    }
}

/// How enum fields are written as JSON: by name (LEVEL_RAID5), as
/// protobuf's JSON mapping does; a number the enum does not know stays a
/// number. build.rs points each enum field at its function.
mod pb_json {
    macro_rules! by_name {
        ($($f:ident: $ty:ident),*) => {$(
            pub fn $f<S: serde::Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
                match crate::pb::$ty::try_from(*v) {
                    Ok(x) => s.serialize_str(x.as_str_name()),
                    Err(_) => s.serialize_i32(*v),
                }
            }
        )*};
    }
    by_name!(
        level: Level,
        health_status: HealthStatus,
        device_health: DeviceHealth,
        layout: Layout,
        journal_mode: JournalMode,
        member_state: MemberState,
        volume_state: VolumeState,
        work_kind: WorkKind,
        consistency_policy: ConsistencyPolicy
    );
}

/// Version of the API messages (bumped on incompatible changes).
pub const API_VERSION: u32 = 2;
