//! The verified clients: each writes and reads its own blocks through an
//! export with the real vhost-user client (blkio) and keeps a model of
//! what each block holds; the test steers them (pause, verify, run).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::common::Disk;

pub const BS: usize = 4096;
/// Blocks each client owns (disjoint ranges of its volume).
pub const CLIENT_BLOCKS: u64 = 256;
pub const LONG: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Want {
    Run,
    Pause,
    Verify,
}

#[derive(Default)]
pub struct Ctl {
    pub want: Mutex<Option<Want>>,
    /// What the client did last: Paused or Verified (with the pass's
    /// mismatches), or running.
    pub done: Mutex<Option<Want>>,
    pub cv: Condvar,
    pub stop: AtomicBool,
    pub ios: AtomicU64,
    pub errors: AtomicU64,
    pub mismatches: AtomicU64,
    pub first_problem: Mutex<Option<String>>,
    /// When the request the client waits for went out (for the watchdog).
    pub busy: Mutex<Option<Instant>>,
    /// The longest a request took, in microseconds.
    pub longest_us: AtomicU64,
}

impl Ctl {
    pub fn problem(&self, what: String) {
        let mut p = self.first_problem.lock().unwrap();
        if p.is_none() {
            *p = Some(what);
        }
    }

    /// Ask for `w` and wait until the client did it; false if it did not
    /// within `LONG` (its IO hangs).
    #[must_use]
    pub fn ask(&self, w: Want) -> bool {
        *self.done.lock().unwrap() = None;
        *self.want.lock().unwrap() = Some(w);
        self.cv.notify_all();
        let t = Instant::now();
        let mut done = self.done.lock().unwrap();
        while *done != Some(w) {
            if t.elapsed() > LONG {
                return false;
            }
            done = self
                .cv
                .wait_timeout(done, Duration::from_millis(50))
                .unwrap()
                .0;
        }
        true
    }

    pub fn run(&self) {
        *self.want.lock().unwrap() = Some(Want::Run);
        self.cv.notify_all();
    }

    pub fn take_want(&self) -> Option<Want> {
        self.want.lock().unwrap().take()
    }

    pub fn did(&self, w: Want) {
        *self.done.lock().unwrap() = Some(w);
        self.cv.notify_all();
    }
}

pub fn block_data(tag: u64, block: u64, seq: u64) -> Vec<u8> {
    if seq == 0 {
        return vec![0; BS];
    }
    super::common::pattern(
        tag ^ seq.wrapping_mul(0x2545_f491_4f6c_dd1d),
        block * BS as u64,
        BS,
    )
}

/// A thread writing and reading its own blocks through an export, with a
/// model of what each holds.
pub struct Client {
    pub ctl: Arc<Ctl>,
    pub thread: Option<std::thread::JoinHandle<()>>,
}

impl Client {
    pub fn start(sock: PathBuf, tag: u64, first: u64, seed: u64) -> Client {
        let ctl = Arc::new(Ctl::default());
        let c = ctl.clone();
        let thread = std::thread::spawn(move || client(sock, tag, first, seed, &c));
        Client {
            ctl,
            thread: Some(thread),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.ctl.stop.store(true, Ordering::SeqCst);
        self.ctl.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn client(sock: PathBuf, tag: u64, first: u64, seed: u64, ctl: &Ctl) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = vec![0u64; CLIENT_BLOCKS as usize];
    let mut seq = 0u64;
    let mut disk: Option<Disk> = None;
    let mut paused = false;
    while !ctl.stop.load(Ordering::SeqCst) {
        match ctl.take_want() {
            Some(Want::Pause) => {
                disk = None;
                paused = true;
                ctl.did(Want::Pause);
            }
            Some(Want::Run) => paused = false,
            Some(Want::Verify) => {
                if let Some(d) = disk.as_mut() {
                    for b in 0..CLIENT_BLOCKS {
                        check(d, tag, first, b, model[b as usize], ctl);
                    }
                }
                ctl.did(Want::Verify);
            }
            None => {}
        }
        if paused {
            let g = ctl.want.lock().unwrap();
            let _ = ctl.cv.wait_timeout(g, Duration::from_millis(20)).unwrap();
            continue;
        }
        let d = match disk.as_mut() {
            Some(d) => d,
            None => match Disk::connect(&sock) {
                Ok(d) => disk.insert(d),
                Err(e) => {
                    ctl.problem(format!("connecting to {}: {e}", sock.display()));
                    ctl.errors.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            },
        };
        let b = rng.gen_range(0..CLIENT_BLOCKS);
        *ctl.busy.lock().unwrap() = Some(Instant::now());
        if rng.gen_bool(0.5) {
            seq += 1;
            let data = block_data(tag, first + b, seq);
            d.buf()[..BS].copy_from_slice(&data);
            let r = d.write((first + b) * BS as u64, BS);
            if r == 0 {
                model[b as usize] = seq;
            } else {
                ctl.errors.fetch_add(1, Ordering::SeqCst);
                ctl.problem(format!("write of block {} failed: {r}", first + b));
            }
        } else {
            check(d, tag, first, b, model[b as usize], ctl);
        }
        if let Some(t) = ctl.busy.lock().unwrap().take() {
            ctl.longest_us
                .fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        ctl.ios.fetch_add(1, Ordering::Relaxed);
    }
}

pub fn check(d: &mut Disk, tag: u64, first: u64, b: u64, seq: u64, ctl: &Ctl) {
    let r = d.read((first + b) * BS as u64, BS);
    if r != 0 {
        ctl.errors.fetch_add(1, Ordering::SeqCst);
        ctl.problem(format!("read of block {} failed: {r}", first + b));
        return;
    }
    if d.buf()[..BS] != block_data(tag, first + b, seq)[..] {
        ctl.mismatches.fetch_add(1, Ordering::SeqCst);
        // What it holds instead, for the report: an older write of this
        // block (how many seqs back), zeroes, or something else.
        let got = d.buf()[..BS].to_vec();
        let older = (1..=seq.min(20_000))
            .map(|k| seq - k)
            .find(|&s| got == block_data(tag, first + b, s));
        ctl.problem(format!(
            "block {} does not hold its last acknowledged write (seq {seq}); it holds {}",
            first + b,
            match older {
                Some(0) => "zeroes (never written)".to_string(),
                Some(s) => format!("seq {s}"),
                None => "something never written to it".to_string(),
            }
        ));
    }
}
