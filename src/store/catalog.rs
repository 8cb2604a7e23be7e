//! Images, versions, artifacts and attachments.
//!
//! Every mutation runs in one durable write transaction and validates in the order docs/api.md
//! section 4 gives, so a rejected request leaves the data unchanged. Catalog rows count their
//! blob references in `BLOB_REFS`, which is what garbage collection consults.

use super::blobs;
use super::read::{
    CatalogRead, has_published, image_not_found, image_version, manifest_in, version_not_found,
};
use super::tables::*;
use super::{Store, begin_write_scope, decode, load, save};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::model::*;
use crate::validate::{
    self, catalog_invalid as invalid, check_digest, check_image_name, check_optional_text,
    check_token, check_version,
};
use redb::{ReadableTable, WriteTransaction};
use serde::Deserialize;
use uuid::Uuid;

fn require_draft(v: &ImageVersion) -> Result<()> {
    if v.state == VersionState::Draft {
        Ok(())
    } else {
        Err(Error::precondition(
            "version manifest can only change while draft",
        ))
    }
}

fn touch_version(txn: &WriteTransaction, v: &mut ImageVersion) -> Result<()> {
    v.updated_at = Timestamp::now();
    save(&mut txn.open_table(VERSIONS)?, v.id.as_u128(), v)
}

/// What a caller asks for when adding an artifact: also the request body of
/// `POST .../artifacts`. Members arrive as text and are checked by `add_artifact`, in the
/// order docs/api.md section 4 gives, so each rule answers with its own message; a missing
/// member is empty and fails its rule.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct NewArtifact {
    pub variant: String,
    pub operating_system: String,
    pub architecture: String,
    pub format: String,
    pub primary_blob_digest: String,
    #[serde(deserialize_with = "crate::model::integer")]
    pub primary_blob_size_bytes: i64,
    pub primary_media_type: String,
    pub incus_requirements: std::collections::BTreeMap<String, String>,
}

/// What a caller asks for when adding an attachment: also the request body of
/// `POST .../attachments`, checked by `add_attachment` like `NewArtifact`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct NewAttachment {
    pub name: String,
    pub media_type: String,
    pub blob_digest: String,
    #[serde(deserialize_with = "crate::model::integer")]
    pub blob_size_bytes: i64,
}

/// Incus requirements only mean something on the formats Simple Streams lists, and they end up
/// as Incus image properties, so keys follow the token pattern and values are short plain text.
fn check_incus_requirements(
    format: &str,
    requirements: &std::collections::BTreeMap<String, String>,
) -> Result<()> {
    if requirements.is_empty() {
        return Ok(());
    }
    if !crate::store::streams::incus_format(format) {
        return Err(invalid(format!(
            "incus requirements are only accepted on qcow2 and squashfs artifacts, not {format:?}"
        )));
    }
    if requirements.len() > validate::MAX_INCUS_REQUIREMENTS {
        return Err(invalid(format!(
            "at most {} incus requirements are accepted",
            validate::MAX_INCUS_REQUIREMENTS
        )));
    }
    for (k, v) in requirements {
        check_token("incus requirement name", k)?;
        if !validate::incus_requirement_value(v) {
            return Err(invalid(format!(
                "incus requirement {k:?} must be 1 to 128 printable ASCII characters"
            )));
        }
    }
    Ok(())
}

impl Store {
    pub fn create_image(
        &self,
        name: &str,
        display_name: Option<String>,
        description: Option<String>,
    ) -> Result<Image> {
        check_image_name(name)?;
        check_optional_text("display name", &display_name)?;
        check_optional_text("description", &description)?;
        begin_write_scope(self, |txn| {
            let mut names = txn.open_table(IMAGE_NAMES)?;
            if names.get(name)?.is_some() {
                return Err(Error::conflict(format!(
                    "catalog conflict: image {name:?} already exists"
                )));
            }
            let now = Timestamp::now();
            let image = Image {
                id: Uuid::new_v4(),
                name: name.to_string(),
                display_name,
                description,
                created_at: now,
                updated_at: now,
            };
            names.insert(name, image.id.as_u128())?;
            save(&mut txn.open_table(IMAGES)?, image.id.as_u128(), &image)?;
            Ok(image)
        })
    }

    /// Images with at least one published version, ordered by name.
    pub fn list_images(&self) -> Result<Vec<Image>> {
        let txn = self.begin_read()?;
        let names = txn.open_table(IMAGE_NAMES)?;
        let images = txn.open_table(IMAGES)?;
        let mut out = Vec::new();
        for row in names.iter()? {
            let (_, id) = row?;
            if let Some(image) = load::<Image>(&images, id.value(), "image")?
                && has_published(&txn, &image)?
            {
                out.push(image);
            }
        }
        Ok(out)
    }

    /// An image that has a published version (404 otherwise).
    pub fn published_image(&self, name: &str) -> Result<Image> {
        check_image_name(name)?;
        let txn = self.begin_read()?;
        let image = txn.image_named(name)?;
        if !has_published(&txn, &image)? {
            return Err(image_not_found(name));
        }
        Ok(image)
    }

    pub fn create_version(&self, name: &str, version: &str) -> Result<ImageVersion> {
        check_image_name(name)?;
        check_version(version)?;
        begin_write_scope(self, |txn| {
            let image = txn.image_named(name)?;
            if txn.version_of(&image, version)?.is_some() {
                return Err(Error::conflict(format!(
                    "catalog conflict: version {version:?} of image {name:?} already exists"
                )));
            }
            super::retire::check_name_not_retired(txn, &image, version)?;
            let now = Timestamp::now();
            let v = ImageVersion {
                id: Uuid::new_v4(),
                image_id: image.id,
                version: version.to_string(),
                state: VersionState::Draft,
                published_at: None,
                created_at: now,
                updated_at: now,
            };
            txn.open_table(VERSION_KEYS)?
                .insert((image.id.as_u128(), version), v.id.as_u128())?;
            save(&mut txn.open_table(VERSIONS)?, v.id.as_u128(), &v)?;
            Ok(v)
        })
    }

    /// Published versions, newest `created_at` first (then version string, then id).
    pub fn list_published_versions(&self, name: &str) -> Result<Vec<ImageVersion>> {
        check_image_name(name)?;
        let txn = self.begin_read()?;
        let image = txn.image_named(name)?;
        let mut list: Vec<ImageVersion> = txn
            .versions_of(&image)?
            .into_iter()
            .filter(|v| v.state == VersionState::Published)
            .collect();
        if list.is_empty() {
            return Err(image_not_found(name));
        }
        list.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| a.version.cmp(&b.version))
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(list)
    }

    /// The manifest of a version in any state (or only when published).
    pub fn manifest(&self, name: &str, version: &str, published_only: bool) -> Result<Manifest> {
        check_image_name(name)?;
        check_version(version)?;
        let txn = self.begin_read()?;
        let (image, v) = image_version(&txn, name, version)?;
        if published_only && v.state != VersionState::Published {
            return Err(version_not_found(name, version));
        }
        manifest_in(&txn, image, v)
    }

    /// `refs/{ref}`: an exact published version, else a published alias target.
    pub fn resolve_ref(&self, name: &str, reference: &str) -> Result<Manifest> {
        check_image_name(name)?;
        check_version(reference)?;
        let txn = self.begin_read()?;
        let image = txn.image_named(name)?;
        if let Some(v) = txn.version_of(&image, reference)?
            && v.state == VersionState::Published
        {
            return manifest_in(&txn, image, v);
        }
        let alias = txn
            .open_table(ALIASES)?
            .get((image.id.as_u128(), reference))?
            .map(|v| decode::<Alias>(v.value(), "alias"))
            .transpose()?;
        if let Some(alias) = alias
            && let Some(v) = txn.version_by_id(alias.version_id)?
            && v.state == VersionState::Published
        {
            return manifest_in(&txn, image, v);
        }
        Err(Error::not_found(format!(
            "catalog not found: image {name:?} ref {reference:?}"
        )))
    }

    pub fn add_artifact(&self, name: &str, version: &str, a: NewArtifact) -> Result<Artifact> {
        // The digest is the first rule the contract checks, before the path's names.
        let digest = check_digest(&a.primary_blob_digest)?;
        check_image_name(name)?;
        check_version(version)?;
        let variant = if a.variant.is_empty() {
            "default".to_string()
        } else {
            a.variant
        };
        check_token("variant", &variant)?;
        check_token("operating system", &a.operating_system)?;
        check_token("architecture", &a.architecture)?;
        if !validate::FORMATS.contains(&a.format.as_str()) {
            return Err(invalid(format!(
                "unsupported artifact format {:?}",
                a.format
            )));
        }
        if a.primary_blob_size_bytes < 0 {
            return Err(invalid("primary blob size must be non-negative"));
        }
        if !validate::non_blank(&a.primary_media_type) {
            return Err(invalid("primary media type is required"));
        }
        check_incus_requirements(&a.format, &a.incus_requirements)?;
        begin_write_scope(self, |txn| {
            let (_, mut v) = image_version(txn, name, version)?;
            require_draft(&v)?;
            for other in txn.artifacts_of(v.id)? {
                if (
                    &other.variant,
                    &other.operating_system,
                    &other.architecture,
                    &other.format,
                ) == (&variant, &a.operating_system, &a.architecture, &a.format)
                {
                    return Err(Error::conflict(format!(
                        "catalog conflict: version {version:?} of image {name:?} already has artifact {} with variant {variant:?}, operating system {:?}, architecture {:?} and format {:?}",
                        other.id, a.operating_system, a.architecture, a.format
                    )));
                }
            }
            let now = Timestamp::now();
            let artifact = Artifact {
                id: Uuid::new_v4(),
                version_id: v.id,
                variant: variant.clone(),
                operating_system: a.operating_system.clone(),
                architecture: a.architecture.clone(),
                format: a.format.clone(),
                primary_blob_digest: digest,
                primary_blob_size_bytes: a.primary_blob_size_bytes,
                primary_media_type: a.primary_media_type.clone(),
                incus_requirements: a.incus_requirements.clone(),
                created_at: now,
                updated_at: now,
            };
            save(
                &mut txn.open_table(ARTIFACTS)?,
                artifact.id.as_u128(),
                &artifact,
            )?;
            txn.open_table(VERSION_ARTIFACTS)?
                .insert((v.id.as_u128(), artifact.id.as_u128()), ())?;
            blobs::add_ref(txn, &digest)?;
            touch_version(txn, &mut v)?;
            Ok(artifact)
        })
    }

    /// Finds an artifact that belongs to `name`/`version`.
    fn artifact_in(
        r: &impl CatalogRead,
        name: &str,
        version: &str,
        artifact_id: Uuid,
    ) -> Result<(Image, ImageVersion, Artifact)> {
        let (image, v) = image_version(r, name, version)?;
        let artifact = r.version_artifact(v.id, artifact_id)?;
        Ok((image, v, artifact))
    }

    pub fn delete_artifact(&self, name: &str, version: &str, artifact_id: Uuid) -> Result<()> {
        check_image_name(name)?;
        check_version(version)?;
        super::freeing_write_scope(self, "delete a draft artifact", |txn| {
            let (_, mut v, artifact) = Self::artifact_in(txn, name, version, artifact_id)?;
            require_draft(&v)?;
            for att in txn.attachments_of(artifact.id)? {
                remove_attachment(txn, &att)?;
            }
            txn.open_table(ARTIFACTS)?.remove(artifact.id.as_u128())?;
            txn.open_table(VERSION_ARTIFACTS)?
                .remove((v.id.as_u128(), artifact.id.as_u128()))?;
            blobs::drop_ref(txn, &artifact.primary_blob_digest)?;
            touch_version(txn, &mut v)
        })
    }

    pub fn add_attachment(
        &self,
        name: &str,
        version: &str,
        artifact_id: Uuid,
        a: NewAttachment,
    ) -> Result<Attachment> {
        let digest = check_digest(&a.blob_digest)?;
        check_image_name(name)?;
        check_version(version)?;
        check_token("attachment name", &a.name)?;
        if !validate::non_blank(&a.media_type) {
            return Err(invalid("media type is required"));
        }
        if a.blob_size_bytes < 0 {
            return Err(invalid("blob size must be non-negative"));
        }
        begin_write_scope(self, |txn| {
            let (_, mut v, artifact) = Self::artifact_in(txn, name, version, artifact_id)?;
            require_draft(&v)?;
            if txn
                .attachments_of(artifact.id)?
                .iter()
                .any(|x| x.name == a.name)
            {
                return Err(Error::conflict(format!(
                    "catalog conflict: artifact {} already has an attachment named {:?}",
                    artifact.id, a.name
                )));
            }
            let now = Timestamp::now();
            let att = Attachment {
                id: Uuid::new_v4(),
                artifact_id: artifact.id,
                name: a.name.clone(),
                media_type: a.media_type.clone(),
                blob_digest: digest,
                blob_size_bytes: a.blob_size_bytes,
                created_at: now,
                updated_at: now,
            };
            save(&mut txn.open_table(ATTACHMENTS)?, att.id.as_u128(), &att)?;
            txn.open_table(ARTIFACT_ATTACHMENTS)?
                .insert((artifact.id.as_u128(), att.id.as_u128()), ())?;
            blobs::add_ref(txn, &digest)?;
            touch_version(txn, &mut v)?;
            Ok(att)
        })
    }

    pub fn delete_attachment(
        &self,
        name: &str,
        version: &str,
        artifact_id: Uuid,
        attachment_id: Uuid,
    ) -> Result<()> {
        check_image_name(name)?;
        check_version(version)?;
        super::freeing_write_scope(self, "delete a draft attachment", |txn| {
            let (_, mut v, artifact) = Self::artifact_in(txn, name, version, artifact_id)?;
            let att = txn.artifact_attachment(artifact.id, attachment_id)?;
            require_draft(&v)?;
            remove_attachment(txn, &att)?;
            touch_version(txn, &mut v)
        })
    }

    /// The artifacts of a published version (ordered like the manifest).
    pub fn published_artifacts(&self, name: &str, version: &str) -> Result<Vec<Artifact>> {
        Ok(self
            .manifest(name, version, true)?
            .artifacts
            .into_iter()
            .map(|a| a.artifact)
            .collect())
    }

    /// An artifact of a published version, with its attachments.
    pub fn published_artifact(
        &self,
        name: &str,
        version: &str,
        artifact_id: Uuid,
    ) -> Result<(ImageVersion, Artifact)> {
        check_image_name(name)?;
        check_version(version)?;
        let txn = self.begin_read()?;
        let (_, v, artifact) = Self::artifact_in(&txn, name, version, artifact_id)?;
        if v.state != VersionState::Published {
            return Err(version_not_found(name, version));
        }
        Ok((v, artifact))
    }

    /// An attachment of an artifact of a published version.
    pub fn published_attachment(
        &self,
        name: &str,
        version: &str,
        artifact_id: Uuid,
        attachment_id: Uuid,
    ) -> Result<Attachment> {
        check_image_name(name)?;
        check_version(version)?;
        let txn = self.begin_read()?;
        let (_, v, artifact) = Self::artifact_in(&txn, name, version, artifact_id)?;
        if v.state != VersionState::Published {
            return Err(version_not_found(name, version));
        }
        txn.artifact_attachment(artifact.id, attachment_id)
    }
}

fn remove_attachment(txn: &WriteTransaction, att: &Attachment) -> Result<()> {
    txn.open_table(ATTACHMENTS)?.remove(att.id.as_u128())?;
    txn.open_table(ARTIFACT_ATTACHMENTS)?
        .remove((att.artifact_id.as_u128(), att.id.as_u128()))?;
    blobs::drop_ref(txn, &att.blob_digest)
}
