//! Aliases: mutable names (`latest`, `stable`) for published versions of an image. Moving or
//! deleting one bumps the catalog generation, since Simple Streams and the catalog page show
//! aliases.

use super::read::{CatalogRead, image_version};
use super::tables::ALIASES;
use super::{Store, begin_write_scope, bump_generation, decode, encode};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::model::{Alias, VersionState};
use crate::validate::{check_alias, check_image_name, check_version};
use redb::ReadableTable;
use uuid::Uuid;

impl Store {
    pub fn put_alias(&self, name: &str, alias: &str, version: &str) -> Result<Alias> {
        check_image_name(name)?;
        check_alias(alias)?;
        check_version(version)?;
        begin_write_scope(self, |txn| {
            let (image, v) = image_version(txn, name, version)?;
            if v.state != VersionState::Published {
                return Err(Error::precondition(
                    "aliases must target a published version for the same image",
                ));
            }
            let mut t = txn.open_table(ALIASES)?;
            let key = (image.id.as_u128(), alias);
            let existing: Option<Alias> = t
                .get(key)?
                .map(|x| decode(x.value(), "alias"))
                .transpose()?;
            let now = Timestamp::now();
            let record = match existing {
                Some(mut a) => {
                    a.version_id = v.id;
                    a.version = v.version.clone();
                    a.updated_at = now;
                    a
                }
                None => Alias {
                    id: Uuid::new_v4(),
                    image_id: image.id,
                    alias: alias.to_string(),
                    version_id: v.id,
                    version: v.version.clone(),
                    created_at: now,
                    updated_at: now,
                },
            };
            t.insert(key, encode(&record)?.as_slice())?;
            drop(t);
            bump_generation(txn)?;
            Ok(record)
        })
    }

    pub fn alias(&self, name: &str, alias: &str) -> Result<Alias> {
        check_image_name(name)?;
        check_alias(alias)?;
        let txn = self.begin_read()?;
        let image = txn.image_named(name)?;
        let found = txn
            .open_table(ALIASES)?
            .get((image.id.as_u128(), alias))?
            .map(|v| decode::<Alias>(v.value(), "alias"))
            .transpose()?;
        found.ok_or_else(|| Error::not_found(format!("catalog not found: alias {alias:?}")))
    }

    /// Every alias of an image (published or not), ordered by alias name.
    pub fn list_aliases(&self, name: &str) -> Result<Vec<Alias>> {
        check_image_name(name)?;
        let txn = self.begin_read()?;
        let image = txn.image_named(name)?;
        txn.aliases_of(image.id)
    }

    pub fn delete_alias(&self, name: &str, alias: &str) -> Result<()> {
        check_image_name(name)?;
        check_alias(alias)?;
        begin_write_scope(self, |txn| {
            let image = txn.image_named(name)?;
            let removed = txn
                .open_table(ALIASES)?
                .remove((image.id.as_u128(), alias))?
                .is_some();
            if !removed {
                return Err(Error::not_found(format!(
                    "catalog not found: alias {alias:?}"
                )));
            }
            bump_generation(txn)
        })
    }
}
