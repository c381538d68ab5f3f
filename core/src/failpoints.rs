//! Faults the tests inject by name (`wal_listener.inject_fault`), to prove
//! that bad input and panics end in a restart from the slot, never a crash.
//! Built only with the `fault-injection` feature: release packages have no
//! test branch on the path of each change.

/// A fault to inject at the next row change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedFault {
    /// A Rust panic in the pipeline.
    Panic,
    /// The change arrives with an unknown message tag.
    UnknownMessage,
    /// The change refers to a relation never described.
    UndescribedRelation,
    /// The supervisor itself panics (its task ends; the host must notice).
    SupervisorPanic,
    /// A filter change waits 5 s before it is recorded, so that a test
    /// can stop a standby between the change and its record.
    SlowFilterRecord,
}

impl InjectedFault {
    /// The setting's value for this fault.
    pub fn name(self) -> &'static str {
        match self {
            InjectedFault::Panic => "panic",
            InjectedFault::UnknownMessage => "unknown_message",
            InjectedFault::UndescribedRelation => "undescribed_relation",
            InjectedFault::SupervisorPanic => "supervisor_panic",
            InjectedFault::SlowFilterRecord => "slow_filter_record",
        }
    }
}

/// What the pipeline should do with a pgoutput message under `fault`.
pub enum Injected {
    /// Decode these bytes instead.
    Replace(Vec<u8>),
    /// Forget every relation description, then decode as usual.
    ForgetRelations,
    /// Leave the message alone (not a row change).
    Nothing,
}

/// Applies `fault` to `data` when it is a row change (insert, update, delete).
pub fn inject(fault: InjectedFault, data: &[u8]) -> Injected {
    if !matches!(data.first(), Some(b'I' | b'U' | b'D')) {
        return Injected::Nothing;
    }
    match fault {
        InjectedFault::Panic => panic!("injected by wal_listener.inject_fault = {}", fault.name()),
        InjectedFault::UnknownMessage => {
            let mut unknown = data.to_vec();
            unknown[0] = b'?';
            Injected::Replace(unknown)
        }
        InjectedFault::UndescribedRelation => Injected::ForgetRelations,
        InjectedFault::SupervisorPanic | InjectedFault::SlowFilterRecord => Injected::Nothing,
    }
}
