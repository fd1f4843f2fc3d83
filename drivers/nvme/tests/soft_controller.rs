//! The driver against the software controller: the block-device
//! conformance suite, PRP shapes and splitting, bounce and zero-copy paths,
//! and every failure the controller can inject.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::conformance::{self, run_one, rw, Aligned};
use bdev::{BlockDevice, IoChannel, IoError, IoOp, IoRequest, IoVec, SgList};
use nvme::soft::{SoftConfig, SoftController};
use nvme::{Controller, Namespace, Options};

/// Time-outs short enough for a test and long enough that a command the
/// controller does complete never times out on a machine at load 5. The
/// tests count resets only from below (each lost command costs one) or
/// against a bound a spurious time-out could not reach alone.
fn quick() -> Options {
    Options {
        io_timeout: Duration::from_secs(1),
        admin_timeout: Duration::from_secs(2),
        ..Options::default()
    }
}

fn setup(config: SoftConfig, opts: Options) -> (SoftController, Arc<Controller>) {
    let soft = SoftController::start("soft-test", config).expect("start soft controller");
    let ctrl = Controller::new(soft.transport(), opts).expect("bring up");
    (soft, ctrl)
}

fn ns(ctrl: &Arc<Controller>, nsid: u32) -> Arc<Namespace> {
    Arc::new(Namespace::new(ctrl, nsid, &format!("ns{nsid}")).expect("namespace"))
}

fn pattern(buf: &mut [u8], seed: u8) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
}

/// Submit and wait, with a generous deadline (the controller's thread may
/// sleep when idle).
fn one(ch: &mut dyn IoChannel, req: IoRequest) -> Result<(), IoError> {
    run_one(ch, req)
}

#[test]
fn both_block_sizes_pass_the_block_device_conformance_suite() {
    let config = SoftConfig {
        namespaces: vec![(512, 1 << 16), (4096, 8192)],
        mdts: 2, // 16 KiB commands: most requests of the suite are split
        ..SoftConfig::default()
    };
    let (soft, ctrl) = setup(config, Options::default());
    assert_eq!(ctrl.namespace_ids(), vec![1, 2]);
    for nsid in [1, 2] {
        let dev = ns(&ctrl, nsid);
        assert_eq!(dev.info().block_size, if nsid == 1 { 512 } else { 4096 });
        assert!(dev.info().discard && dev.info().write_zeroes && dev.info().flush);
        conformance::run_all(dev, 2, 1500);
    }
    let st = soft.stats();
    assert_eq!(st.iommu_faults, 0, "every PRP pointed at mapped memory");
    assert_eq!(
        st.cq_full, 0,
        "never more commands outstanding than a queue holds"
    );
    assert_eq!(st.largest_transfer, 16384, "commands split at MDTS");
    assert!(st.io_commands > 3000);
}

#[test]
fn registered_memory_is_used_in_place_for_every_prp_shape() {
    let (soft, ctrl) = setup(
        SoftConfig {
            namespaces: vec![(512, 1 << 15)],
            mdts: 0,
            ..SoftConfig::default()
        },
        Options::default(),
    );
    let dev = ns(&ctrl, 1);
    let mut ch = dev.open_channel().expect("channel");
    let mut mem = Aligned::new(4 << 20);
    let base = mem.buf().as_mut_ptr();
    // SAFETY: `mem` outlives every request and is unregistered at the end.
    unsafe { ctrl.register_memory(base, 4 << 20) }.expect("register");
    // (offset in the region, lengths of the segments): every shape PRPs
    // can express: one page, a page offset, two pages, a list, several
    // page-aligned segments with an unaligned start and end.
    let shapes: &[(usize, &[usize])] = &[
        (0, &[4096]),
        (512, &[512]),
        (1024, &[3072, 4096]),
        (0, &[8192]),
        (0, &[256 << 10]),
        (2048, &[2048, 8192, 4096, 512]),
        (4096 * 3 + 512, &[3584, (1 << 20) - 3584]),
    ];
    let mut lba = 0u64;
    for (k, &(off, segs)) in shapes.iter().enumerate() {
        let total: usize = segs.iter().sum();
        let blocks = total as u64 / 512;
        let mut expect = vec![0u8; total];
        pattern(&mut expect, k as u8);
        // Lay the segments out page-aligned after the first, like guest pages.
        let mut sg = SgList::new();
        let mut at = off;
        let mut src = 0;
        for &len in segs {
            // SAFETY: inside `mem`.
            let p = unsafe { base.add(at) };
            unsafe { std::ptr::copy_nonoverlapping(expect[src..].as_ptr(), p, len) };
            sg.push(unsafe { IoVec::new(p, len) });
            src += len;
            at = (at + len).div_ceil(4096) * 4096 + 4096;
        }
        let before = ctrl.bounced_commands();
        one(
            ch.as_mut(),
            IoRequest {
                op: IoOp::Write,
                offset_blocks: lba,
                num_blocks: blocks,
                sg,
                tag: 1,
            },
        )
        .expect("write");
        let mut got = vec![0u8; total];
        one(ch.as_mut(), rw(IoOp::Read, lba, blocks, &mut got, 2)).expect("read back");
        assert!(got == expect, "shape {k} reads back what was written");
        // The write used the registered memory in place; the read into a
        // plain Vec went through bounce pages.
        assert_eq!(
            ctrl.bounced_commands() - before,
            1,
            "shape {k}: only the unregistered read bounced"
        );
        lba += blocks;
    }
    assert_eq!(soft.stats().iommu_faults, 0);
    drop(ch);
    ctrl.unregister_memory(base).expect("unregister");
}

/// 4 KiB of registered memory in `segs` (offset, length) that PRPs cannot
/// describe: a middle segment that ends inside a page, an odd address.
/// Without SGLs the command is bounced; with them it goes to the memory in
/// place. Either way the data is right. Returns the write's bounced
/// commands.
fn odd_shapes(sgl: bool, segs: &[(usize, usize)]) -> u64 {
    let (soft, ctrl) = setup(
        SoftConfig {
            namespaces: vec![(512, 4096)],
            sgl,
            ..SoftConfig::default()
        },
        Options::default(),
    );
    let dev = ns(&ctrl, 1);
    let mut ch = dev.open_channel().expect("channel");
    let mut mem = Aligned::new(1 << 20);
    let base = mem.buf().as_mut_ptr();
    // SAFETY: `mem` outlives the requests.
    unsafe { ctrl.register_memory(base, 1 << 20) }.expect("register");
    let mut expect = vec![0u8; 4096];
    pattern(&mut expect, 9);
    let mut sg = SgList::new();
    let mut src = 0;
    for &(off, len) in segs {
        // SAFETY: inside `mem`.
        let p = unsafe { base.add(off) };
        unsafe { std::ptr::copy_nonoverlapping(expect[src..].as_ptr(), p, len) };
        sg.push(unsafe { IoVec::new(p, len) });
        src += len;
    }
    let before = ctrl.bounced_commands();
    one(
        ch.as_mut(),
        IoRequest {
            op: IoOp::Write,
            offset_blocks: 8,
            num_blocks: 8,
            sg: sg.clone(),
            tag: 1,
        },
    )
    .expect("write");
    let bounced = ctrl.bounced_commands() - before;
    let mut plain = vec![0u8; 4096];
    one(ch.as_mut(), rw(IoOp::Read, 8, 8, &mut plain, 9)).expect("plain read");
    assert!(
        plain == expect,
        "write (sgl: {sgl}) first bad {:?}",
        plain.iter().zip(&expect).position(|(a, b)| a != b)
    );
    // Read it back into the same odd shape, after scribbling over it.
    for v in &sg {
        unsafe { std::ptr::write_bytes(v.ptr(), 0xee, v.len()) };
    }
    one(
        ch.as_mut(),
        IoRequest {
            op: IoOp::Read,
            offset_blocks: 8,
            num_blocks: 8,
            sg: sg.clone(),
            tag: 2,
        },
    )
    .expect("read");
    let mut got = Vec::new();
    for v in &sg {
        got.extend_from_slice(unsafe { std::slice::from_raw_parts(v.ptr(), v.len()) });
    }
    let first_bad = got.iter().zip(&expect).position(|(a, b)| a != b);
    assert!(
        first_bad.is_none(),
        "odd shapes read back what was written (sgl: {sgl}); first difference at byte {first_bad:?}, iommu faults {}",
        soft.stats().iommu_faults
    );
    assert_eq!(soft.stats().iommu_faults, 0);
    drop(ch);
    ctrl.unregister_memory(base).expect("unregister");
    bounced
}

#[test]
fn memory_that_prps_cannot_describe_is_bounced_or_sent_as_an_sgl() {
    // Three segments (the long path), and one at an odd byte (one command
    // of one segment: the fast path).
    for segs in [
        &[(100usize, 1000usize), (8192, 2072), (20000 + 1, 1024)][..],
        &[(1, 4096)],
    ] {
        assert_eq!(
            odd_shapes(false, segs),
            1,
            "without SGLs the write is bounced"
        );
        assert_eq!(odd_shapes(true, segs), 0, "with SGLs it is not");
    }
}

#[test]
fn a_request_larger_than_the_queue_is_fed_in_as_slots_free() {
    // Queue of 4 entries (3 commands in flight), 8 KiB commands: a 1 MiB
    // write is 128 commands.
    let (soft, ctrl) = setup(
        SoftConfig {
            namespaces: vec![(4096, 4096)],
            mdts: 1,
            ..SoftConfig::default()
        },
        Options {
            queue_depth: 4,
            ..Options::default()
        },
    );
    let dev = ns(&ctrl, 1);
    let mut ch = dev.open_channel().expect("channel");
    let mut data = vec![0u8; 1 << 20];
    pattern(&mut data, 3);
    one(ch.as_mut(), rw(IoOp::Write, 100, 256, &mut data, 1)).expect("write");
    let mut got = vec![0u8; 1 << 20];
    one(ch.as_mut(), rw(IoOp::Read, 100, 256, &mut got, 2)).expect("read");
    assert!(got == data);
    assert_eq!(soft.stats().largest_transfer, 8192);
    // Write-zeroes and discard of more blocks than one command carries.
    let (_soft2, ctrl2) = setup(
        SoftConfig {
            namespaces: vec![(512, 300_000)],
            ..SoftConfig::default()
        },
        Options::default(),
    );
    let dev2 = ns(&ctrl2, 1);
    let mut ch2 = dev2.open_channel().expect("channel");
    let mut ones = vec![0xffu8; 512];
    for lba in [0u64, 65_535, 65_536, 140_000, 299_999] {
        one(ch2.as_mut(), rw(IoOp::Write, lba, 1, &mut ones, 3)).expect("write");
    }
    one(
        ch2.as_mut(),
        IoRequest::range(IoOp::WriteZeroes, 0, 150_000, 4),
    )
    .expect("write zeroes");
    one(
        ch2.as_mut(),
        IoRequest::range(IoOp::Discard, 150_000, 150_000, 5),
    )
    .expect("discard");
    for lba in [0u64, 65_535, 65_536, 140_000, 299_999] {
        let mut b = vec![1u8; 512];
        one(ch2.as_mut(), rw(IoOp::Read, lba, 1, &mut b, 6)).expect("read");
        assert!(b.iter().all(|&x| x == 0), "block {lba} zeroed");
    }
}

#[test]
fn a_media_error_fails_only_its_request_with_the_block() {
    let (soft, ctrl) = setup(SoftConfig::default(), Options::default());
    let dev = ns(&ctrl, 1);
    let mut ch = dev.open_channel().expect("channel");
    soft.fail_block(1, 42);
    let mut b = vec![0u8; 4096];
    assert_eq!(
        one(ch.as_mut(), rw(IoOp::Read, 42, 1, &mut b, 1)),
        Err(IoError::Media(42))
    );
    assert_eq!(
        one(ch.as_mut(), rw(IoOp::Write, 42, 1, &mut b, 2)),
        Err(IoError::Media(42))
    );
    one(ch.as_mut(), rw(IoOp::Read, 43, 1, &mut b, 3)).expect("the next block reads");
    // Both failed requests are counted (for metrics); nothing timed out.
    let c = dev.error_counts();
    assert_eq!((c.io_errors, c.timeouts, c.aborts, c.resets), (2, 0, 0, 0));
    // So is one on registered memory (the fast path, DMA'd in place).
    let mut reg = Aligned::new(4096);
    // SAFETY: the buffer outlives its registration (dropped below).
    let r = unsafe { bdev::register_dma_memory(reg.buf().as_mut_ptr(), 4096) };
    let bounced = ctrl.bounced_commands();
    assert_eq!(
        one(ch.as_mut(), rw(IoOp::Read, 42, 1, reg.buf(), 4)),
        Err(IoError::Media(42))
    );
    assert_eq!(ctrl.bounced_commands(), bounced, "in place");
    assert_eq!(dev.error_counts().io_errors, 3);
    drop(r);
}

/// A controller with no transfer limit of its own: a megabyte is one
/// command, which needs every bounce page of the channel.
fn one_command_per_megabyte() -> SoftConfig {
    SoftConfig {
        mdts: 0,
        ..SoftConfig::default()
    }
}

/// A megabyte of plain (unregistered) memory written and read back: with
/// [`one_command_per_megabyte`], each needs all of the channel's bounce
/// pages at once, so it hangs (and `one` fails) if a single page leaked.
fn a_bounced_megabyte_each_way(ch: &mut dyn IoChannel, lba: u64, tag: u64) {
    let mut data = vec![0u8; 1 << 20];
    pattern(&mut data, tag as u8);
    one(ch, rw(IoOp::Write, lba, 256, &mut data, tag)).expect("a bounced megabyte written");
    let mut got = vec![0u8; 1 << 20];
    one(ch, rw(IoOp::Read, lba, 256, &mut got, tag + 1)).expect("read back");
    assert!(got == data, "the bounced read copied back what was written");
}

/// Bounce pages come back from commands that fail: more failed bounced
/// reads than a channel has bounce pages, then a megabyte that needs every
/// page at once.
#[test]
fn bounce_pages_come_back_from_failed_commands() {
    let (soft, ctrl) = setup(one_command_per_megabyte(), Options::default());
    let dev = ns(&ctrl, 1);
    let mut ch = dev.open_channel().expect("channel");
    soft.fail_block(1, 42);
    let mut b = vec![0u8; 4096];
    let before = ctrl.bounced_commands();
    for i in 0..300 {
        assert_eq!(
            one(ch.as_mut(), rw(IoOp::Read, 42, 1, &mut b, i)),
            Err(IoError::Media(42))
        );
    }
    assert!(
        ctrl.bounced_commands() - before >= 300,
        "the failed reads were bounced"
    );
    a_bounced_megabyte_each_way(ch.as_mut(), 1024, 1000);
}

/// A bounced request that finds no bounce page free (a megabyte holds
/// them all) goes the long way and waits for them instead of failing; no
/// page is lost on the way.
#[test]
fn a_bounced_request_waits_when_every_bounce_page_is_taken() {
    let (soft, ctrl) = setup(one_command_per_megabyte(), Options::default());
    let dev = ns(&ctrl, 1);
    let mut ch = dev.open_channel().expect("channel");
    soft.set_latency(Duration::from_millis(200));
    let mut big = vec![0u8; 1 << 20];
    let mut small = vec![0u8; 4096];
    let before = ctrl.bounced_commands();
    for req in [
        rw(IoOp::Read, 0, 256, &mut big, 1),
        rw(IoOp::Read, 300, 1, &mut small, 2),
    ] {
        ch.submit(req).map_err(|_| "busy").expect("submit");
    }
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < 2 && Instant::now() < deadline {
        ch.poll(&mut out);
    }
    assert_eq!(out.len(), 2, "both completed");
    assert!(out.iter().all(|c| c.result.is_ok()), "{out:?}");
    assert_eq!(ctrl.bounced_commands() - before, 2);
    soft.set_latency(Duration::ZERO);
    a_bounced_megabyte_each_way(ch.as_mut(), 1024, 10);
}

#[test]
fn a_lost_completion_is_aborted_then_the_controller_reset_and_the_command_retried() {
    let (soft, ctrl) = setup(one_command_per_megabyte(), quick());
    let dev = ns(&ctrl, 1);
    let mut ch = dev.open_channel().expect("channel");
    let mut other = dev.open_channel().expect("second channel");
    let mut data = vec![0u8; 8192];
    pattern(&mut data, 7);
    soft.lose_completions(1);
    let t = Instant::now();
    one(ch.as_mut(), rw(IoOp::Write, 10, 2, &mut data, 1)).expect("write completes after reset");
    assert!(
        t.elapsed() >= quick().io_timeout,
        "it waited for the time-out"
    );
    assert!(soft.stats().enables >= 2, "the controller was reset");
    let mut got = vec![0u8; 8192];
    one(ch.as_mut(), rw(IoOp::Read, 10, 2, &mut got, 2)).expect("read");
    assert!(got == data);
    // The other channel's queue was recreated too.
    one(other.as_mut(), rw(IoOp::Read, 10, 2, &mut got, 3)).expect("read on the other queue");
    assert!(got == data);
    // Resets with IO completing in between never add up to giving up.
    for k in 0..3 {
        soft.lose_completions(1);
        one(
            ch.as_mut(),
            rw(IoOp::Write, 20 + k, 1, &mut data[..4096], 4),
        )
        .expect("write after reset");
    }
    assert!(soft.stats().enables >= 5, "one reset per lost command");
    assert!(!ctrl.is_failed());
    // The retried commands (bounced: plain memory) gave their pages back.
    a_bounced_megabyte_each_way(ch.as_mut(), 1024, 100);
}

#[test]
fn a_slow_command_is_aborted_and_fails_without_a_reset() {
    let (soft, ctrl) = setup(SoftConfig::default(), quick());
    let dev = ns(&ctrl, 1);
    let mut ch = dev.open_channel().expect("channel");
    soft.set_latency(Duration::from_secs(10));
    let mut b = vec![0u8; 4096];
    assert_eq!(
        one(ch.as_mut(), rw(IoOp::Read, 0, 1, &mut b, 1)),
        Err(IoError::TimedOut)
    );
    assert_eq!(soft.stats().aborted, 1);
    soft.set_latency(Duration::ZERO);
    one(ch.as_mut(), rw(IoOp::Read, 0, 1, &mut b, 2)).expect("the queue still works");
    assert_eq!(soft.stats().enables, 1, "no reset was needed");
}

/// From an audit: an abort answered "not aborted" reset the controller at
/// once, though the command had most often just completed, its entry not
/// yet polled; the reset took back every command of every queue. It now
/// gets the time an aborted command gets to come back.
#[test]
fn a_command_that_completes_as_it_is_aborted_costs_no_reset() {
    let (soft, ctrl) = setup(SoftConfig::default(), quick());
    let dev = ns(&ctrl, 1);
    let mut ch = dev.open_channel().expect("channel");
    let mut b = vec![7u8; 4096];
    soft.complete_at_abort(1);
    ch.submit(rw(IoOp::Write, 5, 1, &mut b, 1))
        .map_err(|_| "busy")
        .expect("submit");
    // Polled until its time-out is reported, then not until the abort's
    // answer is in (a busy reactor): its completion is on the queue, not
    // yet seen, when the recovery decides. (It cannot come before the
    // abort, which follows the report.)
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ctrl.error_counts().timeouts == 0 {
        assert!(Instant::now() < deadline, "no time-out was reported");
        ch.poll(&mut out);
        assert!(out.is_empty(), "completed before its abort");
    }
    while ctrl.aborts_not_found() == 0 {
        assert!(Instant::now() < deadline, "no abort was answered");
        std::thread::yield_now();
    }
    while out.is_empty() {
        assert!(Instant::now() < deadline, "the write never completed");
        ch.poll(&mut out);
    }
    assert_eq!(out[0].result, Ok(()));
    // A second command that times out: one thread recovers commands in
    // turn, so its abort comes once the first's recovery is over.
    soft.set_latency(Duration::from_secs(10));
    let mut got = vec![0u8; 4096];
    assert_eq!(
        one(ch.as_mut(), rw(IoOp::Read, 5, 1, &mut got, 2)),
        Err(IoError::TimedOut)
    );
    soft.set_latency(Duration::ZERO);
    assert_eq!(soft.stats().aborted, 1, "only the second was aborted");
    assert_eq!(ctrl.error_counts().resets, 0, "the controller was reset");
    assert_eq!(soft.stats().enables, 1);
    assert!(!ctrl.is_failed());
    one(ch.as_mut(), rw(IoOp::Read, 5, 1, &mut got, 3)).expect("read");
    assert!(got == b);
}

#[test]
fn controller_fatal_status_resets_and_in_flight_io_completes() {
    let (soft, ctrl) = setup(SoftConfig::default(), quick());
    let dev = ns(&ctrl, 1);
    let mut ch = dev.open_channel().expect("channel");
    soft.make_fatal();
    let mut data = vec![5u8; 4096];
    one(ch.as_mut(), rw(IoOp::Write, 3, 1, &mut data, 1)).expect("write survives the reset");
    assert_eq!(soft.stats().enables, 2);
    let mut got = vec![0u8; 4096];
    one(ch.as_mut(), rw(IoOp::Read, 3, 1, &mut got, 2)).expect("read");
    assert!(got == data);
}

/// After a reset a channel makes its queue again; when that Create I/O
/// Completion Queue timed out, the controller was reset again and then
/// failed for good (every namespace on it) though the second reset
/// worked: the queue is made again on the controller that reset left,
/// and the write goes through. (Resets that keep not working still fail
/// it.)
#[test]
fn a_queue_creation_that_times_out_after_a_reset_is_made_again() {
    let (soft, ctrl) = setup(SoftConfig::default(), quick());
    let dev = ns(&ctrl, 1);
    let mut ch = dev.open_channel().expect("channel");
    soft.lose_admin_opcode(nvme::spec::admin::CREATE_CQ, 1);
    soft.make_fatal();
    let mut data = vec![7u8; 4096];
    one(ch.as_mut(), rw(IoOp::Write, 5, 1, &mut data, 1)).expect("write survives both resets");
    assert!(!ctrl.is_failed());
    assert!(soft.stats().enables >= 3, "{:?}", soft.stats());
    let mut got = vec![0u8; 4096];
    one(ch.as_mut(), rw(IoOp::Read, 5, 1, &mut got, 2)).expect("read");
    assert!(got == data);
}

/// A namespace the controller will not describe (a bogus identifier in
/// its active list) failed the controller's bring-up, and every other
/// namespace with it; an NVMe 1.0 controller, which has no active list,
/// could not be brought up at all. The one namespace is left out, with a
/// clear error for whoever names it, and a 1.0 controller's namespaces
/// are found by asking each up to NN.
#[test]
fn a_namespace_that_cannot_be_identified_costs_only_itself() {
    let config = SoftConfig {
        namespaces: vec![(4096, 4096), (512, 8192)],
        ..SoftConfig::default()
    };
    for no_list in [false, true] {
        let soft = SoftController::start("soft-ns", config.clone()).expect("start");
        soft.refuse_identify(1);
        if no_list {
            soft.no_active_list();
        }
        let ctrl = Controller::new(soft.transport(), quick()).expect("bring up");
        assert_eq!(ctrl.namespace_ids(), vec![2], "no_list {no_list}");
        let err = Namespace::new(&ctrl, 1, "ns1").expect_err("ns 1 refused");
        assert!(err.to_string().contains("no active namespace 1"), "{err}");
        let two = ns(&ctrl, 2);
        let mut ch = two.open_channel().expect("channel");
        let mut data = vec![3u8; 512];
        one(ch.as_mut(), rw(IoOp::Write, 9, 1, &mut data, 1)).expect("write");
    }
}

/// A failure the device says may not recur (Namespace Not Ready with Do
/// Not Retry clear) failed the request at once, and a RAID member above
/// it would be failed and rebuilt whole: it is sent again a few times, as
/// Linux does, after a pause. One that keeps failing still fails.
#[test]
fn a_failure_without_do_not_retry_is_sent_again() {
    let (soft, ctrl) = setup(SoftConfig::default(), quick());
    let dev = ns(&ctrl, 1);
    let mut ch = dev.open_channel().expect("channel");
    soft.not_ready(2);
    let mut data = vec![9u8; 4096];
    let t = Instant::now();
    one(ch.as_mut(), rw(IoOp::Write, 4, 1, &mut data, 1)).expect("sent again, done");
    // After a pause each time (100 ms, then 200): a namespace coming
    // ready takes its time.
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    let mut got = vec![0u8; 4096];
    one(ch.as_mut(), rw(IoOp::Read, 4, 1, &mut got, 2)).expect("read");
    assert!(got == data);
    soft.not_ready(100);
    assert!(matches!(
        one(ch.as_mut(), rw(IoOp::Read, 4, 1, &mut got, 3)),
        Err(IoError::Device(_))
    ));
    soft.not_ready(0);
    assert!(!ctrl.is_failed());
}

#[test]
fn surprise_removal_fails_every_request_cleanly() {
    let (soft, ctrl) = setup(SoftConfig::default(), quick());
    let dev = ns(&ctrl, 1);
    let mut ch = dev.open_channel().expect("channel");
    soft.set_latency(Duration::from_secs(10));
    let mut bufs: Vec<Vec<u8>> = (0..8).map(|_| vec![0u8; 4096]).collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        ch.submit(rw(IoOp::Read, i as u64, 1, b, i as u64))
            .map_err(|_| "busy")
            .expect("submit");
    }
    soft.remove();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while out.len() < 8 && Instant::now() < deadline {
        ch.poll(&mut out);
    }
    assert_eq!(out.len(), 8, "every request completed");
    assert!(
        out.iter().all(|c| c.result == Err(IoError::DeviceFailed)),
        "{out:?}"
    );
    assert!(ctrl.is_failed());
    assert_eq!(
        one(ch.as_mut(), rw(IoOp::Read, 0, 1, &mut bufs[0], 9)),
        Err(IoError::DeviceFailed)
    );
    // Every failed request counts, the one refused at submit too.
    assert_eq!(dev.error_counts().io_errors, 9);
    let err = dev
        .open_channel()
        .err()
        .expect("no new queues on a removed device");
    assert!(err.to_string().contains("failed"), "{err}");
}

#[test]
fn bring_up_refuses_what_the_driver_cannot_serve() {
    let (_soft, ctrl) = setup(
        SoftConfig {
            namespaces: vec![(2048, 100)],
            ..SoftConfig::default()
        },
        Options::default(),
    );
    let err = Namespace::new(&ctrl, 1, "odd").expect_err("2 KiB blocks");
    assert!(err.to_string().contains("512 and 4096"), "{err}");
    let err = Namespace::new(&ctrl, 7, "none").expect_err("no namespace 7");
    assert!(err.to_string().contains("no active namespace 7"), "{err}");
    // A removed device is refused at bring-up with a clear error.
    let soft = SoftController::start("gone", SoftConfig::default()).expect("start");
    soft.remove();
    std::thread::sleep(Duration::from_millis(20));
    let err = Controller::new(soft.transport(), quick()).expect_err("removed");
    assert!(err.to_string().contains("all ones"), "{err}");
}

#[test]
fn a_controller_that_never_completes_is_failed_after_three_resets() {
    let (soft, ctrl) = setup(SoftConfig::default(), quick());
    let dev = ns(&ctrl, 1);
    let mut ch = dev.open_channel().expect("channel");
    soft.lose_completions(u32::MAX);
    let mut b = vec![0u8; 4096];
    assert_eq!(
        one(ch.as_mut(), rw(IoOp::Write, 0, 1, &mut b, 1)),
        Err(IoError::DeviceFailed)
    );
    assert!(ctrl.is_failed());
    assert_eq!(
        soft.stats().enables,
        4,
        "bring-up and three resets, then it gave up"
    );
    // From review: memory was still mapped for a failed controller (a
    // device that may still be writing).
    let mut mem = Aligned::new(64 << 10);
    // SAFETY: not registered, nothing to undo.
    let r = unsafe { ctrl.register_memory(mem.buf().as_mut_ptr(), 64 << 10) };
    assert!(r.is_err(), "memory mapped for a failed controller");
}

#[test]
fn memory_registered_with_bdev_is_mapped_by_every_controller_old_and_new() {
    let mut before = Aligned::new(64 << 10);
    let mut after = Aligned::new(64 << 10);
    // SAFETY: both buffers outlive their registrations (dropped below).
    let reg_before = unsafe { bdev::register_dma_memory(before.buf().as_mut_ptr(), 64 << 10) };
    let (_soft, ctrl) = setup(SoftConfig::default(), Options::default());
    let reg_after = unsafe { bdev::register_dma_memory(after.buf().as_mut_ptr(), 64 << 10) };
    let dev = ns(&ctrl, 1);
    let mut ch = dev.open_channel().expect("channel");
    let bounced = ctrl.bounced_commands();
    pattern(before.buf(), 1);
    one(ch.as_mut(), rw(IoOp::Write, 0, 16, before.buf(), 1)).expect("write");
    one(ch.as_mut(), rw(IoOp::Read, 0, 16, after.buf(), 2)).expect("read");
    assert!(before.buf() == after.buf());
    assert_eq!(
        ctrl.bounced_commands(),
        bounced,
        "both regions were DMA'd in place"
    );
    drop(reg_after);
    one(ch.as_mut(), rw(IoOp::Read, 0, 16, after.buf(), 3)).expect("read");
    assert_eq!(
        ctrl.bounced_commands(),
        bounced + 1,
        "unregistered memory is bounced"
    );
    drop(reg_before);
}

#[test]
fn a_namespace_attached_after_bring_up_can_be_opened() {
    let (soft, ctrl) = setup(SoftConfig::default(), Options::default());
    assert_eq!(ctrl.namespace_ids(), vec![1]);
    let err = Namespace::new(&ctrl, 2, "ns2").expect_err("not there yet");
    assert!(err.to_string().contains("no active namespace 2"), "{err}");
    soft.attach_namespace(512, 2048);
    let dev = ns(&ctrl, 2);
    assert_eq!((dev.info().block_size, dev.info().num_blocks), (512, 2048));
    assert_eq!(ctrl.namespace_ids(), vec![1, 2]);
    let mut ch = dev.open_channel().expect("channel");
    let mut b = vec![7u8; 512];
    one(ch.as_mut(), rw(IoOp::Write, 2047, 1, &mut b, 1)).expect("write the last block");
}

#[test]
fn hangs_seen_by_several_channels_at_once_cost_one_reset() {
    let (soft, ctrl) = setup(SoftConfig::default(), quick());
    let dev = ns(&ctrl, 1);
    let mut chans: Vec<Box<dyn IoChannel>> = (0..3)
        .map(|_| dev.open_channel().expect("channel"))
        .collect();
    // One lost command on each of the three queues.
    soft.lose_completions(3);
    let mut bufs: Vec<Vec<u8>> = (0..3).map(|i| vec![i as u8 + 1; 4096]).collect();
    for (i, (ch, b)) in chans.iter_mut().zip(bufs.iter_mut()).enumerate() {
        ch.submit(rw(IoOp::Write, i as u64, 1, b, i as u64))
            .map_err(|_| "busy")
            .expect("submit");
    }
    let mut done = [false; 3];
    let deadline = Instant::now() + Duration::from_secs(20);
    while done.iter().any(|d| !d) && Instant::now() < deadline {
        for (i, ch) in chans.iter_mut().enumerate() {
            let mut out = Vec::new();
            ch.poll(&mut out);
            for c in out {
                assert_eq!(c.result, Ok(()), "write {i} survives the reset");
                done[i] = true;
            }
        }
    }
    assert!(done.iter().all(|&d| d), "every write completed");
    // Without the generation check each hang would cost its own reset
    // (four enables); one reset serves all three.
    assert!(
        soft.stats().enables <= 3,
        "three hangs seen at once cost {} resets",
        soft.stats().enables - 1
    );
    assert!(!ctrl.is_failed());
    for (i, ch) in chans.iter_mut().enumerate() {
        let mut got = vec![0u8; 4096];
        one(ch.as_mut(), rw(IoOp::Read, i as u64, 1, &mut got, 10)).expect("read");
        assert!(got.iter().all(|&x| x == i as u8 + 1));
    }
}

#[test]
fn a_lost_admin_command_resets_the_controller_and_io_goes_on() {
    let (soft, ctrl) = setup(SoftConfig::default(), quick());
    let dev = ns(&ctrl, 1);
    let mut ch = dev.open_channel().expect("channel");
    let mut data = vec![3u8; 4096];
    one(ch.as_mut(), rw(IoOp::Write, 5, 1, &mut data, 1)).expect("write");
    // Looking for namespace 2 rescans: that Identify is lost.
    soft.lose_admin_completions(1);
    let err = Namespace::new(&ctrl, 2, "ns2").expect_err("the Identify timed out");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(soft.stats().enables >= 2, "the controller was reset");
    let mut got = vec![0u8; 4096];
    one(ch.as_mut(), rw(IoOp::Read, 5, 1, &mut got, 2)).expect("the channel recovered");
    assert!(got == data);
    assert!(!ctrl.is_failed());
}

/// Issue 18, point 10: a command that times out is recovered off the
/// thread that polls its queue. Two controllers are polled on one thread,
/// as a reactor polls its devices; A loses a write and its admin queue
/// hangs (the abort waits there until the test releases it). Every poll of
/// A returns at once meanwhile, B keeps serving verified IO on the same
/// thread, and once the admin queue moves, A aborts, resets and completes
/// the write.
#[test]
fn a_timed_out_command_is_recovered_off_the_polling_thread() {
    // A poll that waited for the held abort would take the admin time-out.
    let opts = Options {
        io_timeout: Duration::from_millis(200),
        admin_timeout: Duration::from_secs(20),
        ..Options::default()
    };
    let soft_a = SoftController::start("soft-a", SoftConfig::default()).expect("start a");
    let ctrl_a = Controller::new(soft_a.transport(), opts.clone()).expect("bring up a");
    let soft_b = SoftController::start("soft-b", SoftConfig::default()).expect("start b");
    let ctrl_b = Controller::new(soft_b.transport(), opts).expect("bring up b");
    let (a, b) = (ns(&ctrl_a, 1), ns(&ctrl_b, 1));
    let mut cha = a.open_channel().expect("channel on a");
    let mut chb = b.open_channel().expect("channel on b");

    soft_a.lose_completions(1);
    soft_a.hold_admin();
    let mut data = vec![0u8; 4096];
    pattern(&mut data, 9);
    cha.submit(rw(IoOp::Write, 7, 1, &mut data, 1))
        .map_err(|_| "busy")
        .expect("submit");
    let mut slowest = Duration::ZERO;
    let mut out = Vec::new();
    let mut served_while_held = 0u32;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut wb, mut rb) = (vec![0u8; 4096], vec![0u8; 4096]);
    let mut k = 0u64;
    while served_while_held < 100 {
        assert!(
            Instant::now() < deadline,
            "the abort never reached A's admin queue"
        );
        let t = Instant::now();
        cha.poll(&mut out);
        slowest = slowest.max(t.elapsed());
        assert!(out.is_empty(), "the lost write completed: {out:?}");
        // One verified write and read on B, on the same thread.
        k += 1;
        pattern(&mut wb, k as u8);
        one(chb.as_mut(), rw(IoOp::Write, k % 64, 1, &mut wb, 2 * k)).expect("write on b");
        one(chb.as_mut(), rw(IoOp::Read, k % 64, 1, &mut rb, 2 * k + 1)).expect("read on b");
        assert!(rb == wb, "b read back what it wrote");
        if soft_a.admin_waiting() > 0 {
            served_while_held += 1;
        }
    }
    assert!(
        slowest < Duration::from_secs(5),
        "a poll of A blocked for {slowest:?} while its recovery waited"
    );

    // The abort runs (the lost command is not found), the controller is
    // reset, and the write is resubmitted and completes.
    soft_a.release_admin();
    while out.is_empty() {
        assert!(Instant::now() < deadline, "the write never completed");
        cha.poll(&mut out);
    }
    assert_eq!(out[0].result, Ok(()), "{out:?}");
    let mut got = vec![0u8; 4096];
    one(cha.as_mut(), rw(IoOp::Read, 7, 1, &mut got, 99)).expect("read on a");
    assert!(got == data);
    assert!(soft_a.stats().enables >= 2, "A was reset");
    assert!(!ctrl_a.is_failed() && !ctrl_b.is_failed());
    // Counted for metrics: at least the one time-out, its abort and the
    // reset (a slow machine may time out more; never fewer).
    let c = a.error_counts();
    assert!(c.timeouts >= 1 && c.aborts >= 1 && c.resets >= 1, "{c:?}");
}

/// A command the device neither completes nor aborts, while it completes
/// everything else, is failed as timed out after a few resets: before,
/// each reset resubmitted it, each good completion meanwhile cleared the
/// count of fruitless resets, and its request was never answered (nor
/// could a RAID above fail the member over). The controller stays up and
/// other IO goes on.
#[test]
fn a_command_the_device_never_completes_is_failed_not_resubmitted_for_good() {
    let (soft, ctrl) = setup(SoftConfig::default(), quick());
    soft.hang_block(1, 7);
    let dev = ns(&ctrl, 1);
    let mut ch = dev.open_channel().expect("channel");
    let mut stuck = vec![0u8; 4096];
    ch.submit(rw(IoOp::Read, 7, 1, &mut stuck, 99))
        .expect("submitted");
    let mut other = vec![0u8; 4096];
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut other_busy = false;
    let mut answer = None;
    let result = loop {
        // Good IO goes on meanwhile, each completion a success.
        if !other_busy {
            other_busy = ch.submit(rw(IoOp::Read, 100, 1, &mut other, 1)).is_ok();
        }
        ch.poll(&mut out);
        for c in out.drain(..) {
            if c.tag == 99 {
                answer = Some(c.result);
            } else {
                assert_eq!(c.result, Ok(()), "other IO");
                other_busy = false;
            }
        }
        if let Some(r) = answer {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the stuck read was never answered ({} resets)",
            soft.stats().enables - 1
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(result, Err(IoError::TimedOut));
    assert!(!ctrl.is_failed());
    one(ch.as_mut(), rw(IoOp::Read, 8, 1, &mut other, 2)).expect("IO after");
}

/// A namespace whose size the device makes up (none, or past 2^63 bytes)
/// is refused clearly; every byte count made of it would overflow.
#[test]
fn a_namespace_of_no_blocks_or_beyond_two_to_the_63_bytes_is_refused() {
    let config = SoftConfig {
        namespaces: vec![
            (4096, 0),
            (4096, 1 << 52),
            (512, u64::MAX),
            (4096, (1 << 51) - 1),
        ],
        null_data: true,
        ..SoftConfig::default()
    };
    let (_soft, ctrl) = setup(config, quick());
    for nsid in 1..=3 {
        let e = Namespace::new(&ctrl, nsid, "huge").expect_err("refused");
        assert!(e.to_string().contains("reports"), "{e}");
    }
    assert_eq!(ns(&ctrl, 4).info().num_blocks, (1 << 51) - 1);
}

/// From review: a queue whose creation timed out was left on the device
/// while its memory was freed (and, with IO addresses now handed out
/// again, mapped for something else): the device could write completions
/// there, and the queue ID stayed taken, so every later channel failed
/// with "invalid queue identifier". The controller is reset first. The
/// channel does not wait for any of it when it opens: its requests wait
/// for the creation, and fail with it (once: each time-out costs a reset).
/// Its only queue ID comes back for the next channel.
#[test]
fn a_queue_whose_creation_timed_out_is_taken_off_the_device() {
    let (soft, ctrl) = setup(
        SoftConfig {
            max_io_queues: 1,
            ..SoftConfig::default()
        },
        quick(),
    );
    let dev = ns(&ctrl, 1);
    let before = soft.stats().enables;
    // The Create I/O Completion Queue runs on the device; its completion
    // is lost.
    soft.lose_admin_completions(1);
    let mut ch = dev.open_channel().expect("the channel opens");
    let mut data = vec![9u8; 4096];
    assert_eq!(
        one(ch.as_mut(), rw(IoOp::Write, 7, 1, &mut data, 1)),
        Err(IoError::DeviceFailed),
        "a request on a channel whose queue was not made"
    );
    let reset = soft.stats().enables;
    assert!(reset > before, "the controller was reset");
    // Not sent to the queue the device does not have (where it timed
    // out, and its abort reset the controller: review).
    assert_eq!(
        one(ch.as_mut(), rw(IoOp::Write, 7, 1, &mut data, 2)),
        Err(IoError::DeviceFailed)
    );
    assert_eq!(soft.stats().enables, reset, "another reset");
    drop(ch);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut ch = loop {
        match dev.open_channel() {
            Ok(ch) => break ch,
            Err(bdev::BdevError::Exhausted(_)) if Instant::now() < deadline => {
                std::thread::yield_now()
            }
            Err(e) => panic!("the queue ID did not come back: {e}"),
        }
    };
    one(ch.as_mut(), rw(IoOp::Write, 7, 1, &mut data, 3)).expect("write");
    let mut got = vec![0u8; 4096];
    one(ch.as_mut(), rw(IoOp::Read, 7, 1, &mut got, 4)).expect("read");
    assert!(got == data);
    assert!(!ctrl.is_failed());
    assert_eq!(soft.stats().iommu_faults, 0);
}

/// From review: a controller failed without its disable confirmed had
/// its mappings taken away, but their IO addresses (and its queues', once
/// their channels went) were handed out again (iova.rs reuses them): a
/// late write of a device that did not stop landed in memory mapped
/// later. They are never used again, and the device loses bus mastering.
#[test]
fn a_device_that_does_not_stop_never_gets_its_addresses_reused() {
    let (soft, ctrl) = setup(SoftConfig::default(), quick());
    let dev = ns(&ctrl, 1);
    let mut ch = dev.open_channel().expect("channel");
    let t = soft.transport();
    soft.ignore_disable(true);
    soft.lose_completions(u32::MAX);
    let mut b = vec![0u8; 4096];
    assert_eq!(
        one(ch.as_mut(), rw(IoOp::Write, 0, 1, &mut b, 1)),
        Err(IoError::DeviceFailed)
    );
    assert!(ctrl.is_failed());
    drop(ch);
    // Its bus mastering is off: without an IOMMU the only guard of memory
    // freed and used again, its addresses being physical (audit).
    assert!(!soft.bus_master(), "bus mastering was left on");
    let (mut x, mut y) = (Aligned::new(4096), Aligned::new(4096));
    // SAFETY: both outlive their mappings.
    let at = unsafe { t.map(x.buf().as_mut_ptr(), 4096) }.unwrap();
    t.unmap(at, 4096);
    let again = unsafe { t.map(y.buf().as_mut_ptr(), 4096) }.unwrap();
    assert_ne!(
        at, again,
        "an address of the device that did not stop was used again"
    );
    t.unmap(again, 4096);
}

/// From an audit: an admin command that saw the registers read all ones
/// gave up with "device removed" and left the controller alive, the
/// command still queued: a device that had only lost its register reads
/// could still run it, and write the admin buffer the next command
/// copies out. The controller is failed, as the recovery thread fails it.
#[test]
fn an_admin_command_that_finds_the_device_gone_fails_the_controller() {
    let (soft, ctrl) = setup(SoftConfig::default(), quick());
    soft.hold_admin();
    soft.lose_status();
    // A namespace not known yet: its Identify goes to the admin queue.
    let err = Namespace::new(&ctrl, 9, "x")
        .map(|_| ())
        .expect_err("identify");
    assert!(err.to_string().contains("removed"), "{err}");
    assert!(ctrl.is_failed());
}

/// An abort names its command by queue and identifier only, and a
/// completion is matched by identifier. Free slots were taken last-freed
/// first, so at queue depth 1 every command had the same slot, and its
/// identifier (4 bits of reuse count above the slot) came back within 16
/// commands: an abort of a command that had just completed could cancel
/// an innocent one, and a device's duplicate completion finish it (audit).
/// A freed slot is taken again last now.
#[test]
fn an_identifier_comes_back_only_after_every_slot_was_used() {
    let (soft, ctrl) = setup(SoftConfig::default(), quick());
    let dev = ns(&ctrl, 1);
    let mut ch = dev.open_channel().expect("channel");
    soft.record_cids();
    let mut b = vec![0u8; 4096];
    for i in 0..40 {
        one(ch.as_mut(), rw(IoOp::Read, i, 1, &mut b, i)).expect("read");
    }
    let cids = soft.cids();
    let distinct: std::collections::HashSet<u16> = cids.iter().copied().collect();
    assert_eq!(cids.len(), 40);
    assert_eq!(distinct.len(), 40, "identifiers used again: {cids:?}");
}

/// Making a queue again after a reset is admin work: seconds when the
/// device is slow, and a reset more when a creation times out. It ran
/// inside the channel's poll, and held the polling thread (a reactor, and
/// every device and export on it) for as long (audit). It runs on a thread
/// of its own now: the channel's calls return at once meanwhile, and the
/// request goes on once the queue is there.
#[test]
fn a_queue_made_again_after_a_reset_does_not_hold_the_polling_thread() {
    let opts = quick();
    let (soft, ctrl) = setup(SoftConfig::default(), opts.clone());
    let dev = ns(&ctrl, 1);
    let mut ch = dev.open_channel().expect("channel");
    // The creation after the reset is lost: it times out (the admin
    // time-out), the controller is reset again, and the queue made then.
    soft.lose_admin_opcode(nvme::spec::admin::CREATE_CQ, 1);
    soft.make_fatal();
    let mut data = vec![9u8; 4096];
    let mut longest = Duration::ZERO;
    let mut req = Some(rw(IoOp::Write, 5, 1, &mut data, 1));
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.is_empty() {
        assert!(Instant::now() < deadline, "the write never completed");
        let t = Instant::now();
        if let Some(r) = req.take() {
            if let Err(bdev::SubmitError::Busy(r)) = ch.submit(r) {
                req = Some(r);
            }
        }
        ch.poll(&mut out);
        longest = longest.max(t.elapsed());
    }
    assert_eq!(out[0].result, Ok(()), "the write survives both resets");
    assert!(soft.stats().enables >= 3, "{:?}", soft.stats());
    assert!(
        longest < opts.admin_timeout,
        "a call held the polling thread for {longest:?}"
    );
}
