//! The core's one error type; each variant says where an operator looks.

use std::fmt;

use crate::event::EventError;
use crate::pgoutput::DecodeError;

#[derive(Debug)]
pub enum Error {
    /// Postgres sent replication data we cannot decode.
    Decode(DecodeError),
    /// A change could not be turned into an event.
    Event(EventError),
    /// Connecting to, or streaming from, the server's own replication slot failed.
    Replication(String),
    /// The server is not set up for us (wal_level, slot, publication, pg_hba).
    Setup(String),
    /// NATS or JetStream refused or failed.
    Nats(String),
    /// Not a failure: the session must start over at once (e.g. to replay
    /// transactions one event at a time). Logged, not shown as an error.
    Restart(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Decode(e) => write!(f, "decoding pgoutput: {e}"),
            Error::Event(e) => write!(f, "building event: {e}"),
            Error::Replication(e) => write!(f, "replication: {e}"),
            Error::Setup(e) => write!(f, "setup: {e}"),
            Error::Nats(e) => write!(f, "NATS: {e}"),
            Error::Restart(e) => write!(f, "restarting the session: {e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<DecodeError> for Error {
    fn from(e: DecodeError) -> Self {
        Error::Decode(e)
    }
}

impl From<EventError> for Error {
    fn from(e: EventError) -> Self {
        Error::Event(e)
    }
}
