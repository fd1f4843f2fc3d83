//! The journal device is outside the process too: a crafted or damaged
//! superblock, a log far larger than memory, a torn superblock write. Each
//! gets a clear error or is survived; none panics the daemon or makes it
//! allocate the device in RAM.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use appliance::raid::journal::{Entry, Journal};
use bdev::{BlockDevice, FileDevice};

const BS: usize = 4096;

/// A member device in a file of 64 blocks, and the file.
fn member(dir: &std::path::Path) -> (Arc<dyn BlockDevice>, std::path::PathBuf) {
    let path = dir.join("m.img");
    let dev = FileDevice::create(&path, BS as u32, 64 * BS as u64).unwrap();
    (Arc::new(dev), path)
}

/// Block `at` of the file at `path`.
fn block_of(path: &std::path::Path, at: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, at * BS as u64)
        .unwrap();
    b
}

/// A journal superblock as the current format writes it, with `log_blocks`.
fn crafted_super(log_blocks: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    b[0..8].copy_from_slice(&0x3259_4c4e_5254_4f4a_u64.to_le_bytes());
    b[8..16].copy_from_slice(&7u64.to_le_bytes());
    b[16..24].copy_from_slice(&log_blocks.to_le_bytes());
    let crc = crc32c::crc32c(&b[..BS - 4]);
    b[BS - 4..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Point 6: a superblock whose log length is absurd (u64::MAX overflowed
/// `log_blocks + 1`, a panic; a large one had replay allocate it all) is
/// refused with a message that says what is wrong.
#[test]
fn a_crafted_journal_superblock_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.img");
    for log_blocks in [u64::MAX, u64::MAX - 1, 1 << 40, 0] {
        let _ = std::fs::remove_file(&path);
        let dev = FileDevice::create(&path, BS as u32, 1 << 20).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&crafted_super(log_blocks), 0)
            .unwrap();
        let err = Journal::replay(Arc::new(dev), &[], None).err().unwrap();
        assert!(
            err.to_string().contains("claims a log"),
            "{log_blocks}: {err}"
        );
    }
}

/// Point 6: replay reads the log a window at a time. The old code read a
/// journal device whole into memory: a 4 GiB journal cost 4 GiB of RSS.
#[test]
fn replaying_a_large_journal_takes_little_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.img");
    // Sparse: reading it costs no disk IO.
    let dev: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::create(&path, BS as u32, 4 << 30).unwrap());
    let (m, mpath) = member(dir.path());
    let j = Journal::format(dev.clone()).unwrap();
    // One record near the start and one near the end of the log.
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    for (fill, at_block) in [(0x11u8, 3u64), (0x22u8, 9u64)] {
        let data = vec![fill; BS];
        let mut r = j.record(
            &[Entry {
                member: 0,
                count: 1,
                block: at_block,
            }],
            &[&data],
        );
        let (at, _) = j.reserve(&mut r, true).unwrap();
        f.seek(SeekFrom::Start(at * BS as u64)).unwrap();
        f.write_all(&r).unwrap();
    }
    f.sync_all().unwrap();
    drop(j);
    let hwm = || -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        let l = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    };
    // Reset the peak to now.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = hwm();
    let (_, rep) = Journal::replay(dev, &[Some(m.clone())], None).unwrap();
    let grown = hwm().saturating_sub(before);
    assert_eq!(rep.records, 2);
    assert!(
        grown < 256 << 20,
        "replaying a 4 GiB journal raised the peak RSS by {} MiB",
        grown >> 20
    );
    assert!(block_of(&mpath, 3).iter().all(|&x| x == 0x11));
    assert!(block_of(&mpath, 9).iter().all(|&x| x == 0x22));
}

/// Point 9: the journal kept one superblock, in block 0; a torn write or
/// a bad sector there lost the journal and every write-back block in it.
/// A second copy in the last block opens it.
#[test]
fn a_journal_whose_first_superblock_is_torn_opens_from_the_second() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.img");
    let dev: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::create(&path, BS as u32, 1 << 20).unwrap());
    let (m, mpath) = member(dir.path());
    let j = Journal::format(dev.clone()).unwrap();
    let data = vec![0x5au8; BS];
    let mut r = j.record(
        &[Entry {
            member: 0,
            count: 1,
            block: 7,
        }],
        &[&data],
    );
    let (at, _) = j.reserve(&mut r, true).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&r, at * BS as u64).unwrap();
    // Half of block 0 overwritten: a torn superblock.
    f.write_all_at(&vec![0xffu8; BS / 2], 0).unwrap();
    f.sync_all().unwrap();
    drop(j);
    let (_, rep) = Journal::replay(dev.clone(), &[Some(m.clone())], None).unwrap();
    assert_eq!(rep.records, 1);
    assert!(block_of(&mpath, 7).iter().all(|&x| x == 0x5a));
    // The replay wrote both copies again: block 0 alone opens it now.
    let (_, rep) = Journal::replay(dev, &[Some(m)], None).unwrap();
    assert_eq!(rep.records, 0);
}

/// A write-through record (valid nonce and checksum, so only a crafted
/// one) naming blocks outside the members' data area, a member's
/// superblock at block 0 here, is refused: replay checked only write-back
/// records against the volume's geometry, and wrote this one over the
/// metadata.
#[test]
fn a_write_through_record_outside_the_data_area_is_refused() {
    use appliance::raid::geometry::{Layout, Raid5Geometry};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.img");
    let dev: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::create(&path, BS as u32, 4 << 20).unwrap());
    let (m, mpath) = member(dir.path());
    let before = block_of(&mpath, 0);
    // Two members, 16 KiB chunks, data from block 8 of 64.
    let geo = Raid5Geometry::new(2, BS as u32, 16384, Layout::LeftSymmetric, 8, 64).unwrap();
    for (member, block, count) in [(0u32, 0u64, 1u32), (0, 6, 4), (0, 60, 8), (5, 8, 1)] {
        let j = Journal::format(dev.clone()).unwrap();
        let data = vec![0x5au8; BS];
        let datas: Vec<&[u8]> = (0..count).map(|_| data.as_slice()).collect();
        let mut r = j.record(
            &[Entry {
                member,
                count,
                block,
            }],
            &datas,
        );
        let (at, _) = j.reserve(&mut r, true).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&r, at * BS as u64)
            .unwrap();
        drop(j);
        let err = Journal::replay(dev.clone(), &[Some(m.clone()), Some(m.clone())], Some(&geo))
            .err()
            .unwrap_or_else(|| panic!("member {member} blocks {block}+{count} replayed"));
        assert!(err.to_string().contains("outside the volume"), "{err}");
        assert!(
            block_of(&mpath, 0) == before,
            "the member's block 0 was written"
        );
    }
}

/// A superblock whose checkpoint sequence is near the end of the counter
/// (a CRC anyone can recompute is its only guard) is refused: counting on
/// from it overflowed on the first write (a panic on the reactor in a
/// debug build), or wrapped and hid every later record from replay.
#[test]
fn a_journal_sequence_near_the_end_of_the_counter_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.img");
    let dev: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::create(&path, BS as u32, 1 << 20).unwrap());
    drop(Journal::format(dev.clone()).unwrap());
    let formatted = block_of(&path, 0);
    for seq in [u64::MAX, 1 << 62] {
        let mut b = formatted.clone();
        b[24..32].copy_from_slice(&seq.to_le_bytes());
        let crc = crc32c::crc32c(&b[..BS - 4]);
        b[BS - 4..].copy_from_slice(&crc.to_le_bytes());
        for at in [0u64, 255] {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .write_all_at(&b, at * BS as u64)
                .unwrap();
        }
        let err = Journal::replay(dev.clone(), &[], None).err().unwrap();
        assert!(err.to_string().contains("out of range"), "{seq}: {err}");
    }
}

/// From an audit: a checkpoint whose second superblock copy could not be
/// written only logged it, and the first copy went on alone; torn later,
/// the stale second copy was read, and its old checkpoint replayed
/// records whose space had been reused over newer data. A superblock the
/// device cannot take fails the journal now (the volume goes on without
/// it), and the checkpoint says so.
#[test]
fn a_superblock_copy_the_device_cannot_take_fails_the_journal() {
    use bdev::FaultDevice;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.img");
    let file: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::create(&path, BS as u32, 4 << 20).unwrap());
    let fault = Arc::new(FaultDevice::new(file));
    let dev: Arc<dyn BlockDevice> = fault.clone();
    let j = Journal::format(dev.clone()).unwrap();
    let last = dev.info().num_blocks - 1;
    fault.control().fail_writes(last, last + 1);
    let data = vec![1u8; BS];
    let mut r = j.record(
        &[Entry {
            member: 0,
            count: 1,
            block: 3,
        }],
        &[data.as_slice()],
    );
    let (_, epoch) = j.reserve(&mut r, true).unwrap();
    j.done(epoch);
    assert!(j.checkpoint(|| Ok(())).is_err());
    assert!(j.has_failed());
}

/// A replay at the start whose second superblock copy the device cannot
/// take fails the journal (the volume starts, and goes on without it);
/// refusing it refused every later start too, the replay being already
/// on the members and the first copy saying so.
#[test]
fn a_replay_whose_second_superblock_copy_fails_starts_without_the_journal() {
    use appliance::raid::geometry::{Layout, Raid5Geometry};
    use bdev::FaultDevice;
    let dir = tempfile::tempdir().unwrap();
    let file: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::create(&dir.path().join("j.img"), BS as u32, 4 << 20).unwrap());
    let fault = Arc::new(FaultDevice::new(file));
    let dev: Arc<dyn BlockDevice> = fault.clone();
    drop(Journal::format(dev.clone()).unwrap());
    let last = dev.info().num_blocks - 1;
    fault.control().fail_writes(last, last + 1);
    let (m, _) = member(dir.path());
    let geo = Raid5Geometry::new(2, BS as u32, 16384, Layout::LeftSymmetric, 8, 64).unwrap();
    let (j, _) =
        Journal::replay(dev, &[Some(m.clone()), Some(m)], Some(&geo)).expect("the volume starts");
    assert!(j.has_failed());
}

/// A journal and a RAID5's members, in files of `dir`.
struct Raid5Rig {
    /// The journal, j.img: 4 MiB, a log of about 1,020 blocks and a cache
    /// of a sixteenth, 63.
    dev: Arc<dyn BlockDevice>,
    /// Three members of 512 blocks, m0.img.., and their files.
    members: Vec<(Arc<dyn BlockDevice>, std::path::PathBuf)>,
    devs: Vec<Option<Arc<dyn BlockDevice>>>,
    /// 16 KiB chunks (4 blocks), data from block 8.
    geo: appliance::raid::geometry::Raid5Geometry,
}

fn raid5_rig(dir: &std::path::Path) -> Raid5Rig {
    raid5_rig_of(dir, 4 << 20, 512, 8)
}

/// [`raid5_rig`] with a journal of `journal_bytes`, members of
/// `member_blocks` and data from block `data_offset`.
fn raid5_rig_of(
    dir: &std::path::Path,
    journal_bytes: u64,
    member_blocks: u64,
    data_offset: u64,
) -> Raid5Rig {
    use appliance::raid::geometry::{Layout, Raid5Geometry};
    let dev: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::create(&dir.join("j.img"), BS as u32, journal_bytes).unwrap());
    let members: Vec<(Arc<dyn BlockDevice>, std::path::PathBuf)> = (0..3)
        .map(|i| {
            let path = dir.join(format!("m{i}.img"));
            let d = FileDevice::create(&path, BS as u32, member_blocks * BS as u64).unwrap();
            (Arc::new(d) as Arc<dyn BlockDevice>, path)
        })
        .collect();
    let devs = members.iter().map(|(d, _)| Some(d.clone())).collect();
    let geo = Raid5Geometry::new(
        3,
        BS as u32,
        16384,
        Layout::LeftSymmetric,
        data_offset,
        member_blocks,
    )
    .unwrap();
    Raid5Rig {
        dev,
        members,
        devs,
        geo,
    }
}

/// Format the journal in `dir` (j.img, `dev`) and log, at each (member,
/// block, blocks), write-back data of `byte`.
fn log_write_back(
    dir: &std::path::Path,
    dev: &Arc<dyn BlockDevice>,
    runs: &[(u32, u64, u32)],
    byte: u8,
) {
    let j = Journal::format(dev.clone()).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("j.img"))
        .unwrap();
    for &(member, block, count) in runs {
        let entry = Entry {
            member,
            count,
            block,
        };
        let mut r = Vec::new();
        j.record_header(&mut r, &[entry], count as usize, true);
        r[BS..].fill(byte);
        let (at, _) = j.reserve(&mut r, false).unwrap();
        f.write_all_at(&r, at * BS as u64).unwrap();
    }
    f.sync_all().unwrap();
}

/// Member 0 holds `byte` at each of `blocks`, and member 1 (missing)
/// reads back as it was, zeros, from it and the parity on member 2.
fn rows_whole(members: &[(Arc<dyn BlockDevice>, std::path::PathBuf)], blocks: &[u64], byte: u8) {
    for &b in blocks {
        let (d, p) = (block_of(&members[0].1, b), block_of(&members[2].1, b));
        assert!(d.iter().all(|&x| x == byte), "block {b} data");
        assert!(
            d.iter().zip(&p).all(|(x, y)| x ^ y == 0),
            "block {b}: member 1 reads back wrong"
        );
    }
}

/// From an audit: replay holds every write-back block it places, and its
/// parity, in memory until it has logged them (so a crash in the middle
/// cannot leave rows half new). Nothing bounded how many: a crafted log
/// of valid write-back records, each naming other blocks, made a start
/// take memory in proportion to the journal (a 64 GiB journal, some 128
/// GiB), and the allocation failure took the whole daemon. An honest log
/// leaves at most what the cache holds (a block leaves the cache through
/// a write-through record that names it); a log leaving more than twice
/// that is refused with a clear error, before any member is written. One
/// whose write-back blocks were written through since, however many, is
/// replayed (review: the first bound counted every block ever written back).
#[test]
fn a_log_of_more_write_back_blocks_than_the_cache_holds_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let Raid5Rig {
        dev,
        members,
        devs,
        geo,
    } = raid5_rig(dir.path());
    // `chunks` write-back records of one whole chunk each, every one on
    // a data member of another stripe; `reclaimed`: each followed by the
    // write-through record of its reclaim.
    let log = |chunks: u64, reclaimed: bool| {
        let j = Journal::format(dev.clone()).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("j.img"))
            .unwrap();
        for stripe in 0..chunks {
            let member = (geo.parity_member(stripe) + 1) % 3;
            let block = geo.data_offset() + stripe * geo.chunk_blocks();
            let mut r = Vec::new();
            j.record_header(
                &mut r,
                &[Entry {
                    member,
                    count: 4,
                    block,
                }],
                4,
                true,
            );
            r[BS..].fill(0x5a);
            let (at, _) = j.reserve(&mut r, false).unwrap();
            f.write_all_at(&r, at * BS as u64).unwrap();
            if reclaimed {
                let data = vec![0x5au8; 4 * BS];
                let entry = Entry {
                    member,
                    count: 4,
                    block,
                };
                let mut r = j.record(&[entry], &[&data]);
                let (at, _) = j.reserve(&mut r, false).unwrap();
                f.write_all_at(&r, at * BS as u64).unwrap();
            }
        }
        f.sync_all().unwrap();
    };
    // 20 chunks, 80 blocks: under twice the cache, replayed.
    log(20, false);
    let (_, rep) = Journal::replay(dev.clone(), &devs, Some(&geo)).unwrap();
    assert_eq!(rep.records, 20);
    // 40 chunks, 160 blocks: more than twice the cache, refused.
    log(40, false);
    let last = geo.data_offset() + 39 * geo.chunk_blocks();
    let holder = (geo.parity_member(39) + 1) % 3;
    let err = Journal::replay(dev.clone(), &devs, Some(&geo))
        .err()
        .expect("a log naming 160 write-back blocks for a 63-block cache was replayed");
    assert!(err.to_string().contains("more than its cache"), "{err}");
    assert!(
        block_of(&members[holder as usize].1, last)
            .iter()
            .all(|&x| x == 0),
        "a member was written"
    );
    // The same 40 chunks, each reclaimed since: nothing left to hold.
    log(40, true);
    let (_, rep) = Journal::replay(dev, &devs, Some(&geo)).unwrap();
    assert_eq!(rep.records, 80);
    assert!(block_of(&members[holder as usize].1, last)
        .iter()
        .all(|&x| x == 0x5a));
}

/// From review: replay places a block's newest write-back record that no
/// later write-through record replaced, whatever came before it: two
/// write-back records of one block leave the second, and a write-back
/// record after a write-through one of the same block is placed.
#[test]
fn replay_places_each_blocks_newest_live_write_back_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.img");
    let Raid5Rig {
        dev,
        members,
        devs,
        geo,
    } = raid5_rig(dir.path());
    // Where stripe `s`'s chunk on its first data member lies.
    let at = |s: u64| {
        (
            (geo.parity_member(s) + 1) % 3,
            geo.data_offset() + s * geo.chunk_blocks(),
        )
    };
    let j = Journal::format(dev.clone()).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    // (stripe, byte, write-back), in sequence order.
    let records = [
        (0, 0x11, true),
        (0, 0x22, true),
        (1, 0x11, true),
        (1, 0x33, false),
        (1, 0x44, true),
        (2, 0x11, true),
        (2, 0x33, false),
    ];
    for (stripe, byte, write_back) in records {
        let (member, block) = at(stripe);
        let entry = Entry {
            member,
            count: 4,
            block,
        };
        let data = vec![byte; 4 * BS];
        let mut r = Vec::new();
        j.record_header(&mut r, &[entry], 4, write_back);
        r[BS..].copy_from_slice(&data);
        if !write_back {
            r = j.record(&[entry], &[&data]);
        }
        let (pos, _) = j.reserve(&mut r, false).unwrap();
        f.write_all_at(&r, pos * BS as u64).unwrap();
    }
    f.sync_all().unwrap();
    drop(j);
    Journal::replay(dev, &devs, Some(&geo)).unwrap();
    for (stripe, want) in [(0u64, 0x22u8), (1, 0x44), (2, 0x33)] {
        let (member, block) = at(stripe);
        for b in block..block + 4 {
            let got = block_of(&members[member as usize].1, b);
            assert!(got.iter().all(|&x| x == want), "stripe {stripe} block {b}");
        }
    }
}

/// The first `n` stripes whose parity is on member 2.
fn parity_on_member_2(
    geo: &appliance::raid::geometry::Raid5Geometry,
    n: usize,
) -> impl Iterator<Item = u64> + '_ {
    (0..geo.stripes())
        .filter(|&s| geo.parity_member(s) == 2)
        .take(n)
}

/// The rig's members with member 1 missing.
fn member_1_missing(devs: &[Option<Arc<dyn BlockDevice>>]) -> Vec<Option<Arc<dyn BlockDevice>>> {
    let mut d = devs.to_vec();
    d[1] = None;
    d
}

/// From review: a degraded replay logs what it computed (new data and the
/// parity brought along) before it writes the members, in records of up
/// to 256 blocks. They were cut by member: a row's new data could be in a
/// record that reached the log and its parity in one that did not. After
/// a crash there, the next replay took the data as written and never
/// brought its parity along, and the missing member's blocks in those
/// rows read back wrong. Records hold whole rows now.
#[test]
fn a_crash_while_a_degraded_replay_logs_leaves_every_row_whole() {
    use bdev::FaultDevice;
    let dir = tempfile::tempdir().unwrap();
    // 16 MiB: a cache of 255 blocks, room for 280 live ones.
    let Raid5Rig {
        dev,
        members,
        devs,
        geo,
    } = raid5_rig_of(dir.path(), 16 << 20, 1024, 8);
    // 70 chunks on member 0 of stripes whose parity is on member 2: with
    // member 1 missing, each row's new data and parity go to the log.
    let runs: Vec<(u32, u64, u32)> = parity_on_member_2(&geo, 70)
        .map(|s| (0, geo.data_offset() + s * geo.chunk_blocks(), 4))
        .collect();
    assert_eq!(runs.len(), 70);
    log_write_back(dir.path(), &dev, &runs, 0x6b);
    let degraded = member_1_missing(&devs);
    // The crash: the first of the replay's own records reaches the log
    // (after the 70 records of 5 blocks, at device block 351, 257 blocks
    // long), nothing after it does.
    let faulty = Arc::new(FaultDevice::new(dev.clone()));
    faulty.control().fail_writes(1 + 350 + 257, u64::MAX);
    let first = Journal::replay(faulty.clone(), &degraded, Some(&geo));
    assert!(first.is_err(), "the replay's own records were all written");
    // The next start replays again.
    Journal::replay(dev, &degraded, Some(&geo)).unwrap();
    let blocks: Vec<u64> = runs.iter().flat_map(|&(_, b, _)| b..b + 4).collect();
    rows_whole(&members, &blocks, 0x6b);
}

/// From review: the runs of blocks of member block 0 were not counted
/// when the degraded replay cut its records, so a record could carry more
/// runs than a record may, and the next replay did not find it. Here every
/// row holds two runs (data and parity, every other block from block 0):
/// the replay's own records must all be found after a crash while it
/// writes the members.
#[test]
fn a_degraded_replay_from_block_0_logs_records_the_next_replay_finds() {
    use bdev::FaultDevice;
    let dir = tempfile::tempdir().unwrap();
    let Raid5Rig {
        dev,
        members,
        devs,
        geo,
    } = raid5_rig_of(dir.path(), 16 << 20, 1024, 0);
    // Blocks 0 and 2 of the chunk on member 0 of 60 stripes whose parity
    // is on member 2: 120 rows of two runs each.
    let blocks: Vec<u64> = parity_on_member_2(&geo, 60)
        .flat_map(|s| [s * geo.chunk_blocks(), s * geo.chunk_blocks() + 2])
        .collect();
    let runs: Vec<(u32, u64, u32)> = blocks.iter().map(|&b| (0, b, 1)).collect();
    log_write_back(dir.path(), &dev, &runs, 0x7c);
    // The crash: the replay's records are logged, member 0 takes its new
    // data, member 2's parity writes fail.
    let parity = Arc::new(FaultDevice::new(members[2].0.clone()));
    parity.control().fail_writes(0, u64::MAX);
    let mut degraded = member_1_missing(&devs);
    degraded[2] = Some(parity.clone() as Arc<dyn BlockDevice>);
    assert!(Journal::replay(dev.clone(), &degraded, Some(&geo)).is_err());
    let degraded = member_1_missing(&devs);
    Journal::replay(dev, &degraded, Some(&geo)).unwrap();
    rows_whole(&members, &blocks, 0x7c);
}

/// A member whose IO failed the replay refused the whole volume, and the
/// way out the refusal named (`--drop-journal`) lost the write-back data
/// only the journal held (audit). The member is failed (recorded before
/// anything is replayed around it), and the journal replayed without it;
/// a volume already missing a member cannot lose a second, and is refused.
#[test]
fn a_member_that_fails_the_replay_is_failed_and_replayed_around() {
    use bdev::FaultDevice;
    // A rig whose log holds write-back chunks on member 0 of stripes whose
    // parity is on member 2, member 0 refusing writes: its slots (member 1
    // missing if `degraded`), the chunks, and the rig.
    let rig = |dir: &std::path::Path, degraded: bool| {
        let r = raid5_rig(dir);
        let chunks: Vec<u64> = parity_on_member_2(&r.geo, 8)
            .map(|s| r.geo.data_offset() + s * r.geo.chunk_blocks())
            .collect();
        let runs: Vec<(u32, u64, u32)> = chunks.iter().map(|&b| (0, b, 4)).collect();
        log_write_back(dir, &r.dev, &runs, 0x5d);
        let broken = Arc::new(FaultDevice::new(r.members[0].0.clone()));
        broken.control().fail_writes(0, u64::MAX);
        let mut slots = r.devs.clone();
        slots[0] = Some(broken as Arc<dyn BlockDevice>);
        if degraded {
            slots[1] = None;
        }
        (slots, chunks, r)
    };
    let mut failed = Vec::new();

    let dir = tempfile::tempdir().unwrap();
    let (slots, _, r) = rig(dir.path(), true);
    let refused = Journal::replay_around(r.dev, &slots, &r.geo, |k| {
        failed.push(k);
        Ok(())
    });
    assert!(refused.is_err(), "a second member lost");
    assert!(failed.is_empty(), "{failed:?}");

    let dir = tempfile::tempdir().unwrap();
    let (slots, chunks, r) = rig(dir.path(), false);
    let (_, _, around) = Journal::replay_around(r.dev, &slots, &r.geo, |k| {
        failed.push(k);
        Ok(())
    })
    .unwrap();
    assert_eq!((around, failed), (Some(0), vec![0]));
    // Member 0's new data is in the parity (member 1 holds zeros).
    for b in chunks.iter().flat_map(|&c| c..c + 4) {
        assert!(
            block_of(&r.members[2].1, b).iter().all(|&x| x == 0x5d),
            "block {b}: member 0 reads back wrong without it"
        );
    }
}
