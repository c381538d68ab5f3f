//! Relation messages and the cache of them: pgoutput describes a table once
//! per session (and again after DDL) and then refers to it by id.

use std::collections::HashMap;

use super::reader::Reader;
use super::DecodeError;

/// A table as pgoutput last described it.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    /// Part of the replica identity key.
    pub is_key: bool,
}

pub(super) fn decode_relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let id = r.u32()?;
    let namespace = r.cstr()?.to_owned();
    let name = r.cstr()?.to_owned();
    let replica_identity = r.u8()?;
    let count = r.count()?;
    let mut columns = Vec::with_capacity(count.min(r.remaining()));
    for _ in 0..count {
        let flags = r.u8()?;
        columns.push(Column {
            name: r.cstr()?.to_owned(),
            type_oid: r.u32()?,
            type_modifier: r.i32()?,
            is_key: flags & 1 != 0,
        });
    }
    Ok(Relation { id, namespace, name, replica_identity, columns })
}

/// Relations by id; a new description of the same id replaces the old one.
#[derive(Debug, Default)]
pub struct RelationCache {
    by_id: HashMap<u32, Relation>,
}

impl RelationCache {
    pub fn insert(&mut self, relation: Relation) {
        self.by_id.insert(relation.id, relation);
    }

    pub fn get(&self, id: u32) -> Option<&Relation> {
        self.by_id.get(&id)
    }
}
