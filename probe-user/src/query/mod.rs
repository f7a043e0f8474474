//! The query side. A door (`crate::serve`) turns what it was given into a
//! [`Request`]; the [`Desk`] authorises it against the configuration that
//! governs the store, audits it, and answers it from a [`Backend`].
//!
//! - `request`: what is asked, by whom, in which format
//! - `desk`: the one path from a request to an answer (a sweep's too)
//! - `authorise`: who may ask what
//! - `questions`: the three questions' values, selectors and ranking
//! - `backend`: where the desk finds records (the gateway's store), and
//!   `cluster`: the provider's ClickHouse, across every gateway
//! - `audit`: the hash-chained, authenticated log of every request
pub mod audit;
pub mod authorise;
pub mod backend;
pub mod cluster;
pub mod desk;
pub mod questions;
pub mod request;

pub use authorise::Refusal;
pub use backend::{Backend, Swept};
pub use desk::{Answer, Desk, Failure};
pub use questions::{DeviceSelector, Question, ServiceSelector};
pub use request::{Ask, LocalFilter, Operator, Request, Sweep, Sweeper, Who};
