//! XOR parity kernels with runtime CPU dispatch: AVX-512, AVX2, then a
//! portable 64-bit loop (which the compiler vectorises with SSE2).
//!
//! All kernels fold any number of sources into a destination in one pass
//! over memory, four sources at a time, so parity of n-1 chunks costs about
//! one read of each source and one write of the result. Above
//! [`STREAM_BYTES`] the SIMD kernels store with non-temporal stores: the
//! result is not read back soon, and a normal store would first read each
//! destination line (a sixth of the traffic with four sources).
//!
//! Which kernel runs is chosen once, as md's `calibrate_xor_blocks` does,
//! by timing each kernel this CPU can run; but for two buffer sizes, four
//! 4 KiB sources (in L1) and four 64 KiB ones (in L2), since the fastest
//! differs: here 512-bit vectors won the first and lost the second to
//! 256-bit ones by about a tenth (wider is not always faster: AVX-512 can
//! lower the clock). Buffers up to [`SMALL_BYTES`] use the first choice,
//! larger ones the second. The choices and every kernel's speed are logged
//! and exported.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

type Kernel = unsafe fn(dst: *mut u8, srcs: &[*const u8], len: usize, init: bool);

/// Destinations at least this large (and 64-byte aligned) are written
/// with non-temporal stores: larger than a core's share of the last-level
/// cache on the machines we run on, so the result would be evicted before
/// it is read anyway.
pub const STREAM_BYTES: usize = 4 << 20;

/// Buffers up to this many bytes use the kernel that was fastest on 4 KiB
/// sources; larger ones the one fastest on 64 KiB sources.
pub const SMALL_BYTES: usize = 8 << 10;

/// The buffer sizes the calibration times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeClass {
    /// Up to [`SMALL_BYTES`], timed with 4 KiB sources.
    Small,
    /// Larger, timed with 64 KiB sources.
    Large,
}

impl SizeClass {
    /// Both classes.
    pub const ALL: [SizeClass; 2] = [SizeClass::Small, SizeClass::Large];

    /// The class of a buffer of `len` bytes.
    pub fn of(len: usize) -> SizeClass {
        if len <= SMALL_BYTES {
            SizeClass::Small
        } else {
            SizeClass::Large
        }
    }

    /// Bytes of each of the four sources the calibration XORs.
    pub fn calibration_len(self) -> usize {
        match self {
            SizeClass::Small => 4 << 10,
            SizeClass::Large => 64 << 10,
        }
    }

    /// "small" or "large".
    pub fn label(self) -> &'static str {
        match self {
            SizeClass::Small => "small",
            SizeClass::Large => "large",
        }
    }
}

/// One kernel's calibration result.
#[derive(Debug, Clone, Copy)]
pub struct KernelSpeed {
    /// Kernel name ("avx512", "avx512vl", "avx2", "portable").
    pub name: &'static str,
    /// Source bytes XORed per second, by [`SizeClass`] (small, large).
    pub bytes_per_sec: [f64; 2],
}

/// What the calibration measured and chose.
pub struct Calibration {
    /// Every kernel this CPU runs, best guess first.
    pub speeds: Vec<KernelSpeed>,
    chosen: [(Kernel, &'static str); 2],
}

impl Calibration {
    /// The kernel buffers of `class` use.
    pub fn chosen(&self, class: SizeClass) -> &'static str {
        self.chosen[class as usize].1
    }

    fn kernel(&self, len: usize) -> Kernel {
        self.chosen[SizeClass::of(len) as usize].0
    }
}

/// The kernels this CPU can run, best guess first.
fn candidates() -> Vec<(Kernel, &'static str)> {
    let mut k: Vec<(Kernel, &'static str)> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            k.push((xor_avx512 as Kernel, "avx512"));
            if std::is_x86_feature_detected!("avx512vl") {
                k.push((xor_avx512vl as Kernel, "avx512vl"));
            }
        }
        if std::is_x86_feature_detected!("avx2") {
            k.push((xor_avx2 as Kernel, "avx2"));
        }
    }
    k.push((xor_portable as Kernel, "portable"));
    k
}

/// Source bytes per second of each kernel over four sources of `len`
/// bytes, 64-byte aligned as stripe buffers are.
///
/// Without `settle`: the best of a few short rounds, the kernels taking
/// turns (a preempted round only lowers one round's figure). With it, each
/// kernel in turn runs unmeasured for a while and is then timed over
/// rounds back to back (the best of six, so a preemption lowers only some):
/// on 64 KiB buffers the 512-bit kernel ran at
/// 136 GB/s in 250 us bursts between the others, but at 107-118 once it
/// had run for 20 ms or more, where the 256-bit ones and a plain C loop
/// held 121-134 (on 4 KiB buffers it stays fastest however long it runs).
/// The short bursts chose it for the buffers it is slowest on.
fn measure(kernels: &[Kernel], len: usize, settle: bool) -> Vec<f64> {
    const SOURCES: usize = 4;
    let (rounds, per_round, warm) = if settle {
        (6, Duration::from_millis(1), Duration::from_millis(20))
    } else {
        (8, Duration::from_micros(250), Duration::ZERO)
    };
    // One allocation per buffer, as stripe buffers are (one per member).
    let mut raw: Vec<Vec<u8>> = (0..=SOURCES).map(|i| vec![i as u8 + 1; len + 64]).collect();
    let mut at: Vec<*mut u8> = raw
        .iter_mut()
        .map(|v| {
            let off = v.as_ptr().align_offset(64);
            v[off..].as_mut_ptr()
        })
        .collect();
    let dst = at.remove(0);
    let ptrs: Vec<*const u8> = at.iter().map(|p| p.cast_const()).collect();
    // SAFETY: every buffer is `len` bytes inside `raw` (64 spare bytes
    // cover the alignment); the kernel runs on this CPU (`candidates`).
    let run_for = |k: Kernel, d: Duration| {
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed() < d {
            for _ in 0..4 {
                unsafe { k(dst, &ptrs, len, true) };
                std::hint::black_box(dst);
            }
            n += 4;
        }
        (n * (len * SOURCES) as u64) as f64 / t.elapsed().as_secs_f64()
    };
    let mut best = vec![0f64; kernels.len()];
    if settle {
        for (&k, b) in kernels.iter().zip(best.iter_mut()) {
            run_for(k, warm);
            for _ in 0..rounds {
                *b = b.max(run_for(k, per_round));
            }
        }
    } else {
        for _ in 0..rounds {
            for (&k, b) in kernels.iter().zip(best.iter_mut()) {
                *b = b.max(run_for(k, per_round));
            }
        }
    }
    best
}

/// Kernels within this factor of the fastest count as equally fast (the
/// last of them in the list is chosen: see [`choose`]).
const WIDER_MARGIN: f64 = 1.03;

/// Which of the kernels (in [`candidates`]' order: widest, then the
/// simpler ones, the portable loop last) to use, given their measured
/// speeds: the last one within [`WIDER_MARGIN`] of the fastest. Within
/// that margin the figures are noise, and the wider kernels are the ones
/// whose measured speed does not always last: one start in about twenty
/// the 512-bit kernel timed on a par with the 256-bit ones on 64 KiB
/// buffers (136 against 137 GB/s) and then ran at 115 against their 134
/// in use.
fn choose(speeds: &[f64]) -> usize {
    let fastest = speeds.iter().copied().fold(f64::MIN, f64::max);
    (0..speeds.len())
        .rev()
        .find(|&i| speeds[i] * WIDER_MARGIN >= fastest)
        .unwrap_or(0)
}

/// Choose the kernels now (the daemon calls this at start, so the choice
/// is in its log before any IO; otherwise the first XOR does it) and say
/// which and how fast each was.
pub fn calibrate() -> &'static Calibration {
    static C: OnceLock<Calibration> = OnceLock::new();
    C.get_or_init(|| {
        let cands = candidates();
        let kernels: Vec<Kernel> = cands.iter().map(|c| c.0).collect();
        let small = measure(&kernels, SizeClass::Small.calibration_len(), false);
        let large = measure(&kernels, SizeClass::Large.calibration_len(), true);
        let speeds: Vec<KernelSpeed> = cands
            .iter()
            .enumerate()
            .map(|(i, &(_, name))| KernelSpeed {
                name,
                bytes_per_sec: [small[i], large[i]],
            })
            .collect();
        let best = |class: SizeClass| {
            let of_class: Vec<f64> = speeds
                .iter()
                .map(|s| s.bytes_per_sec[class as usize])
                .collect();
            cands[choose(&of_class)]
        };
        Calibration {
            chosen: [best(SizeClass::Small), best(SizeClass::Large)],
            speeds,
        }
    })
}

/// The kernel buffers of `len` bytes use.
pub fn kernel_name(len: usize) -> &'static str {
    calibrate().chosen(SizeClass::of(len))
}

/// `dst = srcs[0] ^ srcs[1] ^ ...` (all the same length as `dst`).
///
/// # Panics
/// If `srcs` is empty or a source's length differs from `dst`'s.
pub fn xor_gen(dst: &mut [u8], srcs: &[&[u8]]) {
    run(dst, srcs, true)
}

/// `dst ^= srcs[0] ^ srcs[1] ^ ...`.
///
/// # Panics
/// If a source's length differs from `dst`'s.
pub fn xor_into(dst: &mut [u8], srcs: &[&[u8]]) {
    run(dst, srcs, false)
}

/// A kernel picked by name instead of the chosen one (benchmarks compare
/// them); see [`kernel_named`].
#[derive(Clone, Copy)]
pub struct NamedKernel(Kernel);

impl NamedKernel {
    /// [`xor_gen`] with this kernel.
    ///
    /// # Panics
    /// As [`xor_gen`].
    pub fn xor_gen(&self, dst: &mut [u8], srcs: &[&[u8]]) {
        run_kernel(self.0, dst, srcs, true)
    }
}

/// The kernel called `name` ("avx512", "avx512vl", "avx2", "portable"),
/// if this CPU runs it.
pub fn kernel_named(name: &str) -> Option<NamedKernel> {
    candidates()
        .into_iter()
        .find(|c| c.1 == name)
        .map(|c| NamedKernel(c.0))
}

fn run(dst: &mut [u8], srcs: &[&[u8]], init: bool) {
    run_kernel(calibrate().kernel(dst.len()), dst, srcs, init)
}

fn run_kernel(k: Kernel, dst: &mut [u8], srcs: &[&[u8]], init: bool) {
    assert!(
        !(init && srcs.is_empty()),
        "xor_gen needs at least one source"
    );
    assert!(
        srcs.iter().all(|s| s.len() == dst.len()),
        "xor sources must match the destination length"
    );
    let ptrs: smallvec::SmallVec<[*const u8; 16]> = srcs.iter().map(|s| s.as_ptr()).collect();
    // SAFETY: lengths checked above; the kernel runs on this CPU.
    unsafe { k(dst.as_mut_ptr(), &ptrs, dst.len(), init) }
}

/// Call `$blocks` with the sources as a fixed-size array for the counts a
/// RAID5 stripe has most often (2 to 7 chunks), so the loop over
/// them unrolls and their pointers stay in registers: at 64 KiB with 4
/// sources the slice loop ran at 0.71 of a plain C loop compiled with
/// -O3 -march=native. Other counts go through the slice.
#[cfg(target_arch = "x86_64")]
macro_rules! with_fixed_sources {
    ($blocks:ident, $nt:literal, $dst:expr, $srcs:expr, $len:expr, $init:expr) => {{
        let s: &[*const u8] = $srcs;
        match s.len() {
            2 => $blocks::<$nt, [*const u8; 2]>($dst, [s[0], s[1]], $len, $init),
            3 => $blocks::<$nt, [*const u8; 3]>($dst, [s[0], s[1], s[2]], $len, $init),
            4 => $blocks::<$nt, [*const u8; 4]>($dst, [s[0], s[1], s[2], s[3]], $len, $init),
            5 => $blocks::<$nt, [*const u8; 5]>($dst, [s[0], s[1], s[2], s[3], s[4]], $len, $init),
            6 => $blocks::<$nt, [*const u8; 6]>(
                $dst,
                [s[0], s[1], s[2], s[3], s[4], s[5]],
                $len,
                $init,
            ),
            7 => $blocks::<$nt, [*const u8; 7]>(
                $dst,
                [s[0], s[1], s[2], s[3], s[4], s[5], s[6]],
                $len,
                $init,
            ),
            _ => $blocks::<$nt, &[*const u8]>($dst, s, $len, $init),
        }
    }};
}

/// Whether a destination is written with non-temporal stores: large, and
/// aligned as they require (64 bytes covers both SIMD widths).
#[cfg(target_arch = "x86_64")]
fn streams(dst: *mut u8, len: usize) -> bool {
    len >= STREAM_BYTES && (dst as usize).is_multiple_of(64)
}

/// The bytes after the first `done` (the SIMD kernels' whole blocks),
/// by the portable loop.
///
/// # Safety
/// `dst` and every source are valid for `len` bytes; `done <= len`.
#[cfg(target_arch = "x86_64")]
unsafe fn portable_tail(dst: *mut u8, srcs: &[*const u8], len: usize, init: bool, done: usize) {
    // SAFETY: `done` is inside every buffer.
    let rest: smallvec::SmallVec<[*const u8; 16]> =
        srcs.iter().map(|s| unsafe { s.add(done) }).collect();
    // SAFETY: the tail is inside every buffer.
    unsafe { xor_portable(dst.add(done), &rest, len - done, init) }
}

/// # Safety
/// `dst` and every source are valid for `len` bytes.
unsafe fn xor_portable(dst: *mut u8, srcs: &[*const u8], len: usize, init: bool) {
    let words = len / 8;
    for w in 0..words {
        // SAFETY: w * 8 + 8 <= len; unaligned reads allowed.
        unsafe {
            let mut acc = if init {
                0
            } else {
                (dst.add(w * 8) as *const u64).read_unaligned()
            };
            for s in srcs {
                acc ^= (s.add(w * 8) as *const u64).read_unaligned();
            }
            (dst.add(w * 8) as *mut u64).write_unaligned(acc);
        }
    }
    for i in words * 8..len {
        // SAFETY: i < len.
        unsafe {
            let mut acc = if init { 0 } else { *dst.add(i) };
            for s in srcs {
                acc ^= *s.add(i);
            }
            *dst.add(i) = acc;
        }
    }
}

/// A SIMD kernel: `$entry` (the [`Kernel`]) and `$blocks`, its loop over
/// whole blocks of four vectors, generic over the sources so that a fixed
/// count unrolls. `$xor3(a, b, c)` is `a ^ b ^ c` (one `vpternlogq` where
/// AVX-512 has it, which halves the XOR instructions); streaming stores
/// need the destination aligned to the vector ([`streams`] asks for 64).
#[cfg(target_arch = "x86_64")]
macro_rules! simd_kernel {
    ($entry:ident, $blocks:ident, $features:literal, $vec:ty, $width:literal,
     $zero:expr, $load:path, $store:path, $stream:path, $xor2:expr, $xor3:expr) => {
        #[target_feature(enable = $features)]
        /// # Safety
        /// The CPU has these features; `dst` and every source are valid
        /// for `len` bytes.
        unsafe fn $entry(dst: *mut u8, srcs: &[*const u8], len: usize, init: bool) {
            // SAFETY: as the caller promised; streaming stores are fenced
            // before returning.
            let done = unsafe {
                if streams(dst, len) {
                    let done = with_fixed_sources!($blocks, true, dst, srcs, len, init);
                    std::arch::x86_64::_mm_sfence();
                    done
                } else {
                    with_fixed_sources!($blocks, false, dst, srcs, len, init)
                }
            };
            if done < len {
                // SAFETY: `done` is within every buffer.
                unsafe { portable_tail(dst, srcs, len, init, done) }
            }
        }

        #[target_feature(enable = $features)]
        /// The whole blocks of four vectors; returns the bytes done.
        ///
        /// # Safety
        /// As the kernel.
        unsafe fn $blocks<const NT: bool, S: AsRef<[*const u8]>>(
            dst: *mut u8,
            srcs: S,
            len: usize,
            init: bool,
        ) -> usize {
            #[allow(unused_imports)]
            use std::arch::x86_64::*;
            const BLOCK: usize = 4 * $width;
            let srcs = srcs.as_ref();
            let blocks = len / BLOCK;
            for v in 0..blocks {
                let off = v * BLOCK;
                // SAFETY: off + BLOCK <= len; unaligned loads and stores
                // (aligned streaming ones only where `streams` allowed).
                unsafe {
                    let p =
                        |b: *const u8, i: usize| -> $vec { $load(b.add(off + $width * i).cast()) };
                    let mut acc: [$vec; 4] = if init {
                        [$zero; 4]
                    } else {
                        [p(dst, 0), p(dst, 1), p(dst, 2), p(dst, 3)]
                    };
                    let mut k = 0;
                    while k + 1 < srcs.len() {
                        let (x, y) = (srcs[k], srcs[k + 1]);
                        for (i, a) in acc.iter_mut().enumerate() {
                            *a = $xor3(*a, p(x, i), p(y, i));
                        }
                        k += 2;
                    }
                    if k < srcs.len() {
                        for (i, a) in acc.iter_mut().enumerate() {
                            *a = $xor2(*a, p(srcs[k], i));
                        }
                    }
                    let d = dst.add(off);
                    for (i, a) in acc.iter().enumerate() {
                        if NT {
                            $stream(d.add($width * i).cast(), *a);
                        } else {
                            $store(d.add($width * i).cast(), *a);
                        }
                    }
                }
            }
            blocks * BLOCK
        }
    };
}

#[cfg(target_arch = "x86_64")]
simd_kernel!(
    xor_avx2,
    avx2_blocks,
    "avx2",
    std::arch::x86_64::__m256i,
    32,
    _mm256_setzero_si256(),
    _mm256_loadu_si256,
    _mm256_storeu_si256,
    _mm256_stream_si256,
    |a, b| _mm256_xor_si256(a, b),
    |a, b, c| _mm256_xor_si256(_mm256_xor_si256(a, b), c)
);

#[cfg(target_arch = "x86_64")]
simd_kernel!(
    xor_avx512,
    avx512_blocks,
    "avx512f",
    std::arch::x86_64::__m512i,
    64,
    _mm512_setzero_si512(),
    _mm512_loadu_si512,
    _mm512_storeu_si512,
    _mm512_stream_si512,
    |a, b| _mm512_xor_si512(a, b),
    |a, b, c| _mm512_ternarylogic_epi64::<0x96>(a, b, c)
);

// 256-bit vectors with AVX-512's three-way XOR: what gcc -O3 -march=native
// makes of the plain loop on AVX-512 machines; it keeps the clock of
// 256-bit code, which at L2-resident sizes beat 512-bit vectors here.
#[cfg(target_arch = "x86_64")]
simd_kernel!(
    xor_avx512vl,
    avx512vl_blocks,
    "avx512f,avx512vl",
    std::arch::x86_64::__m256i,
    32,
    _mm256_setzero_si256(),
    _mm256_loadu_si256,
    _mm256_storeu_si256,
    _mm256_stream_si256,
    |a, b| _mm256_xor_si256(a, b),
    |a, b, c| _mm256_ternarylogic_epi64::<0x96>(a, b, c)
);

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel this CPU runs.
    fn kernels() -> Vec<Kernel> {
        candidates().iter().map(|c| c.0).collect()
    }

    fn reference(srcs: &[Vec<u8>]) -> Vec<u8> {
        let mut out = vec![0u8; srcs[0].len()];
        for s in srcs {
            for (o, b) in out.iter_mut().zip(s) {
                *o ^= b;
            }
        }
        out
    }

    #[test]
    fn every_kernel_matches_the_reference_at_odd_lengths_and_offsets() {
        let mut rng = 1u64;
        let mut byte = move || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) as u8
        };
        for len in [0usize, 1, 7, 64, 127, 128, 255, 256, 1000, 4096, 65536 + 13] {
            for n in 1..=9 {
                let srcs: Vec<Vec<u8>> = (0..n)
                    .map(|_| (0..len + 3).map(|_| byte()).collect())
                    .collect();
                let views: Vec<&[u8]> = srcs.iter().map(|s| &s[3..]).collect();
                let want = reference(&srcs.iter().map(|s| s[3..].to_vec()).collect::<Vec<_>>());
                for k in kernels() {
                    let mut dst = vec![0xaau8; len + 1];
                    let ptrs: Vec<*const u8> = views.iter().map(|v| v.as_ptr()).collect();
                    unsafe { k(dst[1..].as_mut_ptr(), &ptrs, len, true) };
                    assert_eq!(&dst[1..], &want[..], "gen len {len} n {n}");
                    // Folding the same sources in again gives zero.
                    unsafe { k(dst[1..].as_mut_ptr(), &ptrs, len, false) };
                    assert!(dst[1..].iter().all(|&b| b == 0), "into len {len} n {n}");
                }
            }
        }
        assert!(!kernel_name(4096).is_empty());
    }

    #[test]
    fn public_helpers_reconstruct_a_lost_chunk() {
        let a = vec![1u8; 4096];
        let b = vec![2u8; 4096];
        let c = vec![7u8; 4096];
        let mut p = vec![0u8; 4096];
        xor_gen(&mut p, &[&a, &b, &c]);
        let mut lost = vec![0u8; 4096];
        xor_gen(&mut lost, &[&a, &c, &p]);
        assert_eq!(lost, b);
    }

    #[test]
    fn large_aligned_destinations_stream_and_still_match() {
        // Above STREAM_BYTES with a 64-byte aligned destination the SIMD
        // kernels use non-temporal stores; unaligned, the normal ones.
        let len = STREAM_BYTES + 4096 + 200;
        let srcs: Vec<Vec<u8>> = (0..5u8)
            .map(|k| {
                (0..len)
                    .map(|i| (i as u8).wrapping_mul(31) ^ k.wrapping_mul(77))
                    .collect()
            })
            .collect();
        let want = reference(&srcs);
        let ptrs: Vec<*const u8> = srcs.iter().map(|v| v.as_ptr()).collect();
        let mut raw = vec![0u8; len + 128];
        let aligned = raw.as_ptr().align_offset(64);
        for k in kernels() {
            for at in [aligned, aligned + 8] {
                let dst = &mut raw[at..at + len];
                dst.fill(0x5a);
                unsafe { k(dst.as_mut_ptr(), &ptrs, len, true) };
                assert!(dst[..] == want[..], "gen at offset {}", at - aligned);
                unsafe { k(dst.as_mut_ptr(), &ptrs[..2], len, false) };
                let two = reference(&srcs[2..]);
                assert!(dst[..] == two[..], "into at offset {}", at - aligned);
            }
        }
    }

    #[test]
    fn a_wider_kernel_is_chosen_only_when_clearly_faster() {
        // avx512, avx512vl, avx2, portable (GB/s), as measured here.
        assert_eq!(choose(&[354.0, 252.0, 212.0, 28.0]), 0, "4 KiB");
        assert_eq!(choose(&[119.0, 141.0, 140.0, 30.0]), 2, "64 KiB");
        assert_eq!(choose(&[136.0, 137.0, 136.0, 30.0]), 2, "a close call");
        assert_eq!(choose(&[120.0, 150.0, 140.0, 30.0]), 1);
        assert_eq!(choose(&[145.0, 120.0, 118.0, 30.0]), 0);
        assert_eq!(choose(&[30.0, 31.0]), 1, "within the margin");
        assert_eq!(choose(&[50.0]), 0);
        // Past the next one by more than the margin, not past avx512vl.
        assert_eq!(choose(&[134.0, 133.5, 130.0, 30.0]), 1);
    }

    #[test]
    fn calibration_picks_a_kernel_within_the_margin_of_the_fastest_for_each_size() {
        let c = calibrate();
        let names: Vec<&str> = candidates().iter().map(|c| c.1).collect();
        assert_eq!(c.speeds.iter().map(|s| s.name).collect::<Vec<_>>(), names);
        for class in SizeClass::ALL {
            let i = class as usize;
            assert!(
                c.speeds.iter().all(|s| s.bytes_per_sec[i] > 0.0),
                "{:?}",
                c.speeds
            );
            // Within the margin of the fastest.
            let fastest = c
                .speeds
                .iter()
                .map(|s| s.bytes_per_sec[i])
                .fold(0f64, f64::max);
            let chosen = c
                .speeds
                .iter()
                .find(|s| s.name == c.chosen(class))
                .map(|s| s.bytes_per_sec[i]);
            assert!(
                chosen.is_some_and(|v| v * WIDER_MARGIN >= fastest),
                "{class:?}: {:?}",
                c.speeds
            );
            let len = class.calibration_len();
            assert_eq!(kernel_name(len), c.chosen(class));
        }
        assert_eq!(SizeClass::of(SMALL_BYTES), SizeClass::Small);
        assert_eq!(SizeClass::of(SMALL_BYTES + 1), SizeClass::Large);
    }
}
