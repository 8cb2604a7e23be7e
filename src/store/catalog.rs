//! Images, versions, artifacts, attachments and aliases.
//!
//! Every mutation runs in one durable write transaction and validates in the order API.md
//! section 4 gives, so a rejected request leaves the data unchanged. Catalog rows count their
//! blob references in `BLOB_REFS`, which is what garbage collection consults.

use super::blobs;
use super::tables::*;
use super::{Store, begin_write_scope, bump_generation, decode, encode, load, save};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::model::*;
use crate::validate;
use redb::{ReadTransaction, ReadableTable, WriteTransaction};
use uuid::Uuid;

fn invalid(msg: String) -> Error {
    Error::invalid(format!("catalog invalid input: {msg}"))
}

pub fn check_image_name(name: &str) -> Result<()> {
    if validate::image_name(name) {
        Ok(())
    } else {
        Err(invalid(format!(
            "image name must match {}",
            validate::IMAGE_NAME_PATTERN
        )))
    }
}

pub fn check_version(version: &str) -> Result<()> {
    if validate::version(version) {
        Ok(())
    } else {
        Err(invalid(format!(
            "version must match {}",
            validate::VERSION_PATTERN
        )))
    }
}

pub fn check_alias(alias: &str) -> Result<()> {
    if validate::alias(alias) {
        Ok(())
    } else {
        Err(invalid(format!(
            "alias must match {}",
            validate::ALIAS_PATTERN
        )))
    }
}

fn check_token(what: &str, value: &str) -> Result<()> {
    if validate::token(value) {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} must match {}",
            validate::TOKEN_PATTERN
        )))
    }
}

fn check_optional_text(what: &str, value: &Option<String>) -> Result<()> {
    match value {
        Some(v) if !validate::non_blank(v) => Err(invalid(format!("{what} must not be blank"))),
        _ => Ok(()),
    }
}

fn image_not_found(name: &str) -> Error {
    Error::not_found(format!("catalog not found: image {name:?}"))
}

fn version_not_found(name: &str, version: &str) -> Error {
    Error::not_found(format!(
        "catalog not found: image {name:?} version {version:?}"
    ))
}

/// Read access shared by read and write transactions.
pub(crate) trait CatalogRead {
    fn image_by_name(&self, name: &str) -> Result<Option<Image>>;
    fn version_of(&self, image: &Image, version: &str) -> Result<Option<ImageVersion>>;
    fn versions_of(&self, image: &Image) -> Result<Vec<ImageVersion>>;
    /// Whether any version of `image` satisfies `pred`, reading versions until one does.
    fn any_version(&self, image: &Image, pred: &dyn Fn(&ImageVersion) -> bool) -> Result<bool>;
    fn artifacts_of(&self, version_id: Uuid) -> Result<Vec<Artifact>>;
    fn attachments_of(&self, artifact_id: Uuid) -> Result<Vec<Attachment>>;
    fn artifact(&self, id: Uuid) -> Result<Option<Artifact>>;
    fn attachment(&self, id: Uuid) -> Result<Option<Attachment>>;
    fn version_by_id(&self, id: Uuid) -> Result<Option<ImageVersion>>;
    fn aliases_of(&self, image_id: Uuid) -> Result<Vec<Alias>>;
}

macro_rules! catalog_read_impl {
    ($t:ty) => {
        impl CatalogRead for $t {
            fn image_by_name(&self, name: &str) -> Result<Option<Image>> {
                let names = self.open_table(IMAGE_NAMES)?;
                let Some(id) = names.get(name)?.map(|v| v.value()) else {
                    return Ok(None);
                };
                load(&self.open_table(IMAGES)?, id, "image")
            }

            fn version_of(&self, image: &Image, version: &str) -> Result<Option<ImageVersion>> {
                let keys = self.open_table(VERSION_KEYS)?;
                let Some(id) = keys.get((image.id.as_u128(), version))?.map(|v| v.value()) else {
                    return Ok(None);
                };
                load(&self.open_table(VERSIONS)?, id, "version")
            }

            fn versions_of(&self, image: &Image) -> Result<Vec<ImageVersion>> {
                let keys = self.open_table(VERSION_KEYS)?;
                let versions = self.open_table(VERSIONS)?;
                let id = image.id.as_u128();
                let mut out = Vec::new();
                for row in keys.range((id, "")..(id + 1, ""))? {
                    let (_, v) = row?;
                    if let Some(ver) = load(&versions, v.value(), "version")? {
                        out.push(ver);
                    }
                }
                Ok(out)
            }

            fn any_version(
                &self,
                image: &Image,
                pred: &dyn Fn(&ImageVersion) -> bool,
            ) -> Result<bool> {
                let keys = self.open_table(VERSION_KEYS)?;
                let versions = self.open_table(VERSIONS)?;
                let id = image.id.as_u128();
                for row in keys.range((id, "")..(id + 1, ""))? {
                    let (_, v) = row?;
                    if let Some(ver) = load::<ImageVersion>(&versions, v.value(), "version")?
                        && pred(&ver)
                    {
                        return Ok(true);
                    }
                }
                Ok(false)
            }

            fn artifacts_of(&self, version_id: Uuid) -> Result<Vec<Artifact>> {
                let idx = self.open_table(VERSION_ARTIFACTS)?;
                let arts = self.open_table(ARTIFACTS)?;
                let v = version_id.as_u128();
                let mut out = Vec::new();
                for row in idx.range((v, 0u128)..=(v, u128::MAX))? {
                    let (k, _) = row?;
                    if let Some(a) = load(&arts, k.value().1, "artifact")? {
                        out.push(a);
                    }
                }
                Ok(out)
            }

            fn attachments_of(&self, artifact_id: Uuid) -> Result<Vec<Attachment>> {
                let idx = self.open_table(ARTIFACT_ATTACHMENTS)?;
                let atts = self.open_table(ATTACHMENTS)?;
                let a = artifact_id.as_u128();
                let mut out = Vec::new();
                for row in idx.range((a, 0u128)..=(a, u128::MAX))? {
                    let (k, _) = row?;
                    if let Some(x) = load(&atts, k.value().1, "attachment")? {
                        out.push(x);
                    }
                }
                Ok(out)
            }

            fn artifact(&self, id: Uuid) -> Result<Option<Artifact>> {
                load(&self.open_table(ARTIFACTS)?, id.as_u128(), "artifact")
            }

            fn attachment(&self, id: Uuid) -> Result<Option<Attachment>> {
                load(&self.open_table(ATTACHMENTS)?, id.as_u128(), "attachment")
            }

            fn version_by_id(&self, id: Uuid) -> Result<Option<ImageVersion>> {
                load(&self.open_table(VERSIONS)?, id.as_u128(), "version")
            }

            fn aliases_of(&self, image_id: Uuid) -> Result<Vec<Alias>> {
                let t = self.open_table(ALIASES)?;
                let id = image_id.as_u128();
                let mut out = Vec::new();
                for row in t.range((id, "")..(id + 1, ""))? {
                    let (_, v) = row?;
                    out.push(decode(v.value(), "alias")?);
                }
                Ok(out)
            }
        }
    };
}
catalog_read_impl!(ReadTransaction);
catalog_read_impl!(WriteTransaction);

/// Whether an image has a published version. Stops at the first one instead of decoding every
/// version: `GET /v1/images` asks this of every image, and with 100 versions an image that
/// cost 100 record reads where one usually suffices.
fn has_published(r: &impl CatalogRead, image: &Image) -> Result<bool> {
    r.any_version(image, &|v| v.state == VersionState::Published)
}

fn sort_artifacts(list: &mut [Artifact]) {
    list.sort_by(|a, b| {
        (
            &a.variant,
            &a.operating_system,
            &a.architecture,
            &a.format,
            a.id,
        )
            .cmp(&(
                &b.variant,
                &b.operating_system,
                &b.architecture,
                &b.format,
                b.id,
            ))
    });
}

pub(crate) fn manifest_in(
    r: &impl CatalogRead,
    image: Image,
    version: ImageVersion,
) -> Result<Manifest> {
    let mut arts = r.artifacts_of(version.id)?;
    sort_artifacts(&mut arts);
    let mut artifacts = Vec::with_capacity(arts.len());
    for artifact in arts {
        let mut attachments = r.attachments_of(artifact.id)?;
        attachments.sort_by(|a, b| (&a.name, a.id).cmp(&(&b.name, b.id)));
        artifacts.push(ArtifactWithAttachments {
            artifact,
            attachments,
        });
    }
    Ok(Manifest {
        image,
        version,
        artifacts,
    })
}

/// Finds image and version, failing with 404s.
fn image_version(r: &impl CatalogRead, name: &str, version: &str) -> Result<(Image, ImageVersion)> {
    let image = r
        .image_by_name(name)?
        .ok_or_else(|| image_not_found(name))?;
    let v = r
        .version_of(&image, version)?
        .ok_or_else(|| version_not_found(name, version))?;
    Ok((image, v))
}

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

/// What a caller asks for when adding an artifact.
pub struct NewArtifact {
    pub variant: String,
    pub operating_system: String,
    pub architecture: String,
    pub format: String,
    pub primary_blob_digest: String,
    pub primary_blob_size_bytes: i64,
    pub primary_media_type: String,
    pub incus_requirements: std::collections::BTreeMap<String, String>,
}

/// What a caller asks for when adding an attachment.
pub struct NewAttachment {
    pub name: String,
    pub media_type: String,
    pub blob_digest: String,
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

fn digest_key(d: &str) -> Result<[u8; 32]> {
    validate::digest_bytes(d)
        .ok_or_else(|| invalid("digest must match sha256:<64 lowercase hex chars>".to_string()))
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
                return Err(Error::conflict("catalog conflict: images_name_key"));
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
        let image = txn
            .image_by_name(name)?
            .ok_or_else(|| image_not_found(name))?;
        if !has_published(&txn, &image)? {
            return Err(image_not_found(name));
        }
        Ok(image)
    }

    pub fn create_version(&self, name: &str, version: &str) -> Result<ImageVersion> {
        check_image_name(name)?;
        check_version(version)?;
        begin_write_scope(self, |txn| {
            let image = txn
                .image_by_name(name)?
                .ok_or_else(|| image_not_found(name))?;
            if txn.version_of(&image, version)?.is_some() {
                return Err(Error::conflict(
                    "catalog conflict: image_versions_image_id_version_key",
                ));
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
        let image = txn
            .image_by_name(name)?
            .ok_or_else(|| image_not_found(name))?;
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
        let image = txn
            .image_by_name(name)?
            .ok_or_else(|| image_not_found(name))?;
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
        let digest = digest_key(&a.primary_blob_digest)?;
        if a.primary_blob_size_bytes < 0 {
            return Err(invalid("primary blob size must be non-negative".into()));
        }
        if !validate::non_blank(&a.primary_media_type) {
            return Err(invalid("primary media type is required".into()));
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
                    return Err(Error::conflict(
                        "catalog conflict: release_artifacts_identity_key",
                    ));
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
                primary_blob_digest: a.primary_blob_digest.clone(),
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
            blobs::change_refs(txn, &digest, 1)?;
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
        let artifact = r
            .artifact(artifact_id)?
            .filter(|a| a.version_id == v.id)
            .ok_or_else(|| {
                Error::not_found(format!("catalog not found: artifact {artifact_id}"))
            })?;
        Ok((image, v, artifact))
    }

    pub fn delete_artifact(&self, name: &str, version: &str, artifact_id: Uuid) -> Result<()> {
        check_image_name(name)?;
        check_version(version)?;
        begin_write_scope(self, |txn| {
            let (_, mut v, artifact) = Self::artifact_in(txn, name, version, artifact_id)?;
            require_draft(&v)?;
            for att in txn.attachments_of(artifact.id)? {
                remove_attachment(txn, &att)?;
            }
            txn.open_table(ARTIFACTS)?.remove(artifact.id.as_u128())?;
            txn.open_table(VERSION_ARTIFACTS)?
                .remove((v.id.as_u128(), artifact.id.as_u128()))?;
            blobs::change_refs(txn, &digest_key(&artifact.primary_blob_digest)?, -1)?;
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
        check_image_name(name)?;
        check_version(version)?;
        check_token("attachment name", &a.name)?;
        if !validate::non_blank(&a.media_type) {
            return Err(invalid("media type is required".into()));
        }
        let digest = digest_key(&a.blob_digest)?;
        if a.blob_size_bytes < 0 {
            return Err(invalid("blob size must be non-negative".into()));
        }
        begin_write_scope(self, |txn| {
            let (_, mut v, artifact) = Self::artifact_in(txn, name, version, artifact_id)?;
            require_draft(&v)?;
            if txn
                .attachments_of(artifact.id)?
                .iter()
                .any(|x| x.name == a.name)
            {
                return Err(Error::conflict(
                    "catalog conflict: artifact_attachments_artifact_id_name_key",
                ));
            }
            let now = Timestamp::now();
            let att = Attachment {
                id: Uuid::new_v4(),
                artifact_id: artifact.id,
                name: a.name.clone(),
                media_type: a.media_type.clone(),
                blob_digest: a.blob_digest.clone(),
                blob_size_bytes: a.blob_size_bytes,
                created_at: now,
                updated_at: now,
            };
            save(&mut txn.open_table(ATTACHMENTS)?, att.id.as_u128(), &att)?;
            txn.open_table(ARTIFACT_ATTACHMENTS)?
                .insert((artifact.id.as_u128(), att.id.as_u128()), ())?;
            blobs::change_refs(txn, &digest, 1)?;
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
        begin_write_scope(self, |txn| {
            let (_, mut v, artifact) = Self::artifact_in(txn, name, version, artifact_id)?;
            let att = txn
                .attachment(attachment_id)?
                .filter(|x| x.artifact_id == artifact.id)
                .ok_or_else(|| {
                    Error::not_found(format!("catalog not found: attachment {attachment_id}"))
                })?;
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
        txn.attachment(attachment_id)?
            .filter(|x| x.artifact_id == artifact.id)
            .ok_or_else(|| {
                Error::not_found(format!("catalog not found: attachment {attachment_id}"))
            })
    }

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
        let image = txn
            .image_by_name(name)?
            .ok_or_else(|| image_not_found(name))?;
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
        let image = txn
            .image_by_name(name)?
            .ok_or_else(|| image_not_found(name))?;
        txn.aliases_of(image.id)
    }

    pub fn delete_alias(&self, name: &str, alias: &str) -> Result<()> {
        check_image_name(name)?;
        check_alias(alias)?;
        begin_write_scope(self, |txn| {
            let image = txn
                .image_by_name(name)?
                .ok_or_else(|| image_not_found(name))?;
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

fn remove_attachment(txn: &WriteTransaction, att: &Attachment) -> Result<()> {
    txn.open_table(ATTACHMENTS)?.remove(att.id.as_u128())?;
    txn.open_table(ARTIFACT_ATTACHMENTS)?
        .remove((att.artifact_id.as_u128(), att.id.as_u128()))?;
    blobs::change_refs(txn, &digest_key(&att.blob_digest)?, -1)
}
