//! The query side: a request names its question, who asks and why; the desk
//! authorises it, audits it and answers it from a backend.
pub mod audit;
mod questions;

pub use questions::*;
