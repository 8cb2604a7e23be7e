//! Retiring published versions.
//!
//! Published content never changes: a version is retired, never edited. Retiring is one write
//! transaction that moves the version's name from `VERSION_KEYS` to `RETIRED` and drops its
//! `INCUS_ROWS`, so listings, manifests, refs and both Simple Streams documents lose it at
//! once (and the catalog generation changes). The artifact and attachment rows stay, still
//! counted in `BLOB_REFS`, so the files remain downloadable by their direct URLs until the
//! grace period ends: an Incus daemon caches an index for an hour, and a client holding an
//! older index must not meet a 404 halfway through an update. After the grace the direct URLs
//! answer 410, and the sweeper purges the rows, which releases the blob references; blobs that
//! nothing else references (another version, a draft, a held upload) are then collected.
//!
//! A retired version's name stays reserved: creating it again is refused, so the content ever
//! published under a name is the only content that name has named.

use super::read::{CatalogRead, version_not_found};
use super::tables::*;
use super::{Store, begin_write_scope, bump_generation, decode, encode};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::model::{Artifact, Attachment, Image, ImageVersion, VersionState};
use redb::{ReadTransaction, ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use uuid::Uuid;

/// Versions retired since start, by a request (`DELETE`) and by a retention policy. Exported
/// as `imgsrv_versions_retired_total{reason}`.
pub static RETIRED_BY_REQUEST: AtomicU64 = AtomicU64::new(0);
pub static RETIRED_BY_POLICY: AtomicU64 = AtomicU64::new(0);

/// Who retired a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Retirer {
    /// A `DELETE` by this principal.
    Principal { principal_id: Uuid },
    /// The image's retention policy (after a publish or in a sweep).
    Policy,
}

impl Retirer {
    /// The metric label and log value of the cause.
    pub fn label(&self) -> &'static str {
        match self {
            Retirer::Principal { .. } => "request",
            Retirer::Policy => "policy",
        }
    }
}

/// The record of a retired version (value of `RETIRED`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetiredVersion {
    pub version_id: Uuid,
    pub image_id: Uuid,
    pub version: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub published_at: Option<Timestamp>,
    pub retired_at: Timestamp,
    /// The files stay downloadable by their direct URLs until then.
    pub downloadable_until: Timestamp,
    pub retired_by: Retirer,
    /// Why, in words: the policy rule that selected it, or the request.
    pub reason: String,
    /// When the sweeper removed the artifact and attachment rows (after the grace).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub purged_at: Option<Timestamp>,
}

/// What a direct download URL of a version finds.
pub enum Found<T> {
    /// Published, or retired and still within its grace period.
    Served(T),
    /// Retired and past its grace period: 410.
    Gone(RetiredVersion),
}

/// The retirement record of `image`'s `version`, if that name was retired.
pub(crate) fn retired_record(
    txn: &WriteTransaction,
    image: &Image,
    version: &str,
) -> Result<Option<RetiredVersion>> {
    txn.open_table(RETIRED)?
        .get((image.id.as_u128(), version))?
        .map(|v| decode(v.value(), "retired version"))
        .transpose()
}

/// Whether `v` has been retired. A retired version keeps its `VERSIONS` row (still
/// `published`) until it is purged, so readers that reach versions by id rather than by name
/// must ask.
pub(crate) fn is_retired(r: &impl RetiredRead, v: &ImageVersion) -> Result<bool> {
    r.retired_id(v.image_id, &v.version)
        .map(|id| id == Some(v.id))
}

/// The one table lookup `is_retired` needs, for read and write transactions alike.
pub(crate) trait RetiredRead {
    fn retired_id(&self, image: Uuid, version: &str) -> Result<Option<Uuid>>;
}

macro_rules! retired_id_impl {
    ($t:ty) => {
        impl RetiredRead for $t {
            fn retired_id(&self, image: Uuid, version: &str) -> Result<Option<Uuid>> {
                let t = self.open_table(RETIRED)?;
                let Some(v) = t.get((image.as_u128(), version))? else {
                    return Ok(None);
                };
                let r: RetiredVersion = decode(v.value(), "retired version")?;
                Ok(Some(r.version_id))
            }
        }
    };
}
retired_id_impl!(redb::ReadTransaction);
retired_id_impl!(WriteTransaction);

/// The same lookup in an already opened table, for readers that check many versions.
impl RetiredRead for redb::ReadOnlyTable<(u128, &'static str), &'static [u8]> {
    fn retired_id(&self, image: Uuid, version: &str) -> Result<Option<Uuid>> {
        let Some(v) = redb::ReadableTable::get(self, (image.as_u128(), version))? else {
            return Ok(None);
        };
        let r: RetiredVersion = decode(v.value(), "retired version")?;
        Ok(Some(r.version_id))
    }
}

/// Refuses to create a version whose name was retired: published content under a name never
/// changes, and a client holding an old index would otherwise get different bytes.
pub(crate) fn check_name_not_retired(
    txn: &WriteTransaction,
    image: &Image,
    version: &str,
) -> Result<()> {
    match retired_record(txn, image, version)? {
        Some(r) => Err(Error::conflict(format!(
            "catalog conflict: version {version:?} of image {:?} was retired at {}; a retired version's name is never reused",
            image.name,
            r.retired_at.rfc3339()
        ))),
        None => Ok(()),
    }
}

/// Retires a published version inside `txn`. Refuses (409) a version that is not published
/// or that an alias points at, naming the aliases.
pub(crate) fn retire_in(
    txn: &WriteTransaction,
    image: &Image,
    v: &ImageVersion,
    by: Retirer,
    reason: String,
    now: Timestamp,
    grace: Duration,
) -> Result<RetiredVersion> {
    match v.state {
        VersionState::Published => {}
        VersionState::Draft => {
            return Err(Error::conflict(format!(
                "catalog conflict: version {:?} is a draft; only published versions are retired (a draft is changed by deleting its artifacts)",
                v.version
            )));
        }
        VersionState::Publishing => {
            return Err(Error::conflict(format!(
                "catalog conflict: version {:?} is still publishing; retire it once its publish job has finished",
                v.version
            )));
        }
    }
    let mut aliases: Vec<String> = txn
        .aliases_of(image.id)?
        .into_iter()
        .filter(|a| a.version_id == v.id)
        .map(|a| a.alias)
        .collect();
    if !aliases.is_empty() {
        aliases.sort();
        return Err(Error::conflict(format!(
            "catalog conflict: version {:?} is the target of alias{} {}; move or delete {} first",
            v.version,
            if aliases.len() == 1 { "" } else { "es" },
            aliases.join(", "),
            if aliases.len() == 1 { "it" } else { "them" },
        )));
    }
    txn.open_table(VERSION_KEYS)?
        .remove((image.id.as_u128(), v.version.as_str()))?;
    {
        let mut rows = txn.open_table(INCUS_ROWS)?;
        let id = v.id.as_u128();
        let keys: Vec<(u128, u128)> = rows
            .range((id, 0u128)..=(id, u128::MAX))?
            .map(|r| r.map(|(k, _)| k.value()))
            .collect::<std::result::Result<_, _>>()?;
        for k in keys {
            rows.remove(k)?;
        }
    }
    let record = RetiredVersion {
        version_id: v.id,
        image_id: image.id,
        version: v.version.clone(),
        published_at: v.published_at,
        retired_at: now,
        downloadable_until: now.add(grace),
        retired_by: by,
        reason,
        purged_at: None,
    };
    txn.open_table(RETIRED)?.insert(
        (image.id.as_u128(), v.version.as_str()),
        encode(&record)?.as_slice(),
    )?;
    bump_generation(txn)?;
    Ok(record)
}

/// Logs a committed retirement and counts it. Every retirement passes through here.
pub(crate) fn announce(image_name: &str, r: &RetiredVersion) {
    match r.retired_by {
        Retirer::Principal { .. } => RETIRED_BY_REQUEST.fetch_add(1, Ordering::Relaxed),
        Retirer::Policy => RETIRED_BY_POLICY.fetch_add(1, Ordering::Relaxed),
    };
    let by = match &r.retired_by {
        Retirer::Principal { principal_id } => format!("principal:{principal_id}"),
        Retirer::Policy => "retention-policy".to_string(),
    };
    crate::log::event(
        "info",
        0,
        "version retired",
        &[
            ("image", image_name.to_string()),
            ("version", r.version.clone()),
            ("version_id", r.version_id.to_string()),
            ("retired_by", by),
            ("cause", r.retired_by.label().to_string()),
            ("reason", r.reason.clone()),
            ("downloadable_until", r.downloadable_until.rfc3339()),
        ],
    );
}

impl Store {
    /// `DELETE /v1/images/{name}/versions/{version}`: retires a published version (see the
    /// module comment). A version already retired is not found, like any second DELETE.
    pub fn retire_version(
        &self,
        name: &str,
        version: &str,
        by: Retirer,
        grace: Duration,
    ) -> Result<RetiredVersion> {
        crate::validate::check_image_name(name)?;
        crate::validate::check_version(version)?;
        let record = begin_write_scope(self, |txn| {
            let image = txn.image_named(name)?;
            let Some(v) = txn.version_of(&image, version)? else {
                return Err(match retired_record(txn, &image, version)? {
                    Some(r) => Error::not_found(format!(
                        "catalog not found: image {name:?} version {version:?} was already retired at {}",
                        r.retired_at.rfc3339()
                    )),
                    None => version_not_found(name, version),
                });
            };
            retire_in(
                txn,
                &image,
                &v,
                by,
                "retired by request".to_string(),
                Timestamp::now(),
                grace,
            )
        })?;
        announce(name, &record);
        Ok(record)
    }

    /// The retirement record of a version name, read in its own snapshot.
    fn retired_lookup(&self, name: &str, version: &str) -> Result<Option<RetiredVersion>> {
        let txn = self.begin_read()?;
        let Some(image) = txn.image_by_name(name)? else {
            return Ok(None);
        };
        txn.open_table(RETIRED)?
            .get((image.id.as_u128(), version))?
            .map(|v| decode(v.value(), "retired version"))
            .transpose()
    }

    /// The artifact a direct download URL names: of a published version, or of a retired one
    /// still within its grace period. Otherwise the published lookup's 404 stands.
    pub fn artifact_for_download(
        &self,
        name: &str,
        version: &str,
        artifact_id: Uuid,
        now: Timestamp,
    ) -> Result<Found<Artifact>> {
        self.for_download(
            name,
            version,
            now,
            || Ok(self.published_artifact(name, version, artifact_id)?.1),
            |txn, r| txn.version_artifact(r.version_id, artifact_id),
        )
    }

    /// Like [`Store::artifact_for_download`], for an attachment of an artifact.
    pub fn attachment_for_download(
        &self,
        name: &str,
        version: &str,
        artifact_id: Uuid,
        attachment_id: Uuid,
        now: Timestamp,
    ) -> Result<Found<Attachment>> {
        self.for_download(
            name,
            version,
            now,
            || self.published_attachment(name, version, artifact_id, attachment_id),
            |txn, r| {
                let artifact = txn.version_artifact(r.version_id, artifact_id)?;
                txn.artifact_attachment(artifact.id, attachment_id)
            },
        )
    }

    /// What both download lookups share: `published` looks in the published version; when it
    /// finds nothing, a retired version of that name is gone past its grace, and within it
    /// `retired` looks in the retired version's rows. Otherwise the published lookup's 404
    /// stands.
    fn for_download<T>(
        &self,
        name: &str,
        version: &str,
        now: Timestamp,
        published: impl FnOnce() -> Result<T>,
        retired: impl FnOnce(&ReadTransaction, &RetiredVersion) -> Result<T>,
    ) -> Result<Found<T>> {
        let missing = match published() {
            Ok(found) => return Ok(Found::Served(found)),
            Err(e) if e.kind == crate::error::Kind::NotFound => e,
            Err(e) => return Err(e),
        };
        let Some(r) = self.retired_lookup(name, version)? else {
            return Err(missing);
        };
        if !in_grace(&r, now) {
            return Ok(Found::Gone(r));
        }
        retired(&self.begin_read()?, &r).map(Found::Served)
    }

    /// Removes the rows of retired versions whose grace has passed, releasing their blob
    /// references (unreferenced blobs are collected in the same transaction). Returns how many
    /// versions were purged.
    pub fn purge_retired(&self, now: Timestamp) -> Result<usize> {
        let due: Vec<(u128, String)> = {
            let txn = self.begin_read()?;
            let t = txn.open_table(RETIRED)?;
            let mut out = Vec::new();
            for row in t.iter()? {
                let (k, v) = row?;
                let r: RetiredVersion = decode(v.value(), "retired version")?;
                if r.purged_at.is_none() && !in_grace(&r, now) {
                    let (image, version) = k.value();
                    out.push((image, version.to_string()));
                }
            }
            out
        };
        // Purging drops the last references to blobs only the retired version used, so it frees
        // space the way collection does: one version at a time, the pages settled at the end.
        Ok(super::free_each(
            self,
            "purge a retired version",
            &due,
            |txn, (image, version)| purge_in(txn, *image, version, now).map(|()| true),
            |(image, version)| {
                format!(
                    "purging retired version {version:?} of image {} failed",
                    Uuid::from_u128(*image)
                )
            },
        ))
    }
}

fn in_grace(r: &RetiredVersion, now: Timestamp) -> bool {
    r.purged_at.is_none() && now < r.downloadable_until
}

/// Deletes a retired version's version, artifact and attachment rows and releases their blob
/// references; the `RETIRED` record stays (marked purged) to keep the name reserved and to
/// answer 410 on its old download URLs.
fn purge_in(txn: &WriteTransaction, image: u128, version: &str, now: Timestamp) -> Result<()> {
    let mut r: RetiredVersion = match txn.open_table(RETIRED)?.get((image, version))? {
        Some(v) => decode(v.value(), "retired version")?,
        None => return Ok(()),
    };
    if r.purged_at.is_some() {
        return Ok(());
    }
    for artifact in txn.artifacts_of(r.version_id)? {
        for att in txn.attachments_of(artifact.id)? {
            txn.open_table(ATTACHMENTS)?.remove(att.id.as_u128())?;
            txn.open_table(ARTIFACT_ATTACHMENTS)?
                .remove((artifact.id.as_u128(), att.id.as_u128()))?;
            super::blobs::drop_ref(txn, &att.blob_digest)?;
        }
        txn.open_table(ARTIFACTS)?.remove(artifact.id.as_u128())?;
        txn.open_table(VERSION_ARTIFACTS)?
            .remove((r.version_id.as_u128(), artifact.id.as_u128()))?;
        super::blobs::drop_ref(txn, &artifact.primary_blob_digest)?;
    }
    // The version row goes too: its name lives on in the `RETIRED` record, and a version row
    // without a name key would be an orphan to every later reader.
    txn.open_table(VERSIONS)?.remove(r.version_id.as_u128())?;
    r.purged_at = Some(now);
    txn.open_table(RETIRED)?
        .insert((image, version), encode(&r)?.as_slice())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::blobs::BlobRecord;
    use crate::store::catalog::NewArtifact;

    /// A version caught between publish and `finalize_publish` (as after a failed publish step)
    /// is refused, as is a draft; neither is changed.
    #[test]
    fn only_published_versions_can_be_retired() {
        let (_dir, store) = crate::store::scratch_store();
        // An empty trusted blob, written directly: publish only checks that it exists.
        let digest = crate::digest::Digest::of(b"");
        let key = *digest.as_bytes();
        begin_write_scope(&store, |txn| {
            let record = BlobRecord {
                size: 0,
                verified_at: Timestamp::now(),
                media_type: None,
                chunks: Vec::new(),
            };
            txn.open_table(BLOBS)?
                .insert(&key, record.encode().as_slice())?;
            Ok(())
        })
        .unwrap();
        store.create_image("img", None, None).unwrap();
        for v in ["1", "2"] {
            store.create_version("img", v).unwrap();
            store
                .add_artifact(
                    "img",
                    v,
                    NewArtifact {
                        variant: String::new(),
                        operating_system: "debian".into(),
                        architecture: "x86_64".into(),
                        format: "raw".into(),
                        primary_blob_digest: digest.to_string(),
                        primary_blob_size_bytes: 0,
                        primary_media_type: "application/octet-stream".into(),
                        incus_requirements: Default::default(),
                    },
                )
                .unwrap();
        }
        store.publish("img", "1").unwrap();
        let by = || Retirer::Policy;
        let grace = Duration::from_secs(60);
        let e = store.retire_version("img", "1", by(), grace).unwrap_err();
        assert_eq!(e.kind, crate::error::Kind::Conflict);
        assert!(e.detail.contains("still publishing"), "{e}");
        let e = store.retire_version("img", "2", by(), grace).unwrap_err();
        assert_eq!(e.kind, crate::error::Kind::Conflict);
        assert!(e.detail.contains("is a draft"), "{e}");
        for (v, state) in [("1", VersionState::Publishing), ("2", VersionState::Draft)] {
            assert_eq!(
                store.manifest("img", v, false).unwrap().version.state,
                state
            );
        }
    }
}
