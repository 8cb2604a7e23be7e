//! Read access to the catalog, shared by read and write transactions: the lookups every
//! catalog operation starts from, and the manifest of a version.

use super::retention::RetentionPolicy;
use super::tables::*;
use super::{decode, load};
use crate::error::{Error, Result};
use crate::model::*;
use redb::{ReadTransaction, ReadableTable, WriteTransaction};
use serde::de::DeserializeOwned;
use uuid::Uuid;

pub(super) fn image_not_found(name: &str) -> Error {
    Error::not_found(format!("catalog not found: image {name:?}"))
}

pub(super) fn version_not_found(name: &str, version: &str) -> Error {
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
    fn retention_policy(&self, image_id: Uuid) -> Result<Option<RetentionPolicy>>;

    /// The image named `name`, or the 404 that names it.
    fn image_named(&self, name: &str) -> Result<Image> {
        self.image_by_name(name)?
            .ok_or_else(|| image_not_found(name))
    }

    /// An artifact of the version `version_id`; a 404 when there is none by that id or it
    /// belongs to another version.
    fn version_artifact(&self, version_id: Uuid, artifact_id: Uuid) -> Result<Artifact> {
        self.artifact(artifact_id)?
            .filter(|a| a.version_id == version_id)
            .ok_or_else(|| Error::not_found(format!("catalog not found: artifact {artifact_id}")))
    }

    /// An attachment of the artifact `artifact_id`; a 404 when there is none by that id or it
    /// belongs to another artifact.
    fn artifact_attachment(&self, artifact_id: Uuid, attachment_id: Uuid) -> Result<Attachment> {
        self.attachment(attachment_id)?
            .filter(|x| x.artifact_id == artifact_id)
            .ok_or_else(|| {
                Error::not_found(format!("catalog not found: attachment {attachment_id}"))
            })
    }
}

/// The records of `rows` that `index` (keyed by parent and child id) lists under `parent`, in
/// child id order; a listed child without a record is skipped.
fn children<T: DeserializeOwned>(
    index: &impl ReadableTable<(u128, u128), ()>,
    rows: &impl ReadableTable<u128, &'static [u8]>,
    parent: Uuid,
    what: &str,
) -> Result<Vec<T>> {
    let p = parent.as_u128();
    let mut out = Vec::new();
    for row in index.range((p, 0u128)..=(p, u128::MAX))? {
        let (k, _) = row?;
        if let Some(x) = load(rows, k.value().1, what)? {
            out.push(x);
        }
    }
    Ok(out)
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
                let tables = (
                    self.open_table(VERSION_ARTIFACTS)?,
                    self.open_table(ARTIFACTS)?,
                );
                children(&tables.0, &tables.1, version_id, "artifact")
            }

            fn attachments_of(&self, artifact_id: Uuid) -> Result<Vec<Attachment>> {
                let tables = (
                    self.open_table(ARTIFACT_ATTACHMENTS)?,
                    self.open_table(ATTACHMENTS)?,
                );
                children(&tables.0, &tables.1, artifact_id, "attachment")
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

            fn retention_policy(&self, image_id: Uuid) -> Result<Option<RetentionPolicy>> {
                let t = self.open_table(RETENTION)?;
                load(&t, image_id.as_u128(), "retention policy")
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
pub(super) fn has_published(r: &impl CatalogRead, image: &Image) -> Result<bool> {
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
pub(super) fn image_version(
    r: &impl CatalogRead,
    name: &str,
    version: &str,
) -> Result<(Image, ImageVersion)> {
    let image = r.image_named(name)?;
    let v = r
        .version_of(&image, version)?
        .ok_or_else(|| version_not_found(name, version))?;
    Ok((image, v))
}
