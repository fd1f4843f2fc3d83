//! Objects shared by key and brought up once (an NVMe controller by its PCI
//! address): one bring-up per key at a time, none holding up another key's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

/// The object of one key, once brought up; its lock is held through a
/// bring-up.
type Slot<T> = Arc<Mutex<Weak<T>>>;

/// Live objects by key, each made by the first caller that needs it.
pub(super) struct Shared<T> {
    slots: Mutex<Option<HashMap<String, Slot<T>>>>,
}

impl<T> Shared<T> {
    pub(super) const fn new() -> Shared<T> {
        Shared {
            slots: Mutex::new(None),
        }
    }

    /// The live object of `key`, or the one `up` brings up. Only callers of
    /// the same key wait for a bring-up: a controller's can take minutes on
    /// a device that answers slowly (enable, then Identify of each
    /// namespace), and made under one lock for every address, it held up
    /// the attach of every other NVMe device (audit).
    pub(super) fn get_or_bring_up<E>(
        &self,
        key: &str,
        up: impl FnOnce() -> Result<Arc<T>, E>,
    ) -> Result<Arc<T>, E> {
        let slot = {
            let mut map = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            map.get_or_insert_with(HashMap::new)
                .entry(key.to_string())
                .or_insert_with(|| Arc::new(Mutex::new(Weak::new())))
                .clone()
        };
        let mut held = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(live) = held.upgrade() {
            return Ok(live);
        }
        let live = up()?;
        *held = Arc::downgrade(&live);
        Ok(live)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn a_slow_bring_up_holds_up_only_its_own_key() {
        static SHARED: Shared<u32> = Shared::new();
        let (release, held) = mpsc::channel::<()>();
        let (started, starting) = mpsc::channel();
        let slow = std::thread::spawn(move || {
            SHARED.get_or_bring_up("a", || {
                started.send(()).unwrap();
                held.recv().unwrap();
                Ok::<_, ()>(Arc::new(1))
            })
        });
        starting.recv().unwrap();
        let (tx, rx) = mpsc::channel();
        let other = std::thread::spawn(move || {
            let b = SHARED.get_or_bring_up("b", || Ok::<_, ()>(Arc::new(2)));
            tx.send(b).unwrap();
        });
        let b = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("another key waited for the slow bring-up");
        assert_eq!(*b.unwrap(), 2);
        other.join().unwrap();
        release.send(()).unwrap();
        let a = slow.join().unwrap().unwrap();
        // The same key: the live one, not a second bring-up.
        let again = SHARED.get_or_bring_up("a", || Err(())).unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        drop((a, again));
        // Gone, it is brought up anew.
        assert_eq!(
            *SHARED
                .get_or_bring_up("a", || Ok::<_, ()>(Arc::new(3)))
                .unwrap(),
            3
        );
    }
}
