//! Per-volume IO limits (SPDK's bdev_set_qos_limit, cgroup io.max): IOPS
//! and bytes per second for reads, writes and both together.
//!
//! Each export queue keeps a token bucket per limit of its own and is the
//! only one to touch it: the IO path takes no lock and, while its bucket
//! holds tokens, touches nothing shared. An empty bucket is refilled with
//! a batch (about a millisecond of the limit) from the volume's shared
//! allowance, a GCRA ("virtual scheduling": a theoretical arrival time
//! that every batch moves on by its share of a second) kept in one atomic
//! per limit. So the volume's queues share its limit whatever way the
//! load spreads over them, and the shared atomic is touched about once a
//! millisecond per busy queue, not once per IO.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bdev::IoOp;
use serde::{Deserialize, Serialize};

/// A volume's limits, per second; 0 is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QosLimits {
    /// Read requests.
    pub read_iops: u64,
    /// Write requests (writes, write-zeroes, discards and flushes).
    pub write_iops: u64,
    /// All requests.
    pub total_iops: u64,
    /// Bytes read (named as in the API, in the state file too).
    #[serde(rename = "read_bytes_per_sec")]
    pub read_bytes: u64,
    /// Bytes written.
    #[serde(rename = "write_bytes_per_sec")]
    pub write_bytes: u64,
    /// Bytes read and written.
    #[serde(rename = "total_bytes_per_sec")]
    pub total_bytes: u64,
}

/// The smallest limit taken: below it a request could wait seconds for a
/// single token.
pub const MIN_IOPS: u64 = 10;
/// The smallest bandwidth limit (1 MiB/s; SPDK's granularity is 1 MB/s).
pub const MIN_BYTES: u64 = 1 << 20;

impl QosLimits {
    /// Whether no limit is set.
    pub fn is_none(&self) -> bool {
        *self == QosLimits::default()
    }

    fn all(&self) -> [u64; 6] {
        [
            self.read_iops,
            self.write_iops,
            self.total_iops,
            self.read_bytes,
            self.write_bytes,
            self.total_bytes,
        ]
    }

    /// Refuse limits too small to keep: the field and why.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        const NAMES: [&str; 6] = [
            "read_iops",
            "write_iops",
            "total_iops",
            "read_bytes_per_sec",
            "write_bytes_per_sec",
            "total_bytes_per_sec",
        ];
        for (i, v) in self.all().into_iter().enumerate() {
            let min = if i < 3 { MIN_IOPS } else { MIN_BYTES };
            if v != 0 && v < min {
                return Err((NAMES[i], format!("{v} is below the smallest limit {min}")));
            }
            // The state file (TOML) holds signed 64-bit integers: a larger
            // limit would make every later save fail.
            if v > i64::MAX as u64 {
                return Err((
                    NAMES[i],
                    format!("{v} is above the largest limit {}", i64::MAX),
                ));
            }
        }
        Ok(())
    }

    /// What the limits say, for logs and tables ("none" when unlimited).
    pub fn describe(&self) -> String {
        let parts: Vec<String> = [
            ("read IOPS", self.read_iops, false),
            ("write IOPS", self.write_iops, false),
            ("IOPS", self.total_iops, false),
            ("read", self.read_bytes, true),
            ("write", self.write_bytes, true),
            ("total", self.total_bytes, true),
        ]
        .iter()
        .filter(|p| p.1 > 0)
        .map(|&(what, v, bytes)| {
            if bytes {
                format!("{what} {:.1} MiB/s", v as f64 / (1u64 << 20) as f64)
            } else {
                format!("{what} {v}")
            }
        })
        .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}

/// How far ahead of now a limit's schedule may run: bursts up to this
/// much of a second pass at once, and an idle volume banks no more than
/// this. It also makes up for a reactor that was not scheduled for a
/// while (a loaded host): with 2 ms a volume got 68 % of its limit at a
/// load of 5; 50 ms costs at most half a percent over 10 s.
const TOLERANCE_NS: u64 = 50_000_000;
/// The batch a queue takes from the shared allowance: this much of a
/// second's worth.
const BATCH_NS: u64 = 1_000_000;

/// One limit's shared allowance.
struct Shared {
    /// Per second.
    rate: u64,
    /// Tokens a queue takes at once.
    batch: u64,
    /// Theoretical arrival time of the next batch, in ns since `base`.
    tat: AtomicU64,
}

impl Shared {
    fn new(rate: u64) -> Shared {
        Shared {
            rate,
            batch: ((rate as u128 * BATCH_NS as u128 / 1_000_000_000) as u64).max(1),
            tat: AtomicU64::new(0),
        }
    }

    /// When (ns since `base`) a take will succeed: once the schedule is
    /// no more than the tolerance ahead.
    fn due(&self) -> u64 {
        self.tat
            .load(Ordering::Relaxed)
            .saturating_sub(TOLERANCE_NS)
    }

    /// Take `n` tokens at `now` (ns since `base`), or none if the schedule
    /// is more than the tolerance ahead of now.
    fn take(&self, n: u64, now: u64) -> bool {
        let cost = ((n as u128 * 1_000_000_000) / self.rate as u128).min(u64::MAX as u128) as u64;
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            if tat > now + TOLERANCE_NS {
                return false;
            }
            let next = tat.max(now).saturating_add(cost);
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(t) => tat = t,
            }
        }
    }
}

/// A volume's limits in force: what its queues share. A new one replaces
/// it at each change of the limits (the volume's queues pick it up with
/// the next generation).
pub struct Qos {
    limits: QosLimits,
    base: Instant,
    /// By limit, in the order of [`QosLimits::all`]; `None` where unlimited.
    shared: [Option<Shared>; 6],
}

impl std::fmt::Debug for Qos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qos").field("limits", &self.limits).finish()
    }
}

impl Qos {
    /// The shared allowance for `limits`; `None` when nothing is limited.
    pub fn new(limits: QosLimits) -> Option<Qos> {
        if limits.is_none() {
            return None;
        }
        Some(Qos {
            limits,
            base: Instant::now(),
            shared: limits.all().map(|v| (v > 0).then(|| Shared::new(v))),
        })
    }

    /// The limits.
    pub fn limits(&self) -> QosLimits {
        self.limits
    }
}

/// Which limits a request counts against and how much: (limit, amount).
fn costs(op: IoOp, bytes: u64) -> [(usize, u64); 4] {
    match op {
        IoOp::Read => [(0, 1), (2, 1), (3, bytes), (5, bytes)],
        IoOp::Write => [(1, 1), (2, 1), (4, bytes), (5, bytes)],
        // No data moves: requests only.
        IoOp::Flush | IoOp::Discard | IoOp::WriteZeroes => [(1, 1), (2, 1), (4, 0), (5, 0)],
    }
}

/// How much later than a limit's next tokens a held-back queue looks
/// again: it then takes several milliseconds' worth at once, and its
/// reactor sleeps in between instead of spinning (a queue held at 50,000
/// IOPS kept its reactor busy at 20 us of CPU per IO).
const RECHECK_SLACK: std::time::Duration = std::time::Duration::from_millis(4);

/// One queue's buckets, used only by the reactor that runs the queue.
pub struct QueueQos {
    qos: std::sync::Arc<Qos>,
    tokens: [u64; 6],
    /// Which limits are set (a copy, to stay off the shared cache line).
    limited: [bool; 6],
}

impl QueueQos {
    /// Empty buckets on `qos`.
    pub fn new(qos: std::sync::Arc<Qos>) -> QueueQos {
        let limited = std::array::from_fn(|i| qos.shared[i].is_some());
        QueueQos {
            qos,
            tokens: [0; 6],
            limited,
        }
    }

    /// Fill the buckets a request of `op` and `bytes` needs from the
    /// shared allowance; false if a limit has none to give yet (tokens
    /// taken for the other limits stay in their buckets).
    pub fn ensure(&mut self, op: IoOp, bytes: u64, now: Instant) -> bool {
        let now = now.saturating_duration_since(self.qos.base).as_nanos() as u64;
        let mut ok = true;
        for (i, n) in costs(op, bytes) {
            if !self.limited[i] || n == 0 || self.tokens[i] >= n {
                continue;
            }
            let Some(s) = &self.qos.shared[i] else {
                continue;
            };
            let want = (n - self.tokens[i]).max(s.batch);
            if s.take(want, now) {
                self.tokens[i] += want;
            } else {
                ok = false;
            }
        }
        ok
    }

    /// Whether these are buckets of `qos`.
    pub fn shares(&self, qos: &std::sync::Arc<Qos>) -> bool {
        std::sync::Arc::ptr_eq(&self.qos, qos)
    }

    /// Give back what [`admit`](Self::admit) charged for a request that
    /// was not sent after all.
    pub fn refund(&mut self, op: IoOp, bytes: u64) {
        for (i, n) in costs(op, bytes) {
            if self.limited[i] {
                self.tokens[i] += n;
            }
        }
    }

    /// Charge a request if every limit it counts against lets it pass now.
    /// While the buckets hold enough, nothing shared is touched.
    pub fn admit(&mut self, op: IoOp, bytes: u64, now: Instant) -> bool {
        let c = costs(op, bytes);
        let short = c
            .iter()
            .any(|&(i, n)| self.limited[i] && self.tokens[i] < n);
        if short && !self.ensure(op, bytes, now) {
            return false;
        }
        for (i, n) in c {
            if self.limited[i] {
                self.tokens[i] -= n;
            }
        }
        true
    }

    /// When to look again at a request of `op` and `bytes` that was held
    /// back: when every limit it lacks tokens of will give some, plus a
    /// few milliseconds.
    pub fn recheck_at(&self, op: IoOp, bytes: u64) -> Instant {
        let due = costs(op, bytes)
            .iter()
            .filter(|&&(i, n)| self.limited[i] && self.tokens[i] < n)
            .filter_map(|&(i, _)| self.qos.shared[i].as_ref().map(Shared::due))
            .max()
            .unwrap_or(0);
        self.qos.base + std::time::Duration::from_nanos(due) + RECHECK_SLACK
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    /// Requests of `bytes` offered as fast as a clock of `step` allows
    /// over `secs` seconds, through `queues` queues taking turns; how many
    /// passed.
    fn run(limits: QosLimits, op: IoOp, bytes: u64, queues: usize, secs: u64) -> u64 {
        let qos = Arc::new(Qos::new(limits).unwrap());
        let mut qs: Vec<QueueQos> = (0..queues).map(|_| QueueQos::new(qos.clone())).collect();
        let step = Duration::from_micros(10);
        let start = qos.base;
        let mut passed = 0;
        let mut t = Duration::ZERO;
        let mut k = 0;
        while t < Duration::from_secs(secs) {
            if qs[k % queues].admit(op, bytes, start + t) {
                passed += 1;
            }
            k += 1;
            t += step;
        }
        passed
    }

    #[test]
    fn limits_hold_within_a_percent_over_ten_seconds() {
        for (limits, op, bytes, want) in [
            (
                QosLimits {
                    total_iops: 5000,
                    ..Default::default()
                },
                IoOp::Read,
                4096,
                50_000,
            ),
            (
                QosLimits {
                    write_bytes: 8 << 20,
                    ..Default::default()
                },
                IoOp::Write,
                65536,
                (80 << 20) / 65536,
            ),
            (
                QosLimits {
                    read_iops: 300,
                    total_bytes: 100 << 20,
                    ..Default::default()
                },
                IoOp::Read,
                4096,
                3000,
            ),
        ] {
            for queues in [1, 4] {
                let got = run(limits, op, bytes, queues, 10);
                let err = (got as f64 - want as f64).abs() / want as f64;
                assert!(err < 0.01, "{limits:?} on {queues} queues: {got} of {want}");
            }
        }
    }

    #[test]
    fn a_limit_on_one_kind_leaves_the_other_alone() {
        let qos = Arc::new(
            Qos::new(QosLimits {
                read_iops: 10,
                ..Default::default()
            })
            .unwrap(),
        );
        let mut q = QueueQos::new(qos.clone());
        let now = qos.base + Duration::from_secs(1);
        while q.admit(IoOp::Read, 4096, now) {}
        for _ in 0..1000 {
            assert!(q.admit(IoOp::Write, 4096, now), "writes are not limited");
        }
        assert!(!q.admit(IoOp::Read, 4096, now));
        assert!(q.admit(IoOp::Read, 4096, now + Duration::from_millis(200)));
    }

    #[test]
    fn a_request_larger_than_a_second_of_the_limit_passes_and_is_paid_for() {
        let qos = Arc::new(
            Qos::new(QosLimits {
                write_bytes: MIN_BYTES,
                ..Default::default()
            })
            .unwrap(),
        );
        let mut q = QueueQos::new(qos.clone());
        let t0 = qos.base;
        assert!(q.admit(IoOp::Write, 4 << 20, t0), "never starved");
        // Four seconds' worth: the next write waits about that long.
        assert!(!q.admit(IoOp::Write, 4096, t0 + Duration::from_secs(3)));
        assert!(q.admit(IoOp::Write, 4096, t0 + Duration::from_millis(4010)));
    }

    #[test]
    fn limits_below_the_minimum_or_beyond_the_state_file_are_refused() {
        let l = QosLimits {
            total_iops: 5,
            ..Default::default()
        };
        assert_eq!(l.check().unwrap_err().0, "total_iops");
        let l = QosLimits {
            write_bytes: 4096,
            ..Default::default()
        };
        assert_eq!(l.check().unwrap_err().0, "write_bytes_per_sec");
        // Nor above what the state file (TOML, signed 64-bit) holds.
        let l = QosLimits {
            read_iops: 1 << 63,
            ..Default::default()
        };
        assert_eq!(l.check().unwrap_err().0, "read_iops");
        assert!(QosLimits {
            read_iops: i64::MAX as u64,
            ..Default::default()
        }
        .check()
        .is_ok());
        assert!(QosLimits::default().check().is_ok());
        assert!(Qos::new(QosLimits::default()).is_none());
        assert_eq!(QosLimits::default().describe(), "none");
    }
}
