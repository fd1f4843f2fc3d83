//! The closed sets of values applctl takes (levels, layouts, journal
//! modes, shells): clap checks them, lists them in `--help` and completes
//! them, instead of the daemon refusing a typo after the call.

use clap::ValueEnum;
use mgmt::pb;

/// A volume's RAID level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Level {
    /// One device, no redundancy.
    Single,
    /// Mirrors.
    Raid1,
    /// Striping with rotating parity.
    Raid5,
}

impl Level {
    /// The API's value.
    pub fn pb(self) -> pb::Level {
        match self {
            Level::Single => pb::Level::Single,
            Level::Raid1 => pb::Level::Raid1,
            Level::Raid5 => pb::Level::Raid5,
        }
    }
}

/// A level a two-member volume can be taken over to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TakeoverLevel {
    /// A mirror of two.
    Raid1,
    /// A RAID5 of two.
    Raid5,
}

impl TakeoverLevel {
    /// The API's value.
    pub fn pb(self) -> pb::Level {
        match self {
            TakeoverLevel::Raid1 => pb::Level::Raid1,
            TakeoverLevel::Raid5 => pb::Level::Raid5,
        }
    }
}

/// md's RAID5 layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Layout {
    /// md's default.
    #[value(alias = "ls")]
    LeftSymmetric,
    /// Parity rotates left, data starts at the first member.
    #[value(alias = "la")]
    LeftAsymmetric,
    /// Parity rotates right, data follows it.
    #[value(alias = "rs")]
    RightSymmetric,
    /// Parity rotates right, data starts at the first member.
    #[value(alias = "ra")]
    RightAsymmetric,
}

impl Layout {
    /// The API's value.
    pub fn pb(self) -> pb::Layout {
        match self {
            Layout::LeftSymmetric => pb::Layout::LeftSymmetric,
            Layout::LeftAsymmetric => pb::Layout::LeftAsymmetric,
            Layout::RightSymmetric => pb::Layout::RightSymmetric,
            Layout::RightAsymmetric => pb::Layout::RightAsymmetric,
        }
    }
}

/// A write journal's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum JournalMode {
    /// Acknowledged once on the members.
    WriteThrough,
    /// Acknowledged once durable in the journal.
    WriteBack,
}

impl JournalMode {
    /// The API's value.
    pub fn pb(self) -> pb::JournalMode {
        match self {
            JournalMode::WriteThrough => pb::JournalMode::WriteThrough,
            JournalMode::WriteBack => pb::JournalMode::WriteBack,
        }
    }
}

/// The shell completion script for `shell` (built in memory: the
/// generator panics on a write error, such as a closed pipe).
pub fn completions(cmd: &mut clap::Command, shell: clap_complete::Shell) -> Vec<u8> {
    let mut script = Vec::new();
    clap_complete::generate(shell, cmd, "applctl", &mut script);
    script
}
