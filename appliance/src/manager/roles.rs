//! Which device does what: the one register of attached devices and the
//! role each has in a volume (md's rule that a device belongs to one array
//! in one role). A role is given by a claim, checked and set in one step
//! under the register's lock; a RAID volume's claims are made inside its
//! change's transaction (see `VolumeHooks`), so no two changes can give
//! one device two roles.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bdev::BlockDevice;

use crate::raid::members::device_id;
use crate::raid::monitor::{OpError, Role};

/// An attached device's entry.
struct Entry {
    /// Identity of the device object attached under this name (a resize
    /// or a detach and attach make a new one).
    id: usize,
    /// The volume that holds it, and how.
    holder: Option<(String, Role)>,
    /// It holds only zeros: attached fresh (RAM, null, a file the attach
    /// made) and given no role since. Any role may write it, and a
    /// volume let go leaves its data behind.
    zeroed: bool,
}

/// The register.
#[derive(Default)]
pub struct RoleBook {
    map: Mutex<BTreeMap<String, Entry>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RoleBook {
    /// `dev` is attached (free); `zeroed`: it holds only zeros.
    pub fn attach(&self, dev: &Arc<dyn BlockDevice>, zeroed: bool) {
        lock(&self.map).insert(
            dev.info().name.clone(),
            Entry {
                id: device_id(dev),
                holder: None,
                zeroed,
            },
        );
    }

    /// `new` replaces `old` under its name (a resize), keeping its role,
    /// if `old` is still the object attached there and `holder` (a volume,
    /// or none: free) still holds it; false, changing nothing, otherwise:
    /// another resize or a claim came first.
    pub fn replace(
        &self,
        old: &Arc<dyn BlockDevice>,
        new: &Arc<dyn BlockDevice>,
        holder: Option<&str>,
    ) -> bool {
        let mut m = lock(&self.map);
        let Some(e) = m.get_mut(&old.info().name) else {
            return false;
        };
        if e.id != device_id(old) || e.holder.as_ref().map(|(v, _)| v.as_str()) != holder {
            return false;
        }
        e.id = device_id(new);
        true
    }

    /// Detach `name` if no volume holds it; the holder otherwise.
    pub fn detach(&self, name: &str) -> Result<(), (String, Role)> {
        let mut m = lock(&self.map);
        if let Some((v, r)) = m.get(name).and_then(|e| e.holder.clone()) {
            return Err((v, r));
        }
        m.remove(name);
        Ok(())
    }

    /// Who holds `name`.
    pub fn holder(&self, name: &str) -> Option<(String, Role)> {
        lock(&self.map).get(name).and_then(|e| e.holder.clone())
    }

    /// Give `dev` `role` in `volume`: it must be attached (this very
    /// device), and free or already `volume`'s in role `from`.
    pub fn claim(
        &self,
        dev: &Arc<dyn BlockDevice>,
        volume: &str,
        role: Role,
        from: Option<Role>,
    ) -> Result<(), OpError> {
        let mut m = lock(&self.map);
        let e = claimable(&mut m, dev, volume, from)?;
        e.holder = Some((volume.to_string(), role));
        e.zeroed = false;
        Ok(())
    }

    /// Claim every one of `devs` for `volume` in its role, or none, in one
    /// step. (One `volume` holds in that role already is its: a volume that
    /// did not start keeps its devices while it is tried again.) Whether
    /// every member among them holds only zeros: a new volume on them is
    /// consistent without a resync. They keep saying so until
    /// [`written`](Self::written): a volume refused before it was built
    /// wrote nothing of their data.
    pub fn claim_all(
        &self,
        devs: &[(Arc<dyn BlockDevice>, Role)],
        volume: &str,
    ) -> Result<bool, OpError> {
        let mut m = lock(&self.map);
        for (i, (d, r)) in devs.iter().enumerate() {
            let name = &d.info().name;
            if devs[..i].iter().any(|(o, _)| o.info().name == *name) {
                return Err(OpError::AlreadyExists(format!(
                    "device {name} is named twice"
                )));
            }
            claimable(&mut m, d, volume, Some(*r))?;
        }
        let mut zeroed = true;
        for (d, r) in devs {
            if let Some(e) = m.get_mut(&d.info().name) {
                zeroed &= e.zeroed || *r != Role::Member;
                e.holder = Some((volume.to_string(), *r));
            }
        }
        Ok(zeroed)
    }

    /// `names` were given to a volume that now runs: what they held is no
    /// longer known to be zeros.
    pub fn written<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let mut m = lock(&self.map);
        for n in names {
            if let Some(e) = m.get_mut(n) {
                e.zeroed = false;
            }
        }
    }

    /// Set `name`'s role in `volume` (`None`: free it), if `volume` holds
    /// it or it is free.
    pub fn set(&self, name: &str, volume: &str, role: Option<Role>) {
        if let Some(e) = lock(&self.map).get_mut(name) {
            if e.holder.as_ref().is_none_or(|(v, _)| v == volume) {
                e.holder = role.map(|r| (volume.to_string(), r));
                e.zeroed &= role.is_none();
            }
        }
    }

    /// Make the register say what `volume` holds now: `held` (device,
    /// role) and nothing else (changes made before the volume was in the
    /// inventory, or devices left out at its assembly).
    pub fn reconcile(&self, volume: &str, held: &[(String, Role)]) {
        let mut m = lock(&self.map);
        for (name, e) in m.iter_mut() {
            let want = held.iter().find(|(n, _)| n == name).map(|(_, r)| *r);
            let ours = e.holder.as_ref().is_some_and(|(v, _)| v == volume);
            match want {
                Some(r) if e.holder.is_none() || ours => {
                    e.holder = Some((volume.to_string(), r));
                    e.zeroed = false;
                }
                None if ours => e.holder = None,
                _ => {}
            }
        }
    }

    /// Free every device `volume` holds.
    pub fn release_volume(&self, volume: &str) {
        for e in lock(&self.map).values_mut() {
            if e.holder.as_ref().is_some_and(|(v, _)| v == volume) {
                e.holder = None;
            }
        }
    }
}

/// `dev`'s entry, if `volume` may give it a role: attached (this very
/// device), and free or already `volume`'s in role `from`.
fn claimable<'a>(
    m: &'a mut BTreeMap<String, Entry>,
    dev: &Arc<dyn BlockDevice>,
    volume: &str,
    from: Option<Role>,
) -> Result<&'a mut Entry, OpError> {
    let name = &dev.info().name;
    let Some(e) = m.get_mut(name).filter(|e| e.id == device_id(dev)) else {
        return Err(OpError::FailedPrecondition(format!(
            "device {name} is not attached (any more)"
        )));
    };
    match &e.holder {
        None => Ok(e),
        Some((v, r)) if v == volume && Some(*r) == from => Ok(e),
        Some((v, r)) if v == volume => Err(OpError::AlreadyExists(format!(
            "device {name} is already {} {v}",
            r.name()
        ))),
        Some((v, r)) => Err(OpError::FailedPrecondition(format!(
            "device {name} is in use ({} {v})",
            r.name()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram(name: &str) -> Arc<dyn BlockDevice> {
        Arc::new(bdev::RamDevice::new(name, 4096, 16).unwrap())
    }

    /// From review: two resizes of one device both copied the old object
    /// and the second switch lost what was written in between; a resize
    /// of a free device raced a claim of the old object.
    #[test]
    fn a_resize_switches_only_the_object_it_copied_with_its_holder() {
        let book = RoleBook::default();
        let d = ram("d");
        book.attach(&d, false);
        let (g1, g2) = (ram("d"), ram("d"));
        assert!(book.replace(&d, &g1, None));
        assert!(
            !book.replace(&d, &g2, None),
            "a second resize of the old object"
        );
        assert!(
            book.claim(&d, "v", Role::Member, None).is_err(),
            "the old object"
        );
        book.claim(&g1, "v", Role::Member, None).unwrap();
        assert!(!book.replace(&g1, &g2, None), "claimed meanwhile");
        assert!(book.replace(&g1, &g2, Some("v")));
        assert_eq!(book.holder("d"), Some(("v".into(), Role::Member)));
    }

    #[test]
    fn a_device_has_one_role_and_only_while_attached() {
        let book = RoleBook::default();
        let (d0, d1) = (ram("d0"), ram("d1"));
        book.attach(&d0, false);
        book.attach(&d1, false);
        book.claim(&d0, "v", Role::Member, None).unwrap();
        assert!(matches!(
            book.claim(&d0, "v", Role::Spare, None),
            Err(OpError::AlreadyExists(_))
        ));
        assert!(matches!(
            book.claim(&d0, "w", Role::Spare, None),
            Err(OpError::FailedPrecondition(_))
        ));
        book.set("d0", "v", Some(Role::Failed));
        book.claim(&d0, "v", Role::Spare, Some(Role::Failed))
            .unwrap();
        assert_eq!(book.holder("d0"), Some(("v".into(), Role::Spare)));
        assert!(book.detach("d0").is_err());
        // All or none.
        let d2 = ram("d2");
        assert!(book
            .claim_all(
                &[(d1.clone(), Role::Member), (d2.clone(), Role::Member)],
                "x"
            )
            .is_err());
        assert_eq!(book.holder("d1"), None, "the first claim was undone");
        // Another object under the same name is not the attached device.
        let other = ram("d1");
        assert!(book.claim(&other, "x", Role::Member, None).is_err());
        // The register takes over what a volume holds: its own roles set,
        // the rest of its devices freed, other volumes' left alone.
        book.claim(&d1, "x", Role::Spare, None).unwrap();
        book.reconcile(
            "v",
            &[("d0".into(), Role::Failed), ("d1".into(), Role::Member)],
        );
        assert_eq!(book.holder("d0"), Some(("v".into(), Role::Failed)));
        assert_eq!(book.holder("d1"), Some(("x".into(), Role::Spare)));
        book.reconcile("v", &[]);
        assert_eq!(book.holder("d0"), None);
        book.claim(&d0, "v", Role::Member, None).unwrap();
        book.release_volume("v");
        book.detach("d0").unwrap();
        assert!(book.claim(&d0, "v", Role::Member, None).is_err());
    }
}
