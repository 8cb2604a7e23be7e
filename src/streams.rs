//! The Incus Simple Streams projection: a pure function from a catalog snapshot to the two
//! documents, `streams/v1/index.json` and `streams/v1/images.json`.
//!
//! The rules, each forced by how the Incus client reads these documents:
//! - One product per (image, version, architecture, variant), keyed
//!   `<image>:<version>:<arch>:<variant>`, because Incus only gives aliases to the newest
//!   version of a product; one version per product keeps every version addressable.
//! - A product holds up to two images: a VM (`disk-kvm.img`, from a qcow2 artifact) and a
//!   container (`squashfs`, from a squashfs artifact), sharing one `incus.tar.xz` item that
//!   carries both fingerprints. Incus keys aliases by name, type and architecture, so one alias
//!   then gives the container by default and the VM with `--vm`.
//! - The version key is the publish time as `YYYYMMDD_HH:MM` (Incus drops keys that do not
//!   start with a date) and the version string is its `label`.
//! - Every fingerprint (`combined_disk-kvm-img_sha256`, `combined_squashfs_sha256`) appears
//!   once: Incus fails with "More than one match" otherwise. A later product with exactly the
//!   same images gets no product of its own; its alias strings are added to the earliest
//!   published product with those images. A later product that repeats only some of them
//!   keeps only its new images (with a warning).
//! - No alias string is claimed twice per architecture and image type, counting the
//!   `{alias}/{arch}` forms the client derives itself, because Incus then silently picks one.
//!   Version strings are claimed before alias names (as `refs/{ref}` prefers an exact
//!   version), and earlier published products before later ones.
//!
//! Output is pretty-printed JSON (2-space indent) with keys in byte order plus a trailing
//! newline. Keys are ordered by construction (structs whose fields are declared in
//! alphabetical order and `BTreeMap`s), so the bytes do not depend on serde_json features.

use crate::error::{Error, Result};
use crate::http::percent_encode_segment;
use crate::store::streams::{
    INCUS_ROOTFS_FORMAT, Snapshot, SnapshotArtifact, SnapshotImage, SnapshotVersion,
};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use uuid::Uuid;

/// The variant whose aliases carry no `/variant` suffix.
pub const DEFAULT_VARIANT: &str = "default";

/// One rendered document and its strong entity tag, with its gzip representation.
#[derive(Debug, Clone)]
pub struct Document {
    pub body: Vec<u8>,
    /// The quoted lowercase hex sha256 of `body`.
    pub etag: String,
    /// `body` compressed with gzip, served to clients that accept it (Incus's Go client does).
    /// At 10,000 versions images.json is 11.7 MB and its gzip 1.9 MB: compressing once per
    /// catalog generation cut a cached answer from 19 ms to 2.4-3 ms in `scripts/bench`.
    pub gzip: Vec<u8>,
    /// The gzip representation's strong tag: the identity tag with `-gzip` inside the quotes
    /// (a strong validator must differ between representations).
    pub gzip_etag: String,
}

impl Document {
    fn new(body: Vec<u8>) -> Document {
        let hex = crate::digest::hex(&Sha256::digest(&body));
        let gzip = gzip(&body, flate2::Compression::default());
        Document {
            body,
            etag: format!("\"{hex}\""),
            gzip,
            gzip_etag: format!("\"{hex}-gzip\""),
        }
    }
}

/// Compresses a whole document, with zlib-rs (flate2's default backend, miniz_oxide, took
/// twice as long for a larger result). On the 10,000-version catalog of `scripts/bench`,
/// images.json (11.7 MB) took 65 ms at the default level for 1.91 MB, against 136 ms for 2.06
/// MB, and a render of the Simple Streams documents went from 0.48-0.54 s to 0.37-0.41 s. The
/// catalog page (13.9 MB) at level 2 took 32 ms for 1.79 MB; zlib-rs's level 1 is a quicker
/// scheme that gave 2.66 MB for 21 ms.
pub(crate) fn gzip(body: &[u8], level: flate2::Compression) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 6), level);
    // Writing to a Vec cannot fail.
    enc.write_all(body).expect("gzip into memory");
    enc.finish().expect("gzip into memory")
}

/// The bytes [`gzip`] compressed.
pub(crate) fn gunzip(compressed: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(compressed.len() * 8);
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(compressed), &mut out)?;
    Ok(out)
}

/// Both documents as of one catalog generation.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub generation: u64,
    pub index: Document,
    pub images: Document,
    /// What was left out and why, for the caller to log once per render.
    pub warnings: Vec<String>,
}

/// The Incus name for an architecture, or `None` when Incus does not know it (Incus drops
/// such products silently, so they are left out).
///
/// Every name Incus accepts (`shared/osarch`: kernel names and their aliases) maps to one
/// canonical name per Incus architecture, so that "per architecture" is well defined: an
/// `x86_64` and an `amd64` artifact of the same version and variant are the same product, and
/// the `{alias}/{arch}` forms the client derives are the same for both. The canonical name is
/// the Debian one that images.linuxcontainers.org uses where one exists (`amd64`, `arm64`,
/// `armhf`, `ppc64el`, `loong64`, ...), else Incus's own kernel name.
pub fn incus_arch(name: &str) -> Option<&'static str> {
    Some(match name {
        "x86_64" | "amd64" | "generic_64" => "amd64",
        "i686" | "i386" | "i586" | "386" | "x86" | "generic_32" => "i386",
        "aarch64" | "arm64" | "arm64_generic" => "arm64",
        "armv7l" | "armhf" | "armhfp" | "armv7" | "armv7a_hardfp" | "armv7a_vfpv3_hardfp" => {
            "armhf"
        }
        "armv6l" | "armel" | "arm" => "armel",
        "armv8l" => "armv8l",
        "ppc" | "powerpc" => "powerpc",
        "ppc64" | "powerpc64" => "ppc64",
        "ppc64le" | "ppc64el" => "ppc64el",
        "s390x" => "s390x",
        "mips" | "mipsel" | "mipsle" => "mips",
        "mips64" | "mips64el" | "mips64le" => "mips64",
        "riscv32" => "riscv32",
        "riscv64" => "riscv64",
        "loongarch64" | "loong64" => "loong64",
        _ => return None,
    })
}

// The wire shapes. Fields are declared in byte order of their JSON names, which is the order
// serde writes them in.

#[derive(Serialize)]
struct IndexDoc {
    format: &'static str,
    index: IndexEntries,
}

#[derive(Serialize)]
struct IndexEntries {
    images: IndexEntry,
}

#[derive(Serialize)]
struct IndexEntry {
    datatype: &'static str,
    format: &'static str,
    path: &'static str,
    /// Omitted when empty: the contract says so, and Incus skips an entry without products.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    products: Vec<String>,
}

#[derive(Serialize)]
struct ImagesDoc {
    content_id: &'static str,
    datatype: &'static str,
    format: &'static str,
    products: BTreeMap<String, Product>,
}

#[derive(Serialize)]
struct Product {
    aliases: String,
    arch: &'static str,
    os: String,
    release: String,
    release_title: String,
    requirements: BTreeMap<String, String>,
    variant: String,
    versions: BTreeMap<String, ProductVersion>,
}

#[derive(Serialize)]
struct ProductVersion {
    items: BTreeMap<&'static str, Item>,
    label: String,
}

#[derive(Serialize)]
struct Item {
    #[serde(
        rename = "combined_disk-kvm-img_sha256",
        skip_serializing_if = "Option::is_none"
    )]
    combined_vm: Option<String>,
    #[serde(
        rename = "combined_squashfs_sha256",
        skip_serializing_if = "Option::is_none"
    )]
    combined_container: Option<String>,
    ftype: &'static str,
    path: String,
    sha256: String,
    size: i64,
}

/// The Incus image type an artifact becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum ImageType {
    Container,
    Vm,
}

impl ImageType {
    fn of(artifact: &SnapshotArtifact) -> ImageType {
        if artifact.format == INCUS_ROOTFS_FORMAT {
            ImageType::Container
        } else {
            ImageType::Vm
        }
    }

    fn name(self) -> &'static str {
        match self {
            ImageType::Container => "container",
            ImageType::Vm => "virtual-machine",
        }
    }
}

/// An eligible artifact with a known architecture, in the order products are decided.
struct Candidate<'a> {
    image: &'a SnapshotImage,
    version: &'a SnapshotVersion,
    artifact: &'a SnapshotArtifact,
    arch: &'static str,
}

impl Candidate<'_> {
    /// The alias strings for a version or alias name on this candidate's variant.
    fn alias_string(&self, name: &str) -> String {
        if self.artifact.variant == DEFAULT_VARIANT {
            format!("{}/{name}", self.image.name)
        } else {
            format!("{}/{name}/{}", self.image.name, self.artifact.variant)
        }
    }

    fn key(&self) -> String {
        format!(
            "{}:{}:{}:{}",
            self.image.name, self.version.version, self.arch, self.artifact.variant
        )
    }

    fn image_type(&self) -> ImageType {
        ImageType::of(self.artifact)
    }
}

/// A product being assembled: its images (at most one per type, the first decides the
/// product's own fields) plus the alias strings it will try to claim.
struct Draft<'a> {
    key: String,
    members: Vec<Candidate<'a>>,
    /// Strings built from version names: this product's own first, then merged versions'.
    version_strings: Vec<String>,
    /// Strings built from alias names, this product's and merged versions'.
    alias_strings: Vec<String>,
    accepted: Vec<String>,
}

impl Draft<'_> {
    fn lead(&self) -> &Candidate<'_> {
        &self.members[0]
    }

    fn fingerprints(&self) -> BTreeSet<&str> {
        self.members
            .iter()
            .map(|c| c.artifact.combined_sha256.as_str())
            .collect()
    }
}

/// Renders both documents from a snapshot.
pub fn render(snapshot: &Snapshot) -> Result<Rendered> {
    let mut warnings = Vec::new();
    let candidates = candidates(snapshot, &mut warnings);
    let aliases_by_version = aliases_by_version(snapshot);
    let alias_names = |version: Uuid| -> &[String] {
        aliases_by_version.get(&version).map_or(&[], Vec::as_slice)
    };

    // Gather each product's images: a VM and a container of one version, architecture and
    // variant share a product.
    let mut groups: Vec<Vec<Candidate>> = Vec::new();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    let mut duplicates = Vec::new();
    for c in candidates {
        let key = c.key();
        let Some(&i) = by_key.get(&key) else {
            by_key.insert(key, groups.len());
            groups.push(vec![c]);
            continue;
        };
        let group = &mut groups[i];
        if group.iter().any(|m| m.image_type() == c.image_type()) {
            // Two artifacts of one version and variant whose architectures are the same to
            // Incus (`x86_64` and `amd64`), or that differ only by operating system. Published
            // versions never change, so failing the whole document would break it for good;
            // the earlier artifact keeps the product instead.
            duplicates.push(format!("{key} (artifact {})", c.artifact.artifact_id));
        } else if group[0].artifact.attachment_sha256 != c.artifact.attachment_sha256 {
            // Publishing refuses this (one metadata item per product version); a catalog
            // written before that rule existed still renders, without the second image.
            duplicates.push(format!(
                "{key} (artifact {}: its incus.tar.xz differs from the product's)",
                c.artifact.artifact_id
            ));
        } else {
            group.push(c);
        }
    }
    if !duplicates.is_empty() {
        warnings.push(format!(
            "simple streams: left out artifacts whose product key is already taken: {}",
            duplicates.join(", ")
        ));
    }

    // Decide the products: the first product with a fingerprint owns it. A later product with
    // exactly the same images only lends its alias strings; one that repeats some of them
    // keeps the rest.
    let mut drafts: Vec<Draft> = Vec::new();
    let mut by_fingerprint: HashMap<&str, usize> = HashMap::new();
    let mut repeated = Vec::new();
    for mut members in groups {
        let lead = &members[0];
        let own_version = lead.alias_string(&lead.version.version);
        let own_aliases: Vec<String> = alias_names(lead.version.id)
            .iter()
            .map(|a| lead.alias_string(a))
            .collect();
        let key = lead.key();
        let fingerprints: BTreeSet<&str> = members
            .iter()
            .map(|c| c.artifact.combined_sha256.as_str())
            .collect();
        let owners: BTreeSet<usize> = fingerprints
            .iter()
            .filter_map(|f| by_fingerprint.get(f).copied())
            .collect();
        if owners.len() == 1 {
            let i = *owners.iter().next().unwrap();
            if drafts[i].fingerprints() == fingerprints {
                drafts[i].version_strings.push(own_version);
                drafts[i].alias_strings.extend(own_aliases);
                continue;
            }
        }
        if !owners.is_empty() {
            members.retain(|c| {
                let seen = by_fingerprint.contains_key(c.artifact.combined_sha256.as_str());
                if seen {
                    repeated.push(format!("{key} ({})", c.image_type().name()));
                }
                !seen
            });
            if members.is_empty() {
                continue;
            }
        }
        for c in &members {
            by_fingerprint.insert(c.artifact.combined_sha256.as_str(), drafts.len());
        }
        drafts.push(Draft {
            key,
            members,
            version_strings: vec![own_version],
            alias_strings: own_aliases,
            accepted: Vec::new(),
        });
    }
    if !repeated.is_empty() {
        warnings.push(format!(
            "simple streams: left out images already listed under an earlier product with \
             other images: {}",
            repeated.join(", ")
        ));
    }

    // Claim alias strings per architecture and image type: every version string before any
    // alias name, and within each pass in product order (earliest published first).
    let mut claimed: HashSet<(&'static str, ImageType, String)> = HashSet::new();
    let mut dropped = Vec::new();
    for pass in 0..2 {
        for d in drafts.iter_mut() {
            let arch = d.lead().arch;
            let types: Vec<ImageType> = d.members.iter().map(Candidate::image_type).collect();
            let strings = if pass == 0 {
                std::mem::take(&mut d.version_strings)
            } else {
                std::mem::take(&mut d.alias_strings)
            };
            for s in strings {
                if d.accepted.contains(&s) {
                    continue;
                }
                let derived = format!("{s}/{arch}");
                if types.iter().any(|&t| {
                    claimed.contains(&(arch, t, s.clone()))
                        || claimed.contains(&(arch, t, derived.clone()))
                }) {
                    dropped.push(format!("{s} ({arch})"));
                    continue;
                }
                for &t in &types {
                    claimed.insert((arch, t, s.clone()));
                    claimed.insert((arch, t, derived.clone()));
                }
                d.accepted.push(s);
            }
        }
    }
    if !dropped.is_empty() {
        warnings.push(format!(
            "simple streams: left out aliases already claimed by another product: {}",
            dropped.join(", ")
        ));
    }

    let mut products = BTreeMap::new();
    for d in drafts {
        products.insert(d.key.clone(), product(d));
    }
    let index = IndexDoc {
        format: "index:1.0",
        index: IndexEntries {
            images: IndexEntry {
                datatype: "image-downloads",
                format: "products:1.0",
                path: "streams/v1/images.json",
                products: products.keys().cloned().collect(),
            },
        },
    };
    let images = ImagesDoc {
        content_id: "images",
        datatype: "image-downloads",
        format: "products:1.0",
        products,
    };
    Ok(Rendered {
        generation: snapshot.generation,
        index: Document::new(pretty(&index)?),
        images: Document::new(pretty(&images)?),
        warnings,
    })
}

/// The eligible artifacts Incus can use, ordered by publish time (then image, version,
/// architecture, variant and the rest, so the order is total and rendering deterministic).
fn candidates<'a>(snapshot: &'a Snapshot, warnings: &mut Vec<String>) -> Vec<Candidate<'a>> {
    let mut unknown = BTreeSet::new();
    let mut out = Vec::new();
    for image in &snapshot.images {
        for version in &image.versions {
            for artifact in &version.artifacts {
                match incus_arch(&artifact.architecture) {
                    Some(arch) => out.push(Candidate {
                        image,
                        version,
                        artifact,
                        arch,
                    }),
                    None => {
                        unknown.insert(artifact.architecture.as_str());
                    }
                }
            }
        }
    }
    if !unknown.is_empty() {
        warnings.push(format!(
            "simple streams: left out artifacts with architectures Incus does not know: {}",
            unknown.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    out.sort_by(|a, b| {
        let key = |c: &Candidate<'a>| {
            (
                c.version.published_at,
                c.image.name.as_str(),
                c.version.version.as_str(),
                c.version.id,
                c.arch,
                c.artifact.variant != DEFAULT_VARIANT,
                c.artifact.variant.as_str(),
                c.artifact.operating_system.as_str(),
                c.artifact.architecture.as_str(),
                c.artifact.artifact_id,
            )
        };
        key(a).cmp(&key(b))
    });
    out
}

/// Alias names per target version id, sorted.
fn aliases_by_version(snapshot: &Snapshot) -> HashMap<Uuid, Vec<String>> {
    let mut out: HashMap<Uuid, Vec<String>> = HashMap::new();
    for image in &snapshot.images {
        for alias in &image.aliases {
            // An alias can only target a version of its own image; anything else is ignored
            // rather than rendered under the wrong image name.
            if image.versions.iter().any(|v| v.id == alias.version_id) {
                out.entry(alias.version_id)
                    .or_default()
                    .push(alias.name.clone());
            }
        }
    }
    for names in out.values_mut() {
        names.sort();
        names.dedup();
    }
    out
}

fn product(d: Draft) -> Product {
    let Draft {
        members,
        mut accepted,
        ..
    } = d;
    let c = &members[0];
    let own = c.alias_string(&c.version.version);
    // The product's own version string leads; the rest follow in byte order.
    let lead = accepted
        .iter()
        .position(|s| *s == own)
        .map(|i| accepted.remove(i));
    accepted.sort();
    let aliases: Vec<String> = lead.into_iter().chain(accepted).collect();

    let image = percent_encode_segment(&c.image.name);
    let version = percent_encode_segment(&c.version.version);
    let base_of = |a: &SnapshotArtifact| {
        format!(
            "v1/images/{image}/versions/{version}/artifacts/{}",
            a.artifact_id
        )
    };
    let vm = members.iter().find(|m| m.image_type() == ImageType::Vm);
    let container = members
        .iter()
        .find(|m| m.image_type() == ImageType::Container);
    let mut items = BTreeMap::new();
    // One metadata item serves both images (their `incus.tar.xz` bytes are the same); it is
    // served from the VM artifact's attachment when there is one, so adding a container to a
    // VM image keeps the paths a VM-only product always had.
    let meta = vm.unwrap_or(c).artifact;
    items.insert(
        "incus.tar.xz",
        Item {
            combined_vm: vm.map(|m| m.artifact.combined_sha256.clone()),
            combined_container: container.map(|m| m.artifact.combined_sha256.clone()),
            ftype: "incus.tar.xz",
            path: format!(
                "{}/attachments/{}/download/{}",
                base_of(meta),
                meta.attachment_id,
                percent_encode_segment(&meta.attachment_name)
            ),
            sha256: meta.attachment_sha256.clone(),
            size: meta.attachment_size,
        },
    );
    for m in &members {
        let a = m.artifact;
        let (name, ftype) = match m.image_type() {
            ImageType::Vm => ("disk-kvm.img", "disk-kvm.img"),
            ImageType::Container => ("root.squashfs", "squashfs"),
        };
        items.insert(
            name,
            Item {
                combined_vm: None,
                combined_container: None,
                ftype,
                path: format!(
                    "{}/download/{}",
                    base_of(a),
                    percent_encode_segment(&crate::validate::artifact_file_name(&a.format))
                ),
                sha256: a.disk_sha256.clone(),
                size: a.disk_size,
            },
        );
    }
    // Incus reads requirements per product, so they apply to both images of a unified
    // product; publishing refuses contradicting values, and the first image's win here.
    let mut requirements = BTreeMap::new();
    for m in &members {
        for (k, v) in &m.artifact.incus_requirements {
            requirements.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    let mut versions = BTreeMap::new();
    versions.insert(
        c.version.published_at.serial(),
        ProductVersion {
            items,
            label: c.version.version.clone(),
        },
    );
    let release_title = match &c.image.display_name {
        Some(t) if crate::validate::non_blank(t) => t.clone(),
        _ => format!("{} {}", c.image.name, c.version.version),
    };
    Product {
        aliases: aliases.join(","),
        arch: c.arch,
        os: c.artifact.operating_system.clone(),
        release: c.version.version.clone(),
        release_title,
        requirements,
        variant: c.artifact.variant.clone(),
        versions,
    }
}

/// Pretty JSON with a 2-space indent and one trailing newline.
fn pretty<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let mut body = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::internal(format!("incus materialization: {e}")))?;
    body.push(b'\n');
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Timestamp;
    use crate::store::streams::SnapshotAlias;
    use serde_json::{Value, json};

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn at(s: &str) -> Timestamp {
        Timestamp::parse_rfc3339(s).unwrap()
    }

    fn hex64(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    /// An eligible artifact whose ids derive from `n` (artifact `n`, attachment `n + 0x100`) and
    /// whose fingerprint is 64 times `fp`.
    fn artifact(n: u128, arch: &str, variant: &str, fp: char) -> SnapshotArtifact {
        SnapshotArtifact {
            artifact_id: id(n),
            architecture: arch.to_string(),
            operating_system: "debian".to_string(),
            variant: variant.to_string(),
            format: "qcow2".to_string(),
            disk_sha256: hex64('1'),
            disk_size: 1000,
            attachment_id: id(n + 0x100),
            attachment_name: "incus.tar.xz".to_string(),
            attachment_sha256: hex64('2'),
            attachment_size: 100,
            combined_sha256: hex64(fp),
            incus_requirements: BTreeMap::new(),
        }
    }

    /// A VM artifact of the default variant, the common case.
    fn vm(n: u128, arch: &str, fp: char) -> SnapshotArtifact {
        artifact(n, arch, "default", fp)
    }

    /// A squashfs (container) artifact of the default variant sharing the metadata bytes of
    /// `artifact`'s fixtures.
    fn container(n: u128, arch: &str, fp: char) -> SnapshotArtifact {
        SnapshotArtifact {
            format: "squashfs".to_string(),
            disk_sha256: hex64('4'),
            disk_size: 500,
            ..vm(n, arch, fp)
        }
    }

    /// Publish times the fixtures use; a product's version key is the minute, e.g.
    /// `20260102_03:04`.
    const JAN1: &str = "2026-01-01T00:00:00Z";
    const JAN2: &str = "2026-01-02T03:04:05Z";
    const FEB1: &str = "2026-02-01T00:00:00Z";
    const MAR1: &str = "2026-03-01T00:00:00Z";

    fn version(
        n: u128,
        v: &str,
        published: &str,
        artifacts: Vec<SnapshotArtifact>,
    ) -> SnapshotVersion {
        SnapshotVersion {
            id: id(n),
            version: v.to_string(),
            published_at: at(published),
            artifacts,
        }
    }

    fn image(
        name: &str,
        display_name: Option<&str>,
        versions: Vec<SnapshotVersion>,
        aliases: &[(&str, u128)],
    ) -> SnapshotImage {
        SnapshotImage {
            name: name.to_string(),
            display_name: display_name.map(str::to_string),
            versions,
            aliases: aliases
                .iter()
                .map(|(a, v)| SnapshotAlias {
                    name: a.to_string(),
                    version_id: id(*v),
                })
                .collect(),
        }
    }

    fn snapshot(images: Vec<SnapshotImage>) -> Snapshot {
        Snapshot {
            generation: 7,
            images,
        }
    }

    /// Renders a catalog of one image, `img`, with no display name.
    fn render_img(versions: Vec<SnapshotVersion>, aliases: &[(&str, u128)]) -> Rendered {
        render(&snapshot(vec![image("img", None, versions, aliases)])).unwrap()
    }

    /// Renders `img` with one version, `1.0` (id 0x10), published at `JAN2`.
    fn render_one(artifacts: Vec<SnapshotArtifact>, aliases: &[(&str, u128)]) -> Rendered {
        render_img(vec![version(0x10, "1.0", JAN2, artifacts)], aliases)
    }

    fn parse(d: &Document) -> Value {
        serde_json::from_slice(&d.body).unwrap()
    }

    fn text(d: &Document) -> &str {
        std::str::from_utf8(&d.body).unwrap()
    }

    /// `products` of images.json.
    fn products(r: &Rendered) -> serde_json::Map<String, Value> {
        parse(&r.images)["products"].as_object().unwrap().clone()
    }

    fn aliases_of(r: &Rendered, key: &str) -> String {
        products(r)[key]["aliases"].as_str().unwrap().to_string()
    }

    #[test]
    fn empty_catalog() {
        let r = render(&snapshot(vec![])).unwrap();
        assert_eq!(
            text(&r.index),
            r#"{
  "format": "index:1.0",
  "index": {
    "images": {
      "datatype": "image-downloads",
      "format": "products:1.0",
      "path": "streams/v1/images.json"
    }
  }
}
"#
        );
        assert_eq!(
            text(&r.images),
            r#"{
  "content_id": "images",
  "datatype": "image-downloads",
  "format": "products:1.0",
  "products": {}
}
"#
        );
        assert_eq!(r.generation, 7);
        assert!(r.warnings.is_empty());
    }

    #[test]
    fn one_image_golden() {
        let s = snapshot(vec![image(
            "debian-bookworm",
            None,
            vec![version(
                0x10,
                "12.5.0",
                "2026-05-11T05:24:59Z",
                vec![vm(0xa1, "x86_64", '3')],
            )],
            &[("latest", 0x10)],
        )]);
        let r = render(&s).unwrap();
        assert_eq!(
            text(&r.index),
            r#"{
  "format": "index:1.0",
  "index": {
    "images": {
      "datatype": "image-downloads",
      "format": "products:1.0",
      "path": "streams/v1/images.json",
      "products": [
        "debian-bookworm:12.5.0:amd64:default"
      ]
    }
  }
}
"#
        );
        let expected = r#"{
  "content_id": "images",
  "datatype": "image-downloads",
  "format": "products:1.0",
  "products": {
    "debian-bookworm:12.5.0:amd64:default": {
      "aliases": "debian-bookworm/12.5.0,debian-bookworm/latest",
      "arch": "amd64",
      "os": "debian",
      "release": "12.5.0",
      "release_title": "debian-bookworm 12.5.0",
      "requirements": {},
      "variant": "default",
      "versions": {
        "20260511_05:24": {
          "items": {
            "disk-kvm.img": {
              "ftype": "disk-kvm.img",
              "path": "v1/images/debian-bookworm/versions/12.5.0/artifacts/00000000-0000-0000-0000-0000000000a1/download/disk.qcow2",
              "sha256": "DISK",
              "size": 1000
            },
            "incus.tar.xz": {
              "combined_disk-kvm-img_sha256": "COMBINED",
              "ftype": "incus.tar.xz",
              "path": "v1/images/debian-bookworm/versions/12.5.0/artifacts/00000000-0000-0000-0000-0000000000a1/attachments/00000000-0000-0000-0000-0000000001a1/download/incus.tar.xz",
              "sha256": "META",
              "size": 100
            }
          },
          "label": "12.5.0"
        }
      }
    }
  }
}
"#
        .replace("DISK", &hex64('1'))
        .replace("META", &hex64('2'))
        .replace("COMBINED", &hex64('3'));
        assert_eq!(text(&r.images), expected);
        // The entity tag is the quoted sha256 of exactly these bytes.
        assert_eq!(
            r.images.etag,
            format!(
                "\"{}\"",
                crate::digest::hex(&Sha256::digest(expected.as_bytes()))
            )
        );
        assert_ne!(r.index.etag, r.images.etag);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    }

    #[test]
    fn two_architectures_make_two_products() {
        let versions = vec![version(
            0x10,
            "1.0",
            JAN2,
            vec![vm(0xa1, "x86_64", 'a'), vm(0xa2, "aarch64", 'b')],
        )];
        let r = render(&snapshot(vec![image(
            "img",
            Some("My Image"),
            versions,
            &[],
        )]))
        .unwrap();
        assert_eq!(
            parse(&r.index)["index"]["images"]["products"],
            json!(["img:1.0:amd64:default", "img:1.0:arm64:default"])
        );
        let p = products(&r);
        assert_eq!(p["img:1.0:amd64:default"]["arch"], "amd64");
        assert_eq!(p["img:1.0:arm64:default"]["arch"], "arm64");
        // Each architecture carries the same alias: Incus keeps aliases per architecture.
        assert_eq!(p["img:1.0:arm64:default"]["aliases"], "img/1.0");
        assert_eq!(p["img:1.0:amd64:default"]["aliases"], "img/1.0");
        let item =
            &p["img:1.0:arm64:default"]["versions"]["20260102_03:04"]["items"]["incus.tar.xz"];
        assert_eq!(item["combined_disk-kvm-img_sha256"], hex64('b'));
    }

    #[test]
    fn non_default_variant_aliases_carry_the_variant() {
        let cloud = artifact(0xa2, "x86_64", "cloud", 'b');
        let r = render_one(vec![vm(0xa1, "x86_64", 'a'), cloud], &[("stable", 0x10)]);
        assert_eq!(
            aliases_of(&r, "img:1.0:amd64:default"),
            "img/1.0,img/stable"
        );
        assert_eq!(
            aliases_of(&r, "img:1.0:amd64:cloud"),
            "img/1.0/cloud,img/stable/cloud"
        );
        assert_eq!(products(&r)["img:1.0:amd64:cloud"]["variant"], "cloud");
    }

    #[test]
    fn unknown_architecture_is_left_out_and_reported() {
        let wrong_case = artifact(0xa3, "X86_64", "cloud", 'c');
        let arts = vec![vm(0xa1, "x86_64", 'a'), vm(0xa2, "pdp11", 'b'), wrong_case];
        let r = render_one(arts, &[]);
        assert_eq!(
            parse(&r.index)["index"]["images"]["products"],
            json!(["img:1.0:amd64:default"])
        );
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
        assert!(r.warnings[0].contains("X86_64, pdp11"), "{:?}", r.warnings);
    }

    #[test]
    fn only_unknown_architectures_give_an_empty_index() {
        let r = render_one(vec![vm(0xa1, "vax", 'a')], &[("latest", 0x10)]);
        assert!(parse(&r.index)["index"]["images"].get("products").is_none());
        assert_eq!(parse(&r.images)["products"], json!({}));
    }

    #[test]
    fn architecture_names_follow_incus() {
        for (given, want) in [
            ("x86_64", Some("amd64")),
            ("amd64", Some("amd64")),
            ("aarch64", Some("arm64")),
            ("arm64", Some("arm64")),
            ("i686", Some("i386")),
            ("i386", Some("i386")),
            ("armv7l", Some("armhf")),
            ("armhf", Some("armhf")),
            ("ppc64le", Some("ppc64el")),
            ("ppc64el", Some("ppc64el")),
            ("s390x", Some("s390x")),
            ("riscv64", Some("riscv64")),
            ("loongarch64", Some("loong64")),
            ("loong64", Some("loong64")),
            ("X86_64", None),
            ("sparc64", None),
            ("", None),
        ] {
            assert_eq!(incus_arch(given), want, "{given}");
        }
    }

    #[test]
    fn same_architecture_under_two_names_is_one_product() {
        let r = render_one(vec![vm(0xa1, "x86_64", 'a'), vm(0xa2, "amd64", 'b')], &[]);
        let p = products(&r);
        assert_eq!(p.len(), 1);
        // `amd64` sorts before `x86_64`, so that artifact keeps the product.
        assert_eq!(
            p["img:1.0:amd64:default"]["versions"]["20260102_03:04"]["items"]["incus.tar.xz"]["combined_disk-kvm-img_sha256"],
            hex64('b')
        );
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
        assert!(r.warnings[0].contains("img:1.0:amd64:default"));
    }

    #[test]
    fn identical_bytes_are_one_product_with_merged_aliases() {
        let r = render_img(
            // Listed newest first on purpose: the renderer orders by publish time.
            vec![
                version(0x12, "1.2", MAR1, vec![vm(0xa3, "x86_64", 'f')]),
                version(0x11, "1.1", FEB1, vec![vm(0xa2, "x86_64", 'e')]),
                version(0x10, "1.0", JAN1, vec![vm(0xa1, "x86_64", 'e')]),
            ],
            &[("latest", 0x11), ("stable", 0x10)],
        );
        let p = products(&r);
        assert_eq!(
            p.keys().collect::<Vec<_>>(),
            ["img:1.0:amd64:default", "img:1.2:amd64:default"]
        );
        assert_eq!(
            aliases_of(&r, "img:1.0:amd64:default"),
            "img/1.0,img/1.1,img/latest,img/stable"
        );
        assert_eq!(aliases_of(&r, "img:1.2:amd64:default"), "img/1.2");
        // The fingerprint appears exactly once in the whole document.
        assert_eq!(text(&r.images).matches(&hex64('e')).count(), 1);
        // The product describes the version that owns it.
        assert_eq!(p["img:1.0:amd64:default"]["release"], "1.0");
    }

    #[test]
    fn identical_bytes_of_a_variant_merge_with_the_variant_suffix() {
        let cloud = artifact(0xa2, "x86_64", "cloud", 'e');
        let r = render_one(vec![vm(0xa1, "x86_64", 'e'), cloud], &[]);
        assert_eq!(products(&r).len(), 1);
        assert_eq!(
            aliases_of(&r, "img:1.0:amd64:default"),
            "img/1.0,img/1.0/cloud"
        );
    }

    #[test]
    fn moving_an_alias_moves_it_between_products() {
        let with_latest_at = |owner: u128| {
            let versions = vec![
                version(0x10, "1.0", JAN1, vec![vm(0xa1, "x86_64", 'a')]),
                version(0x11, "1.1", FEB1, vec![vm(0xa2, "x86_64", 'b')]),
            ];
            render_img(versions, &[("latest", owner)])
        };
        let before = with_latest_at(0x10);
        assert_eq!(
            aliases_of(&before, "img:1.0:amd64:default"),
            "img/1.0,img/latest"
        );
        assert_eq!(aliases_of(&before, "img:1.1:amd64:default"), "img/1.1");
        let after = with_latest_at(0x11);
        assert_eq!(aliases_of(&after, "img:1.0:amd64:default"), "img/1.0");
        assert_eq!(
            aliases_of(&after, "img:1.1:amd64:default"),
            "img/1.1,img/latest"
        );
        assert_ne!(before.images.etag, after.images.etag);
        // The product list did not change, so neither did index.json.
        assert_eq!(before.index.etag, after.index.etag);
    }

    #[test]
    fn an_alias_named_like_a_version_yields_to_the_version() {
        let versions = vec![
            version(0x10, "stable", JAN1, vec![vm(0xa1, "x86_64", 'a')]),
            version(0x11, "2.0", FEB1, vec![vm(0xa2, "x86_64", 'b')]),
        ];
        // `stable` as an alias would claim `img/stable` a second time on amd64.
        let r = render_img(versions, &[("stable", 0x11), ("latest", 0x11)]);
        assert_eq!(aliases_of(&r, "img:stable:amd64:default"), "img/stable");
        assert_eq!(
            aliases_of(&r, "img:2.0:amd64:default"),
            "img/2.0,img/latest"
        );
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
        assert!(r.warnings[0].contains("img/stable (amd64)"));
    }

    #[test]
    fn release_title_uses_display_name_unless_blank() {
        let one = |display: Option<&str>| {
            let versions = vec![version(0x10, "1.0", JAN1, vec![vm(0xa1, "x86_64", 'a')])];
            let r = render(&snapshot(vec![image("img", display, versions, &[])])).unwrap();
            products(&r)["img:1.0:amd64:default"]["release_title"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(one(Some("Debian 12 (bookworm)")), "Debian 12 (bookworm)");
        assert_eq!(one(Some(" \t")), "img 1.0");
        assert_eq!(one(None), "img 1.0");
    }

    #[test]
    fn path_segments_are_escaped_and_aliases_are_not() {
        let r = render_img(
            vec![version(
                0x10,
                "1.0+b1:2",
                JAN1,
                vec![vm(0xa1, "x86_64", 'a')],
            )],
            &[],
        );
        let p = &products(&r)["img:1.0+b1:2:amd64:default"];
        assert_eq!(p["aliases"], "img/1.0+b1:2");
        assert_eq!(p["release"], "1.0+b1:2");
        let path = p["versions"]["20260101_00:00"]["items"]["disk-kvm.img"]["path"]
            .as_str()
            .unwrap();
        assert!(
            path.starts_with("v1/images/img/versions/1.0%2Bb1%3A2/artifacts/"),
            "{path}"
        );
        assert!(path.ends_with("/download/disk.qcow2"), "{path}");
    }

    #[test]
    fn output_does_not_depend_on_snapshot_order() {
        let a = image(
            "a",
            None,
            vec![
                version(
                    0x10,
                    "1",
                    JAN1,
                    vec![vm(0xa1, "x86_64", 'a'), vm(0xa2, "aarch64", 'b')],
                ),
                version(0x11, "2", JAN1, vec![vm(0xa3, "x86_64", 'a')]),
            ],
            &[("latest", 0x11)],
        );
        let b_versions = vec![version(0x20, "1", JAN1, vec![vm(0xb1, "x86_64", 'c')])];
        let b = image("b", None, b_versions, &[]);
        let first = render(&snapshot(vec![a.clone(), b.clone()])).unwrap();
        let mut a2 = a;
        a2.versions.reverse();
        for v in a2.versions.iter_mut() {
            v.artifacts.reverse();
        }
        let second = render(&snapshot(vec![b, a2])).unwrap();
        assert_eq!(first.images.body, second.images.body);
        assert_eq!(first.index.body, second.index.body);
        // Same publish minute: the version string breaks the tie, so `1` owns the bytes.
        assert_eq!(aliases_of(&first, "a:1:amd64:default"), "a/1,a/2,a/latest");
    }

    #[test]
    fn a_vm_and_a_container_of_one_version_share_a_product() {
        let mut vm = vm(0xa1, "x86_64", 'a');
        vm.incus_requirements
            .insert("secureboot".to_string(), "false".to_string());
        let r = render_one(vec![vm, container(0xa2, "amd64", 'c')], &[("latest", 0x10)]);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let p = products(&r);
        assert_eq!(p.len(), 1);
        let product = &p["img:1.0:amd64:default"];
        assert_eq!(product["aliases"], "img/1.0,img/latest");
        assert_eq!(product["requirements"], json!({"secureboot": "false"}));
        let base = "v1/images/img/versions/1.0/artifacts";
        assert_eq!(
            product["versions"]["20260102_03:04"]["items"],
            json!({
                "disk-kvm.img": {
                    "ftype": "disk-kvm.img",
                    "path": format!("{base}/00000000-0000-0000-0000-0000000000a1/download/disk.qcow2"),
                    "sha256": hex64('1'),
                    "size": 1000
                },
                "incus.tar.xz": {
                    "combined_disk-kvm-img_sha256": hex64('a'),
                    "combined_squashfs_sha256": hex64('c'),
                    "ftype": "incus.tar.xz",
                    "path": format!("{base}/00000000-0000-0000-0000-0000000000a1/attachments/00000000-0000-0000-0000-0000000001a1/download/incus.tar.xz"),
                    "sha256": hex64('2'),
                    "size": 100
                },
                "root.squashfs": {
                    "ftype": "squashfs",
                    "path": format!("{base}/00000000-0000-0000-0000-0000000000a2/download/rootfs.squashfs"),
                    "sha256": hex64('4'),
                    "size": 500
                }
            })
        );
    }

    #[test]
    fn a_container_alone_is_a_product_with_one_fingerprint() {
        let r = render_one(vec![container(0xa2, "x86_64", 'c')], &[]);
        let items = &products(&r)["img:1.0:amd64:default"]["versions"]["20260102_03:04"]["items"];
        assert_eq!(
            items["incus.tar.xz"]["combined_squashfs_sha256"],
            hex64('c')
        );
        assert!(
            items["incus.tar.xz"]
                .get("combined_disk-kvm-img_sha256")
                .is_none()
        );
        assert!(items.get("disk-kvm.img").is_none());
        assert_eq!(items["root.squashfs"]["ftype"], "squashfs");
    }

    #[test]
    fn a_container_with_other_metadata_is_left_out_of_the_product() {
        let mut ct = container(0xa2, "x86_64", 'c');
        ct.attachment_sha256 = hex64('9');
        let r = render_one(vec![vm(0xa1, "x86_64", 'a'), ct], &[]);
        assert!(!text(&r.images).contains(&hex64('c')));
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
        assert!(
            r.warnings[0].contains("incus.tar.xz differs"),
            "{:?}",
            r.warnings
        );
    }

    /// Renders `img` 1.0 (January) and 2.0 (February), each a VM and a container of x86_64:
    /// both VMs have fingerprint `a`, 1.0's container has `b` and 2.0's has `container_fp`.
    fn two_unified_versions(container_fp: char, aliases: &[(&str, u128)]) -> Rendered {
        let arts = |a, b, ct_fp| vec![vm(a, "x86_64", 'a'), container(b, "x86_64", ct_fp)];
        let versions = vec![
            version(0x10, "1.0", JAN1, arts(0xa1, 0xa2, 'b')),
            version(0x11, "2.0", FEB1, arts(0xa3, 0xa4, container_fp)),
        ];
        render_img(versions, aliases)
    }

    #[test]
    fn a_repeated_image_type_keeps_only_the_new_image() {
        // 2.0 repeats 1.0's VM bytes but brings a new container: the VM fingerprint stays with
        // 1.0, and 2.0 lists only its container.
        let r = two_unified_versions('c', &[("latest", 0x11)]);
        assert_eq!(text(&r.images).matches(&hex64('a')).count(), 1);
        let p = products(&r);
        let items = &p["img:2.0:amd64:default"]["versions"]["20260201_00:00"]["items"];
        assert!(items.get("disk-kvm.img").is_none(), "{items}");
        assert_eq!(
            items["incus.tar.xz"]["combined_squashfs_sha256"],
            hex64('c')
        );
        assert_eq!(
            aliases_of(&r, "img:2.0:amd64:default"),
            "img/2.0,img/latest"
        );
        assert_eq!(aliases_of(&r, "img:1.0:amd64:default"), "img/1.0");
        assert!(
            r.warnings
                .iter()
                .any(|w| w.contains("img:2.0:amd64:default (virtual-machine)"))
        );
    }

    #[test]
    fn identical_unified_versions_merge() {
        let r = two_unified_versions('b', &[]);
        assert_eq!(products(&r).len(), 1);
        assert_eq!(aliases_of(&r, "img:1.0:amd64:default"), "img/1.0,img/2.0");
    }

    #[test]
    fn aliases_are_claimed_per_image_type() {
        // A VM-only version named `stable` and a container-only version aliased `stable`: Incus
        // keeps aliases per type, so both may carry `img/stable`.
        let versions = vec![
            version(0x10, "stable", JAN1, vec![vm(0xa1, "x86_64", 'a')]),
            version(0x11, "2.0", FEB1, vec![container(0xa2, "x86_64", 'b')]),
        ];
        let r = render_img(versions, &[("stable", 0x11)]);
        assert_eq!(aliases_of(&r, "img:stable:amd64:default"), "img/stable");
        assert_eq!(
            aliases_of(&r, "img:2.0:amd64:default"),
            "img/2.0,img/stable"
        );
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    }
}
