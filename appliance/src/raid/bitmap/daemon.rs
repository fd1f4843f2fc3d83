//! The thread that does a volume's bitmap IO: setting bits at once when
//! a writer asks, clearing quiet regions every `clear_every`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Bitmap;
use crate::raid::RaidError;

/// The thread that writes a volume's bitmap; stopped when dropped.
pub struct BitmapDaemon {
    bitmap: Arc<Bitmap>,
    quit: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl BitmapDaemon {
    /// Start writing `bitmap` for volume `name`.
    pub fn start(name: &str, bitmap: Arc<Bitmap>) -> Result<BitmapDaemon, RaidError> {
        let quit = Arc::new(AtomicBool::new(false));
        let (b, q) = (bitmap.clone(), quit.clone());
        let thread = std::thread::Builder::new()
            .name(format!("bitmap-{name}"))
            .spawn(move || run(&b, &q))
            .map_err(|e| {
                RaidError::Invalid(format!("starting the bitmap thread of {name}: {e}"))
            })?;
        Ok(BitmapDaemon {
            bitmap,
            quit,
            thread: Some(thread),
        })
    }

    /// A daemon that never ran (its bitmap marks every region dirty).
    pub fn stopped(bitmap: Arc<Bitmap>) -> BitmapDaemon {
        BitmapDaemon {
            bitmap,
            quit: Arc::new(AtomicBool::new(true)),
            thread: None,
        }
    }

    /// The bitmap it writes.
    pub fn bitmap(&self) -> &Arc<Bitmap> {
        &self.bitmap
    }
}

fn run(b: &Bitmap, quit: &AtomicBool) {
    let mut last_clear = Instant::now();
    while !quit.load(Ordering::SeqCst) {
        let every = Duration::from_millis(b.clear_every_ms.load(Ordering::SeqCst));
        {
            let mut woken = b.wake.lock().unwrap_or_else(|e| e.into_inner());
            while !*woken && !quit.load(Ordering::SeqCst) {
                let left = every.saturating_sub(last_clear.elapsed());
                if left.is_zero() {
                    break;
                }
                woken = match b.cond.wait_timeout(woken, left) {
                    Ok((g, _)) => g,
                    Err(e) => e.into_inner().0,
                };
            }
            *woken = false;
        }
        b.set_wanted();
        if last_clear.elapsed() >= every {
            last_clear = Instant::now();
            b.clear_quiet();
        }
    }
    // Writers still waiting are let through rather than left hanging.
    b.set_wanted();
}

impl Drop for BitmapDaemon {
    fn drop(&mut self) {
        self.quit.store(true, Ordering::SeqCst);
        self.bitmap.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
