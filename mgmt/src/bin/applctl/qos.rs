//! A volume's IO limits on the command line: the same flags at `volume
//! create` and `volume qos`, in IOPS and MiB/s.

use mgmt::pb;

/// IO limits (0 or absent: no limit).
#[derive(clap::Args, Debug, Default)]
pub struct QosArgs {
    /// Most requests per second, reads and writes together.
    #[arg(long, value_name = "IOPS")]
    pub max_iops: Option<u64>,
    /// Most reads per second.
    #[arg(long, value_name = "IOPS")]
    pub max_read_iops: Option<u64>,
    /// Most writes per second (write-zeroes, discards and flushes count).
    #[arg(long, value_name = "IOPS")]
    pub max_write_iops: Option<u64>,
    /// Most MiB per second, read and written together.
    #[arg(long, value_name = "MIB")]
    pub max_mibps: Option<u64>,
    /// Most MiB read per second.
    #[arg(long, value_name = "MIB")]
    pub max_read_mibps: Option<u64>,
    /// Most MiB written per second.
    #[arg(long, value_name = "MIB")]
    pub max_write_mibps: Option<u64>,
}

impl QosArgs {
    /// Whether any limit was given.
    pub fn any(&self) -> bool {
        self.to_pb() != pb::QosLimits::default()
    }

    /// The API's limits.
    pub fn to_pb(&self) -> pb::QosLimits {
        let mib = |v: Option<u64>| v.unwrap_or(0).saturating_mul(1 << 20);
        pb::QosLimits {
            total_iops: self.max_iops.unwrap_or(0),
            read_iops: self.max_read_iops.unwrap_or(0),
            write_iops: self.max_write_iops.unwrap_or(0),
            total_bytes_per_sec: mib(self.max_mibps),
            read_bytes_per_sec: mib(self.max_read_mibps),
            write_bytes_per_sec: mib(self.max_write_mibps),
        }
    }
}

/// "IOPS 1000, write 20.0 MiB/s", or "" for none.
pub fn describe(q: &pb::QosLimits) -> String {
    let mib = |b: u64| format!("{:.1} MiB/s", b as f64 / (1u64 << 20) as f64);
    let mut parts = Vec::new();
    for (what, v) in [
        ("IOPS", q.total_iops),
        ("read IOPS", q.read_iops),
        ("write IOPS", q.write_iops),
    ] {
        if v > 0 {
            parts.push(format!("{what} {v}"));
        }
    }
    for (what, v) in [
        ("total", q.total_bytes_per_sec),
        ("read", q.read_bytes_per_sec),
        ("write", q.write_bytes_per_sec),
    ] {
        if v > 0 {
            parts.push(format!("{what} {}", mib(v)));
        }
    }
    parts.join(", ")
}
