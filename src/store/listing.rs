//! The public catalog in one read: every image with a published version, its published
//! versions with their artifacts and attachments, and its aliases, as of one catalog
//! generation. The catalog page is rendered from it, so a page never mixes two catalog states.

use super::read::{CatalogRead, manifest_in};
use super::tables::*;
use super::{Store, load};
use crate::error::Result;
use crate::model::{Alias, ArtifactWithAttachments, Image, ImageVersion, VersionState};
use redb::ReadableTable;

/// What consumers can see, as read at `generation`.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub generation: u64,
    /// Images with at least one published version, ordered by name.
    pub images: Vec<ListedImage>,
}

#[derive(Debug, Clone)]
pub struct ListedImage {
    pub image: Image,
    /// Published versions, newest publish first.
    pub versions: Vec<ListedVersion>,
    /// Aliases that point at a published version, ordered by name.
    pub aliases: Vec<Alias>,
}

#[derive(Debug, Clone)]
pub struct ListedVersion {
    pub version: ImageVersion,
    /// In manifest order (variant, operating system, architecture, format).
    pub artifacts: Vec<ArtifactWithAttachments>,
}

impl Store {
    /// Reads the public catalog in one read transaction.
    pub fn listing(&self) -> Result<Listing> {
        let txn = self.begin_read()?;
        let generation = txn
            .open_table(META)?
            .get("generation")?
            .map(|v| v.value())
            .unwrap_or(0);
        let names = txn.open_table(IMAGE_NAMES)?;
        let images = txn.open_table(IMAGES)?;
        let mut out = Vec::new();
        // IMAGE_NAMES is keyed by name, so images come out in name order.
        for row in names.iter()? {
            let (_, id) = row?;
            let Some(image) = load::<Image>(&images, id.value(), "image")? else {
                continue;
            };
            let mut versions = Vec::new();
            for v in txn.versions_of(&image)? {
                if v.state != VersionState::Published {
                    continue;
                }
                let m = manifest_in(&txn, image.clone(), v)?;
                versions.push(ListedVersion {
                    version: m.version,
                    artifacts: m.artifacts,
                });
            }
            if versions.is_empty() {
                continue;
            }
            versions.sort_by(|a, b| {
                (b.version.published_at, &b.version.version)
                    .cmp(&(a.version.published_at, &a.version.version))
            });
            let mut aliases: Vec<Alias> = txn
                .aliases_of(image.id)?
                .into_iter()
                .filter(|a| versions.iter().any(|v| v.version.id == a.version_id))
                .collect();
            aliases.sort_by(|a, b| a.alias.cmp(&b.alias));
            out.push(ListedImage {
                image,
                versions,
                aliases,
            });
        }
        Ok(Listing {
            generation,
            images: out,
        })
    }
}
