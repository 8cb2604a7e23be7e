//! Schema upgrades, run by `Store::open` inside the transaction that checks the schema
//! version, so an upgrade is committed whole or not at all.
//!
//! Each step takes a file from schema `n` to `n + 1` and says what it changes. A file with a
//! newer schema than this binary knows is refused: guessing at a layout written by a later
//! release could corrupt it.

use super::tables::*;
use crate::error::{Error, Result};
use redb::{ReadableTable, Table, WriteTransaction};

/// Brings a database at schema `found` up to `SCHEMA_VERSION`, recording the new version in
/// `meta`. Does nothing when the file is already current.
pub(crate) fn upgrade(
    txn: &WriteTransaction,
    meta: &mut Table<&'static str, u64>,
    found: u64,
) -> Result<()> {
    if found > SCHEMA_VERSION {
        return Err(Error::internal(format!(
            "database schema version {found} is newer than this imgsrv supports \
             (schema {SCHEMA_VERSION}); it was written by a later release: run that release \
             or a newer one, or restore a backup taken before the upgrade"
        )));
    }
    if found == 0 {
        return Err(Error::internal(
            "database schema version 0 is not a schema imgsrv ever wrote; refusing to open",
        ));
    }
    let mut at = found;
    while at < SCHEMA_VERSION {
        match at {
            1 => to_2(txn)?,
            2 => to_3(txn)?,
            _ => unreachable!("every schema below SCHEMA_VERSION has an upgrade step"),
        }
        at += 1;
        meta.insert("schema_version", at)?;
        // Logged before the commit that makes it real: should the commit fail, the open fails
        // and its error follows this line.
        crate::log::info(&format!(
            "upgrading database schema from {} to {at}",
            at - 1
        ));
    }
    Ok(())
}

/// Schema 1 -> 2: version retirement and retention policies. Two new tables, both empty: no
/// version of a schema-1 file is retired and no image has a policy, so every existing row keeps
/// its meaning and layout. The tables are created here rather than on first use so that a read
/// transaction never meets a missing table.
fn to_2(txn: &WriteTransaction) -> Result<()> {
    txn.open_table(RETENTION)?;
    txn.open_table(RETIRED)?;
    Ok(())
}

/// Schema 2 -> 3: hash once. New chunks are keyed by BLAKE3 instead of sha256; stored chunks
/// keep their sha256 keys, which stay valid identities (a key is opaque once stored: lists name
/// chunks by it and reads check chunks against their xxh3-128 sums), so no chunk is rewritten.
/// Part records gain a layout byte and the carried sha256 states: each stored part of an
/// unfinished upload is rewritten with its sha256 as its etag (so the etags its client holds
/// still complete it) and no states (so `complete` reads it back).
fn to_3(txn: &WriteTransaction) -> Result<()> {
    use super::uploads::PartRecord;
    let mut parts = txn.open_table(PARTS)?;
    let mut rewritten = Vec::new();
    for row in parts.iter()? {
        let (k, v) = row?;
        rewritten.push((k.value(), PartRecord::decode_schema2(v.value())?.encode()));
    }
    for (k, v) in rewritten {
        parts.insert(k, v.as_slice())?;
    }
    Ok(())
}
