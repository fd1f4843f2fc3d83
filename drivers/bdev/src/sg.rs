//! Scatter-gather helpers: slices of a list, copies in and out (for
//! devices and volumes that split requests).

use crate::{IoVec, SgList};

/// The bytes `off..off + len` of `sg` as a new list (no copy).
pub fn slice(sg: &SgList, mut off: usize, mut len: usize) -> SgList {
    let mut out = SgList::new();
    for v in sg {
        if len == 0 {
            break;
        }
        if off >= v.len() {
            off -= v.len();
            continue;
        }
        let n = (v.len() - off).min(len);
        // SAFETY: a sub-range of an element the submitter vouched for.
        out.push(unsafe { IoVec::new(v.ptr().add(off), n) });
        len -= n;
        off = 0;
    }
    out
}

/// Copy `dst.len()` bytes out of `sg` starting at byte `off`.
///
/// # Safety
/// The list's memory must be valid (the request's contract).
pub unsafe fn copy_out(sg: &SgList, off: usize, dst: &mut [u8]) {
    let mut at = 0;
    for v in slice(sg, off, dst.len()).iter() {
        // SAFETY: per the caller; lengths come from the slice.
        unsafe { std::ptr::copy_nonoverlapping(v.ptr(), dst[at..].as_mut_ptr(), v.len()) };
        at += v.len();
    }
}

/// Copy `src` into `sg` starting at byte `off`.
///
/// # Safety
/// The list's memory must be valid and writable (the request's contract).
pub unsafe fn copy_in(sg: &SgList, off: usize, src: &[u8]) {
    let mut at = 0;
    for v in slice(sg, off, src.len()).iter() {
        // SAFETY: per the caller.
        unsafe { std::ptr::copy_nonoverlapping(src[at..].as_ptr(), v.ptr(), v.len()) };
        at += v.len();
    }
}

/// One element over `buf[off..off + len]`.
///
/// The buffer must outlive the request it is used in.
pub fn of(buf: &mut [u8], off: usize, len: usize) -> SgList {
    let mut sg = SgList::new();
    let part = &mut buf[off..off + len];
    // SAFETY: the caller keeps the buffer (a piece's own) until completion.
    sg.push(unsafe { IoVec::new(part.as_mut_ptr(), part.len()) });
    sg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slicing_and_copying_across_elements() {
        let mut a = vec![0u8; 10];
        let mut b = vec![0u8; 6];
        let mut sg = SgList::new();
        sg.push(unsafe { IoVec::new(a.as_mut_ptr(), 10) });
        sg.push(unsafe { IoVec::new(b.as_mut_ptr(), 6) });
        let s = slice(&sg, 8, 5);
        assert_eq!(s.iter().map(|v| v.len()).collect::<Vec<_>>(), vec![2, 3]);
        let src: Vec<u8> = (1..=16).collect();
        unsafe { copy_in(&sg, 0, &src) };
        assert_eq!(a, (1..=10).collect::<Vec<u8>>());
        assert_eq!(b, (11..=16).collect::<Vec<u8>>());
        let mut got = vec![0u8; 5];
        unsafe { copy_out(&sg, 8, &mut got) };
        assert_eq!(got, vec![9, 10, 11, 12, 13]);
        assert!(slice(&sg, 16, 4).is_empty());
    }
}
