//! The pgrx-free core of wal_listener, in the order data flows through it:
//! [`replication`] (loopback connection to the slot) → [`pgoutput`] (decoding)
//! → [`event`] (JSON events, ids, subjects) → [`publish`] (JetStream) →
//! [`pipeline`] (joins them; [`ack_tracker`] decides what may be confirmed).
//! [`slot_watch`] watches the slot's WAL retention beside it; [`audit`]
//! checks settings; [`status`] is what the host shows; [`sql_message`] is
//! what `publish()` writes into the WAL for the worker to send.

pub mod ack_tracker;
pub mod audit;
pub mod backfill;
pub mod config;
pub mod error;
pub mod event;
#[cfg(feature = "fault-injection")]
pub mod failpoints;
pub mod filters;
mod lsn;
pub mod park_linger;
pub mod pgoutput;
pub mod pipeline;
pub mod publish;
pub mod replication;
pub mod slot_watch;
pub mod sql_message;
pub mod status;

pub use error::Error;
pub use lsn::Lsn;
