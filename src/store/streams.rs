//! The catalog snapshot behind the Simple Streams documents.
//!
//! Everything the two documents need is read in one read transaction, so a document never
//! mixes two catalog states (a version published between two reads, an alias moved halfway)
//! and carries the generation it reflects. The rows of `INCUS_ROWS` are the starting point:
//! `finalize_publish` writes them, with the combined checksums, in the same transaction that
//! publishes the version, so rendering never opens a blob.

use super::read::CatalogRead;
use super::tables::*;
use super::{Store, decode, load};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::model::{Artifact, Attachment, Image, ImageVersion, IncusRow, VersionState};
use redb::{ReadOnlyTable, ReadTransaction, ReadableTable};
use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use uuid::Uuid;

/// The artifact format Incus can boot as a VM disk (`disk-kvm.img`).
pub const INCUS_DISK_FORMAT: &str = "qcow2";
/// The artifact format Incus unpacks as a container root file system (`squashfs`).
pub const INCUS_ROOTFS_FORMAT: &str = "squashfs";

/// Whether Simple Streams can list an artifact of this format (given its metadata tarball).
pub fn incus_format(format: &str) -> bool {
    format == INCUS_DISK_FORMAT || format == INCUS_ROOTFS_FORMAT
}
/// The attachment name that carries Incus's image metadata tarball.
pub const INCUS_METADATA_NAME: &str = "incus.tar.xz";

/// What the documents are rendered from, as read at `generation`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub generation: u64,
    /// Images with at least one eligible published artifact, ordered by name.
    pub images: Vec<SnapshotImage>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotImage {
    pub name: String,
    pub display_name: Option<String>,
    /// Published versions that have eligible artifacts, in no particular order (the renderer
    /// orders them by publish time).
    pub versions: Vec<SnapshotVersion>,
    /// Every alias of the image with the id of the version it points at now.
    pub aliases: Vec<SnapshotAlias>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotVersion {
    pub id: Uuid,
    pub version: String,
    pub published_at: Timestamp,
    /// The eligible artifacts: qcow2 or squashfs with an `incus.tar.xz` attachment and an
    /// Incus row.
    pub artifacts: Vec<SnapshotArtifact>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotAlias {
    pub name: String,
    pub version_id: Uuid,
}

/// One eligible artifact with its metadata attachment. Digests are lowercase hex without the
/// `sha256:` prefix, which is how Simple Streams items carry them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotArtifact {
    pub artifact_id: Uuid,
    pub architecture: String,
    pub operating_system: String,
    pub variant: String,
    /// `qcow2` (a VM disk) or `squashfs` (a container root file system).
    pub format: String,
    /// The primary blob: the disk or the root file system.
    pub disk_sha256: String,
    pub disk_size: i64,
    pub attachment_id: Uuid,
    pub attachment_name: String,
    pub attachment_sha256: String,
    pub attachment_size: i64,
    /// sha256 of the attachment bytes followed by the disk bytes: the Incus fingerprint.
    pub combined_sha256: String,
    pub incus_requirements: BTreeMap<String, String>,
}

impl Store {
    /// Reads the Simple Streams snapshot in one read transaction.
    pub fn streams_snapshot(&self) -> Result<Snapshot> {
        let txn = self.begin_read()?;
        load_snapshot(&txn)
    }
}

/// The tables the snapshot reads row by row, opened once per snapshot rather than once per
/// Incus row (each open is a lookup in redb's table of tables).
struct Tables {
    images: ReadOnlyTable<u128, &'static [u8]>,
    versions: ReadOnlyTable<u128, &'static [u8]>,
    artifacts: ReadOnlyTable<u128, &'static [u8]>,
    attachments: ReadOnlyTable<u128, &'static [u8]>,
    retired: ReadOnlyTable<(u128, &'static str), &'static [u8]>,
}

fn load_snapshot(txn: &ReadTransaction) -> Result<Snapshot> {
    let generation = txn
        .open_table(META)?
        .get("generation")?
        .map(|v| v.value())
        .unwrap_or(0);
    let t = Tables {
        images: txn.open_table(IMAGES)?,
        versions: txn.open_table(VERSIONS)?,
        artifacts: txn.open_table(ARTIFACTS)?,
        attachments: txn.open_table(ATTACHMENTS)?,
        retired: txn.open_table(RETIRED)?,
    };
    let mut found: BTreeMap<Uuid, SnapshotImage> = BTreeMap::new();
    // Version id -> (image id, version), or `None` for a version that is not published.
    let mut versions: BTreeMap<Uuid, Option<(Uuid, SnapshotVersion)>> = BTreeMap::new();
    for row in txn.open_table(INCUS_ROWS)?.iter()? {
        let (key, value) = row?;
        let (version_id, artifact_id) = key.value();
        let (version_id, artifact_id) = (Uuid::from_u128(version_id), Uuid::from_u128(artifact_id));
        let incus: IncusRow = decode(value.value(), "incus row")?;
        let slot = match versions.entry(version_id) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(load_version(&t, &mut found, version_id)?),
        };
        let Some((_, version)) = slot else {
            continue;
        };
        let artifact = load::<Artifact>(&t.artifacts, artifact_id.as_u128(), "artifact")?
            .filter(|a| a.version_id == version_id)
            .ok_or_else(|| {
                Error::internal(format!("incus row names a missing artifact {artifact_id}"))
            })?;
        let attachment =
            load::<Attachment>(&t.attachments, incus.attachment_id.as_u128(), "attachment")?
                .filter(|a| a.artifact_id == artifact_id)
                .ok_or_else(|| {
                    Error::internal(format!(
                        "incus row names a missing attachment {}",
                        incus.attachment_id
                    ))
                })?;
        // The eligibility rule, applied again here so that the documents follow it whatever
        // rows exist.
        if !incus_format(&artifact.format) || attachment.name != INCUS_METADATA_NAME {
            continue;
        }
        version.artifacts.push(SnapshotArtifact {
            artifact_id,
            architecture: artifact.architecture,
            operating_system: artifact.operating_system,
            variant: artifact.variant,
            format: artifact.format,
            disk_sha256: artifact.primary_blob_digest.hex(),
            disk_size: artifact.primary_blob_size_bytes,
            attachment_id: attachment.id,
            attachment_name: attachment.name,
            attachment_sha256: attachment.blob_digest.hex(),
            attachment_size: attachment.blob_size_bytes,
            combined_sha256: incus.combined_sha256,
            incus_requirements: artifact.incus_requirements,
        });
    }
    for (image_id, version) in versions.into_values().flatten() {
        if !version.artifacts.is_empty()
            && let Some(image) = found.get_mut(&image_id)
        {
            image.versions.push(version);
        }
    }
    let mut out = Vec::with_capacity(found.len());
    for (image_id, mut image) in found {
        if image.versions.is_empty() {
            continue;
        }
        image.aliases = txn
            .aliases_of(image_id)?
            .into_iter()
            .map(|a| SnapshotAlias {
                name: a.alias,
                version_id: a.version_id,
            })
            .collect();
        out.push(image);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Snapshot {
        generation,
        images: out,
    })
}

/// Loads a version named by an Incus row, and its image into `found` on first sight. `None`
/// when the version is not published: rows are written in the transaction that publishes the
/// version, so this only guards against a later change of that rule, but drafts and versions
/// still publishing must never reach consumers.
fn load_version(
    t: &Tables,
    found: &mut BTreeMap<Uuid, SnapshotImage>,
    version_id: Uuid,
) -> Result<Option<(Uuid, SnapshotVersion)>> {
    let v: ImageVersion = load(&t.versions, version_id.as_u128(), "version")?.ok_or_else(|| {
        Error::internal(format!("incus row names a missing version {version_id}"))
    })?;
    // A retired version's rows are deleted when it is retired; the check keeps any other
    // per-version rows a later projection adds from reaching consumers after retirement.
    if v.state != VersionState::Published || super::retire::is_retired(&t.retired, &v)? {
        return Ok(None);
    }
    if let Entry::Vacant(e) = found.entry(v.image_id) {
        let image: Image = load(&t.images, v.image_id.as_u128(), "image")?.ok_or_else(|| {
            Error::internal(format!("version {version_id} names a missing image"))
        })?;
        e.insert(SnapshotImage {
            name: image.name,
            display_name: image.display_name,
            versions: Vec::new(),
            aliases: Vec::new(),
        });
    }
    Ok(Some((
        v.image_id,
        SnapshotVersion {
            id: v.id,
            version: v.version,
            published_at: v.published_at.unwrap_or(v.created_at),
            artifacts: Vec::new(),
        },
    )))
}
