//! Scatter-gather helpers for splitting requests over members (they live
//! in `bdev`, which devices that split requests use too).

pub use bdev::sg::*;
