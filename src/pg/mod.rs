//! Everything below pgrx's safe layer, in one place: SPI with kept plans and pinned settings
//! ([`spi`]), the raw V1 entry points' arguments and datums ([`fmgr`]) and other processes'
//! latches ([`procs`]). Every unsafe operation here carries a `SAFETY:` note.

pub mod fmgr;
pub mod procs;
pub mod spi;

pub use fmgr::*;
pub use procs::*;
pub use spi::*;
