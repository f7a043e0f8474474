//! Helpers of the live part of `benches/probe.rs`.
pub mod netns;
pub mod softflowd;
pub mod traffic;
