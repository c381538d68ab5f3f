//! Type lookups in `pg_type`, for the JSON form of column values.

use crate::config::SourceConfig;
use crate::event::TypeRow;
use crate::replication::connection::{column_text, Sql};
use crate::Error;

/// Reads what decides the JSON form of `oids` and of every type they refer
/// to (domain bases, array elements): one side session, once per session
/// and set of new types.
pub async fn lookup_types(cfg: &SourceConfig, oids: &[u32]) -> Result<Vec<TypeRow>, Error> {
    let list = oids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    // array_out separates elements with the element type's delimiter.
    let query = format!(
        "WITH RECURSIVE wanted(oid) AS ( \
             SELECT unnest('{{{list}}}'::oid[]) \
             UNION \
             SELECT r.ref FROM pg_type p JOIN wanted w ON p.oid = w.oid, \
                    LATERAL (VALUES (p.typelem), (p.typbasetype)) r(ref) WHERE r.ref <> 0) \
         SELECT p.oid, p.typtype, CASE WHEN p.typcategory = 'A' THEN p.typelem ELSE 0 END, \
                coalesce(e.typdelim, p.typdelim), p.typbasetype \
           FROM pg_type p JOIN wanted w ON p.oid = w.oid \
           LEFT JOIN pg_type e ON p.typcategory = 'A' AND e.oid = p.typelem"
    );
    let rows = Sql::side(cfg).await?.rows(&query).await?;
    rows.into_iter()
        .map(|row| {
            let text = |i: usize| column_text(&row, i);
            let number = |i: usize| text(i).parse::<u32>().ok();
            let byte = |i: usize| text(i).bytes().next();
            Some(TypeRow {
                oid: number(0)?,
                typtype: byte(1)?,
                array_element: number(2)?,
                typdelim: byte(3)?,
                domain_base: number(4)?,
            })
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| Error::Replication("unexpected pg_type row shape".into()))
}
