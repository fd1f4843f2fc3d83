//! What of md's metadata the appliance can serve. A valid superblock may
//! describe an array the appliance does not run; each such case is named
//! here so an operator reads which feature stands in the way.

use super::bitmap::{MdBitmap, VERSION_CLUSTERED, VERSION_LOCKLESS};
use super::superblock::{feature, MdSuperblock, ROLE_JOURNAL};
use crate::raid::geometry::Layout;

/// md's name of a RAID level, as `mdadm --examine` prints it.
pub fn level_name(level: i32) -> String {
    match level {
        -1 => "linear".into(),
        -4 => "multipath".into(),
        -5 => "faulty".into(),
        -1000000 => "container".into(),
        0 | 1 | 4 | 5 | 6 | 10 => format!("raid{level}"),
        n => format!("level {n}"),
    }
}

/// md's name of a RAID5 layout (algorithm), if it is one of the four the
/// appliance runs.
pub fn raid5_layout(layout: u32) -> Option<Layout> {
    Some(match layout {
        0 => Layout::LeftAsymmetric,
        1 => Layout::RightAsymmetric,
        2 => Layout::LeftSymmetric,
        3 => Layout::RightSymmetric,
        _ => return None,
    })
}

/// md's algorithm number of a RAID5 layout.
pub fn raid5_algorithm(layout: Layout) -> u32 {
    match layout {
        Layout::LeftAsymmetric => 0,
        Layout::RightAsymmetric => 1,
        Layout::LeftSymmetric => 2,
        Layout::RightSymmetric => 3,
    }
}

/// md's name of a layout of `level`.
pub fn layout_name(level: i32, layout: u32) -> String {
    match (level, raid5_layout(layout)) {
        (4..=6, Some(l)) => l.name().into(),
        (4 | 5, None) if layout == 4 => "parity-first".into(),
        (4 | 5, None) if layout == 5 => "parity-last".into(),
        _ => format!("{layout}"),
    }
}

/// Why the appliance cannot serve an array md describes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("md array {array}: {what} is not supported by the appliance")]
pub struct Unsupported {
    /// The array's name and UUID.
    pub array: String,
    /// The feature, in an operator's words.
    pub what: String,
}

/// Whether the appliance can serve the array `sb` (and its bitmap, if it
/// has one) describes; the error names the first feature in the way.
pub fn check(sb: &MdSuperblock, bitmap: Option<&MdBitmap>) -> Result<(), Unsupported> {
    let no = |what: String| {
        Err(Unsupported {
            array: format!("{} ({})", sb.name(), super::uuid_text(&sb.set_uuid)),
            what,
        })
    };
    if sb.minor_version() != 2 {
        return no(format!(
            "md superblock version 1.{} (the appliance serves 1.2)",
            sb.minor_version()
        ));
    }
    match sb.level {
        1 => {}
        5 => {
            if raid5_layout(sb.layout).is_none() {
                return no(format!("RAID5 layout {}", layout_name(sb.level, sb.layout)));
            }
            let bytes = u64::from(sb.chunk_sectors) * super::SECTOR;
            if !(4096..=1 << 20).contains(&bytes) {
                return no(format!("a chunk of {bytes} bytes (4 KiB to 1 MiB are)"));
            }
        }
        l => return no(format!("level {}", level_name(l))),
    }
    let named = [
        (feature::RESHAPE_ACTIVE, "a reshape in progress"),
        (feature::JOURNAL, "a journal device (md's raid5-cache)"),
        (feature::PPL, "a partial parity log (PPL)"),
        (feature::MULTIPLE_PPLS, "a partial parity log (PPL)"),
        (feature::CLUSTERED, "clustered md"),
        (feature::BAD_BLOCKS, "a non-empty bad block log"),
        (
            feature::REPLACEMENT,
            "a replacement in progress (mdadm --replace)",
        ),
        (feature::NEW_OFFSET, "a reshape's new data offset"),
    ];
    for (bit, what) in named {
        if sb.has(bit) {
            return no(what.into());
        }
    }
    if sb.dev_roles.contains(&ROLE_JOURNAL) {
        return no("a journal device (md's raid5-cache)".into());
    }
    if let Some(bm) = bitmap {
        match bm.version {
            VERSION_CLUSTERED => return no("a clustered bitmap".into()),
            VERSION_LOCKLESS => return no("md's lockless bitmap".into()),
            _ => {}
        }
        if bm.uuid != sb.set_uuid {
            return no(format!(
                "a bitmap of another array ({})",
                super::uuid_text(&bm.uuid)
            ));
        }
    }
    Ok(())
}
