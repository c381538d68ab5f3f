//! The pgrx-free core of wal_listener, in the order data flows through it:
//! [`replication`] (loopback connection to the slot) → [`pgoutput`] (decoding)
//! → [`event`] (JSON events, ids, subjects) → [`publish`] (JetStream) →
//! [`pipeline`] (joins them, confirms only acked LSNs). [`slot_watch`] watches
//! the slot's WAL retention beside it; [`status`] is what the host shows.

pub mod config;
pub mod error;
pub mod event;
pub mod filters;
mod lsn;
pub mod pgoutput;
pub mod pipeline;
pub mod publish;
pub mod replication;
pub mod slot_watch;
pub mod status;

pub use error::Error;
pub use lsn::Lsn;
