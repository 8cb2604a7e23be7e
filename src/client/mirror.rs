//! `imgsrv mirror`: copies published versions and aliases from an upstream imgsrv into another
//! one, so that a second site serves the same images (and the same Simple Streams products and
//! fingerprints) from its own disks.
//!
//! Upstream is read anonymously; bytes are fetched by range from `/v1/blobs/{digest}` straight
//! into upload parts downstream (nothing is staged on local disk). Each part is hashed on the
//! way and checked against the etag downstream answers, and downstream's complete checks the
//! whole blob against the digest upstream published, so every byte is verified. Blobs the
//! mirror already holds are not fetched; an interrupted run resumes (see `upload`).

use super::sync::{self, Found, WantArtifact};
use super::upload::{self, BlobRef, Outcome, Source};
use super::{Api, ClientError, Kind, Result, human_bytes, normalize_arch, seg};
use crate::cli::MirrorArgs;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::Read;

/// Part bytes from upstream by HTTP range.
struct Upstream<'a> {
    api: &'a Api,
    digest: String,
}

impl Source for Upstream<'_> {
    fn open(&self, offset: u64, len: u64) -> Result<Box<dyn Read + Send + '_>> {
        let path = format!("/v1/blobs/{}", seg(&self.digest));
        if len == 0 {
            return Ok(Box::new(std::io::empty()));
        }
        let (status, body) = self
            .api
            .get_stream(&path, Some((offset, offset + len - 1)))?;
        if status != 206 {
            return Err(ClientError::new(
                Kind::Unreachable,
                format!(
                    "GET {}: expected 206 for a byte range, got {status}",
                    self.api.url(&path)
                ),
            ));
        }
        Ok(Box::new(ExactLen {
            inner: body,
            left: len,
        }))
    }
}

/// Fails a body that ends before its length, so a cut download is never sent on as a short part
/// (the server would answer that the body ended early, but the error here names the cause).
struct ExactLen<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for ExactLen<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.left as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "upstream body ended early",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn list(api: &Api, path: &str, member: &str) -> Result<Vec<Value>> {
    let r = api.get(path)?;
    if r.status == 404 {
        return Ok(Vec::new());
    }
    let v = r.expect(&format!("GET {}", api.url(path)), &[200])?;
    Ok(v[member].as_array().cloned().unwrap_or_default())
}

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// Counts what a run did, for the closing line.
#[derive(Default)]
struct Tally {
    mirrored: usize,
    current: usize,
    retired: usize,
    aliases: usize,
    bytes: u64,
    errors: Vec<ClientError>,
}

pub fn run(args: MirrorArgs) -> Result<()> {
    let token = super::check_upload_flags(
        args.part_size_mib,
        args.parallel,
        args.token_file.as_deref(),
    )?;
    let tls = super::tls::config(args.ca_cert.as_deref())?;
    let up = Api::new(&args.from, None, tls.clone(), args.parallel)?;
    let down = Api::new(&args.to, Some(token), tls, args.parallel)?;
    if up.base() == down.base() {
        return Err(ClientError::usage("--from and --to are the same server"));
    }
    let opts = upload::Options {
        part_size: args.part_size_mib * 1024 * 1024,
        parallel: args.parallel,
        state_dir: super::state_dir(args.state_dir.as_deref())?,
    };
    let arches: Vec<String> = args.arch.iter().map(|a| normalize_arch(a)).collect();

    let images = list(&up, "/v1/images", "images")?;
    for wanted in &args.image {
        if !images.iter().any(|i| i["name"] == wanted.as_str()) {
            return Err(ClientError::usage(format!(
                "upstream {} has no published image {wanted}",
                up.base()
            )));
        }
    }
    let mut tally = Tally::default();
    let selected: Vec<&Value> = images
        .iter()
        .filter(|i| args.image.is_empty() || args.image.contains(&s(&i["name"])))
        .collect();
    // Every selected version, oldest first as upstream published them, across images: a later
    // version with the bytes of an earlier one (of any image) merges into the earlier one's
    // Simple Streams product, and publishing in the same order makes the mirror merge alike.
    let mut all: Vec<(String, String, String, Value)> = Vec::new();
    let mut upstream_versions: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for img in &selected {
        let name = s(&img["name"]);
        let mut fields = json!({});
        for k in ["display_name", "description"] {
            if let Some(v) = img[k].as_str() {
                fields[k] = json!(v);
            }
        }
        let versions = list(
            &up,
            &format!("/v1/images/{}/versions", seg(&name)),
            "versions",
        )?;
        for v in &versions {
            all.push((
                s(&v["published_at"]),
                name.clone(),
                s(&v["version"]),
                fields.clone(),
            ));
        }
        upstream_versions.insert(name, versions.iter().map(|v| s(&v["version"])).collect());
    }
    // Timestamps are compared as times: RFC 3339 text with and without fractional seconds
    // does not sort as the times do.
    let when = |t: &str| {
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
    };
    all.sort_by(|a, b| (when(&a.0), &a.1, &a.2).cmp(&(when(&b.0), &b.1, &b.2)));
    for (_, name, version, fields) in &all {
        match mirror_version(
            &up, &down, name, version, fields, &arches, &opts, &mut tally,
        ) {
            Ok(_) => {}
            // An unreachable or refusing downstream fails every version alike: stop at once.
            Err(e) if matches!(e.kind, Kind::Auth | Kind::Unreachable | Kind::Full) => {
                return Err(e);
            }
            Err(e) => {
                eprintln!("imgsrv: error: {name} {version}: {e}");
                tally.errors.push(e);
            }
        }
    }
    for (name, versions) in &upstream_versions {
        if let Err(e) = sync_image(&up, &down, name, versions, &mut tally) {
            if matches!(e.kind, Kind::Auth | Kind::Unreachable | Kind::Full) {
                return Err(e);
            }
            eprintln!("imgsrv: error: {name}: {e}");
            tally.errors.push(e);
        }
    }
    println!(
        "mirror {} -> {}: {} version(s) copied, {} already present, {} retired, {} alias change(s), {} transferred{}",
        up.base(),
        down.base(),
        tally.mirrored,
        tally.current,
        tally.retired,
        tally.aliases,
        human_bytes(tally.bytes),
        if tally.errors.is_empty() {
            String::new()
        } else {
            format!(", {} error(s)", tally.errors.len())
        }
    );
    match tally.errors.into_iter().next() {
        None => Ok(()),
        Some(first) => Err(ClientError::new(
            first.kind,
            "some versions were not mirrored (see the errors above)",
        )),
    }
}

/// Applies upstream's aliases and retirements to one image, once its versions are copied.
fn sync_image(
    up: &Api,
    down: &Api,
    name: &str,
    versions: &[String],
    tally: &mut Tally,
) -> Result<()> {
    let ipath = format!("/v1/images/{}", seg(name));
    let mut mirrored: Vec<String> = Vec::new();
    // Aliases: upstream's, where their target is published here (by this run or an earlier one,
    // say with other --arch filters); aliases upstream no longer has go.
    for v in list(down, &format!("{ipath}/versions"), "versions")? {
        let version = s(&v["version"]);
        if !mirrored.contains(&version) {
            mirrored.push(version);
        }
    }
    let up_aliases = list(up, &format!("{ipath}/aliases"), "aliases")?;
    let down_aliases = list(down, &format!("{ipath}/aliases"), "aliases")?;
    for a in &up_aliases {
        let (alias, target) = (s(&a["alias"]), s(&a["version"]));
        if !mirrored.contains(&target) {
            eprintln!(
                "{name}/{alias}: points at {target}, which is not mirrored here; left as it is"
            );
            continue;
        }
        match sync::set_alias(down, name, &alias, &target) {
            Ok(Some(before)) => {
                println!("alias {name}/{alias} -> {target} (was {before})");
                tally.aliases += 1;
            }
            Ok(None) => {}
            Err(e) => {
                eprintln!("imgsrv: error: {e}");
                tally.errors.push(e);
            }
        }
    }
    for a in &down_aliases {
        let alias = s(&a["alias"]);
        if up_aliases.iter().any(|u| u["alias"] == alias.as_str()) {
            continue;
        }
        let r = down.send("DELETE", &format!("{ipath}/aliases/{}", seg(&alias)), None)?;
        r.expect(&format!("deleting alias {name}/{alias}"), &[204, 404])?;
        println!("alias {name}/{alias} deleted (gone upstream)");
        tally.aliases += 1;
    }

    // Versions retired upstream are retired here too, unless an alias here still points at
    // one (it is then reported and kept).
    let here = list(down, &format!("{ipath}/versions"), "versions")?;
    let down_aliases = list(down, &format!("{ipath}/aliases"), "aliases")?;
    for v in &here {
        let version = s(&v["version"]);
        if versions.contains(&version) {
            continue;
        }
        let r = up.get(&format!("{ipath}/versions/{}", seg(&version)))?;
        if r.status != 404 {
            // Still there upstream (not published, or filtered): not ours to retire.
            continue;
        }
        let pinned: Vec<String> = down_aliases
            .iter()
            .filter(|a| a["version"] == version.as_str())
            .map(|a| s(&a["alias"]))
            .collect();
        if !pinned.is_empty() {
            println!(
                "{name} {version}: gone upstream, kept here because alias(es) {} point at it",
                pinned.join(", ")
            );
            continue;
        }
        let r = down.send(
            "DELETE",
            &format!("{ipath}/versions/{}", seg(&version)),
            None,
        )?;
        r.expect(&format!("retiring {name} {version}"), &[204, 404])?;
        println!("retired {name} {version} (gone upstream)");
        tally.retired += 1;
    }
    Ok(())
}

/// Copies one version. Returns whether it is published here afterwards.
#[allow(clippy::too_many_arguments)]
fn mirror_version(
    up: &Api,
    down: &Api,
    image: &str,
    version: &str,
    fields: &Value,
    arches: &[String],
    opts: &upload::Options,
    tally: &mut Tally,
) -> Result<bool> {
    let m = up
        .get(&format!(
            "/v1/images/{}/versions/{}",
            seg(image),
            seg(version)
        ))?
        .expect(&format!("reading upstream {image} {version}"), &[200])?;
    let want: Vec<WantArtifact> = m["artifacts"]
        .as_array()
        .map(|l| l.iter().map(WantArtifact::from_manifest).collect())
        .unwrap_or_default();
    let want: Vec<WantArtifact> = want
        .into_iter()
        .filter(|a| arches.is_empty() || arches.contains(&normalize_arch(&a.arch)))
        .collect();
    if want.is_empty() {
        return Ok(false);
    }
    let found = sync::inspect(down, image, version, &want)?;
    if let Found::Same { published: true } = found {
        tally.current += 1;
        return Ok(true);
    }
    let mut bytes = 0;
    for (blob, media) in sync::blobs_of(&want) {
        let source = Upstream {
            api: up,
            digest: blob.digest.clone(),
        };
        let label = format!("{image} {version} {}", short(&blob));
        let job = upload::Job {
            api: down,
            name: &label,
            media_type: Some(&media),
            source: &source,
            opts,
        };
        if let Outcome::Uploaded { bytes: b } = upload::ensure_blob(&job, &blob)? {
            bytes += b;
        }
    }
    sync::build_and_publish(down, image, fields, version, &want, found)?;
    println!(
        "mirrored {image} {version}: {} artifact(s), {} transferred",
        want.len(),
        human_bytes(bytes)
    );
    tally.mirrored += 1;
    tally.bytes += bytes;
    Ok(true)
}

fn short(b: &BlobRef) -> String {
    b.digest.chars().take(19).collect()
}
