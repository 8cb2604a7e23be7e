//! Brings one version on a server to a wanted content and publishes it; shared by `push` and
//! `mirror`. Safe to run again: a version already published with exactly this content is left
//! alone, one published with other content is a conflict (never overwritten), a draft left by
//! an interrupted run is completed.

use super::upload::BlobRef;
use super::{Api, ClientError, Kind, Result, seg};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// One artifact as it should be, with its attachments.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct WantArtifact {
    pub variant: String,
    pub os: String,
    pub arch: String,
    pub format: String,
    pub media_type: String,
    pub blob: BlobRef,
    /// (name, media type, blob), sorted by name.
    pub attachments: Vec<(String, String, BlobRef)>,
}

impl WantArtifact {
    /// The artifact described by a manifest entry (`{artifact, attachments}`).
    pub fn from_manifest(entry: &Value) -> WantArtifact {
        let a = &entry["artifact"];
        let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let mut attachments: Vec<(String, String, BlobRef)> = entry["attachments"]
            .as_array()
            .map(|l| {
                l.iter()
                    .map(|t| {
                        (
                            s(&t["name"]),
                            s(&t["media_type"]),
                            BlobRef {
                                digest: s(&t["blob_digest"]),
                                size: t["blob_size_bytes"].as_u64().unwrap_or(0),
                            },
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        attachments.sort();
        WantArtifact {
            variant: s(&a["variant"]),
            os: s(&a["operating_system"]),
            arch: s(&a["architecture"]),
            format: s(&a["format"]),
            media_type: s(&a["primary_media_type"]),
            blob: BlobRef {
                digest: s(&a["primary_blob_digest"]),
                size: a["primary_blob_size_bytes"].as_u64().unwrap_or(0),
            },
            attachments,
        }
    }

    fn normalized(&self) -> WantArtifact {
        let mut w = self.clone();
        if w.variant.is_empty() {
            w.variant = "default".into();
        }
        w.attachments.sort();
        w
    }

    pub fn describe(&self) -> String {
        format!(
            "{} {} {} {} {} ({} bytes)",
            self.format,
            self.arch,
            self.os,
            if self.variant.is_empty() {
                "default"
            } else {
                &self.variant
            },
            self.blob.digest,
            self.blob.size
        )
    }
}

/// Every blob the artifacts need, each once.
pub fn blobs_of(want: &[WantArtifact]) -> Vec<(BlobRef, String)> {
    let mut out: Vec<(BlobRef, String)> = Vec::new();
    for a in want {
        let mut add = |b: &BlobRef, media: &str| {
            if !out.iter().any(|(x, _)| x == b) {
                out.push((b.clone(), media.to_string()));
            }
        };
        add(&a.blob, &a.media_type);
        for (_, m, b) in &a.attachments {
            add(b, m);
        }
    }
    out
}

fn sorted(list: &[WantArtifact]) -> Vec<WantArtifact> {
    let mut v: Vec<WantArtifact> = list.iter().map(WantArtifact::normalized).collect();
    v.sort();
    v
}

/// What the server holds under a version name, seen before anything is uploaded.
pub enum Found {
    /// Nothing: the version (and maybe the image) is to be created.
    Missing,
    /// A draft with these artifacts (by id).
    Draft(Vec<(String, WantArtifact)>),
    /// Publishing or published with exactly the wanted content.
    Same { published: bool },
}

/// What the server holds under a version name, before the files are hashed.
pub enum Seen {
    /// Nothing: the version (and maybe the image) is to be created.
    Missing,
    /// A draft with these artifacts (by id): whatever it holds, it can be made to match.
    Draft(Vec<(String, WantArtifact)>),
    /// Publishing or published (`state`) with these artifacts: it must match exactly.
    Settled {
        state: String,
        have: Vec<WantArtifact>,
    },
}

/// Reads the version, without judging it.
pub fn look(api: &Api, image: &str, version: &str) -> Result<Seen> {
    let path = format!("/v1/images/{}/versions/{}", seg(image), seg(version));
    let r = api.get(&path)?;
    if r.status == 404 {
        return Ok(Seen::Missing);
    }
    let m = r.expect(&format!("reading {image} {version}"), &[200])?;
    let have: Vec<(String, WantArtifact)> = m["artifacts"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|e| {
                    (
                        e["artifact"]["id"].as_str().unwrap_or_default().to_string(),
                        WantArtifact::from_manifest(e),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let state = m["version"]["state"].as_str().unwrap_or_default();
    if state == "draft" {
        return Ok(Seen::Draft(have));
    }
    Ok(Seen::Settled {
        state: state.to_string(),
        have: have.into_iter().map(|(_, a)| a).collect(),
    })
}

/// What `seen` means for the wanted content: a version publishing or published with other
/// content is refused.
pub fn judge(seen: Seen, image: &str, version: &str, want: &[WantArtifact]) -> Result<Found> {
    let (state, have_list) = match seen {
        Seen::Missing => return Ok(Found::Missing),
        Seen::Draft(have) => return Ok(Found::Draft(have)),
        Seen::Settled { state, have } => (state, have),
    };
    if sorted(&have_list) == sorted(want) {
        return Ok(Found::Same {
            published: state == "published",
        });
    }
    let mut msg = format!(
        "{image} {version} is already {state} with other content; a published version never changes, so publish these files under a new version name.\n  on the server:"
    );
    for a in sorted(&have_list) {
        msg.push_str(&format!("\n    {}", a.describe()));
    }
    msg.push_str("\n  wanted:");
    for a in sorted(want) {
        msg.push_str(&format!("\n    {}", a.describe()));
    }
    Err(ClientError::new(Kind::Conflict, msg))
}

/// Looks at the version and refuses (before any byte is sent) when it is published with other
/// content.
pub fn inspect(api: &Api, image: &str, version: &str, want: &[WantArtifact]) -> Result<Found> {
    judge(look(api, image, version)?, image, version, want)
}

/// Creates what is missing (image, version, artifacts, attachments) once every blob is on the
/// server, deletes draft artifacts that are not wanted, publishes and waits for the job.
pub fn build_and_publish(
    api: &Api,
    image: &str,
    image_fields: &Value,
    version: &str,
    want: &[WantArtifact],
    found: Found,
) -> Result<()> {
    let vpath = format!("/v1/images/{}/versions/{}", seg(image), seg(version));
    let mut have = match found {
        Found::Same { published: true } => return Ok(()),
        Found::Same { published: false } => return publish(api, &vpath, image, version),
        Found::Draft(have) => have,
        Found::Missing => {
            let mut body = image_fields.clone();
            body["name"] = json!(image);
            let r = api.send("POST", "/v1/images", Some(&body))?;
            if r.status != 409 {
                r.expect(&format!("creating image {image}"), &[201])?;
            }
            let r = api.send(
                "POST",
                &format!("/v1/images/{}/versions", seg(image)),
                Some(&json!({ "version": version })),
            )?;
            if r.status == 409 {
                return Err(ClientError::new(
                    Kind::Conflict,
                    format!(
                        "cannot create {image} {version}: {} (a retired version's name is never reused; pick a new version name)",
                        r.detail()
                    ),
                ));
            }
            r.expect(&format!("creating version {image} {version}"), &[201])?;
            Vec::new()
        }
    };
    let wanted = sorted(want);
    // Draft artifacts left by an interrupted run: keep the exact ones, delete the rest.
    have.retain(|(id, a)| {
        if wanted.contains(&a.normalized()) {
            return true;
        }
        let _ = api.send("DELETE", &format!("{vpath}/artifacts/{}", seg(id)), None);
        false
    });
    for a in &wanted {
        if have.iter().any(|(_, h)| h.normalized() == *a) {
            continue;
        }
        let body = json!({"variant": a.variant, "operating_system": a.os, "architecture": a.arch,
                          "format": a.format, "primary_blob_digest": a.blob.digest,
                          "primary_blob_size_bytes": a.blob.size, "primary_media_type": a.media_type});
        let r = api.send("POST", &format!("{vpath}/artifacts"), Some(&body))?;
        if r.status == 400 && a.format == "squashfs" {
            return Err(ClientError::failed(format!(
                "the server refused a squashfs artifact ({}); it predates the squashfs format: upgrade it, or push a disk image",
                r.detail()
            )));
        }
        let created = r.expect(&format!("adding the {} artifact", a.format), &[201])?;
        let id = created["id"].as_str().unwrap_or_default().to_string();
        for (name, media, blob) in &a.attachments {
            let body = json!({"name": name, "media_type": media, "blob_digest": blob.digest,
                              "blob_size_bytes": blob.size});
            api.send(
                "POST",
                &format!("{vpath}/artifacts/{}/attachments", seg(&id)),
                Some(&body),
            )?
            .expect(&format!("attaching {name}"), &[201])?;
        }
    }
    publish(api, &vpath, image, version)
}

/// Publishes (or finds the job of a publish already under way) and waits for it.
fn publish(api: &Api, vpath: &str, image: &str, version: &str) -> Result<()> {
    let job = api
        .send("POST", &format!("{vpath}/publish"), None)?
        .expect(&format!("publishing {image} {version}"), &[200, 202])?;
    let id = job["id"].as_str().unwrap_or_default().to_string();
    let deadline = Instant::now() + Duration::from_secs(3600);
    let mut pause = Duration::from_millis(50);
    let mut polls = 0;
    loop {
        let j = api
            .get(&format!("/v1/publish-jobs/{}", seg(&id)))?
            .expect(&format!("reading publish job {id}"), &[200])?;
        match j["state"].as_str().unwrap_or_default() {
            "succeeded" => return Ok(()),
            "failed" => {
                return Err(ClientError::failed(format!(
                    "publish job {id} for {image} {version} failed: {}",
                    j["failure_message"].as_str().unwrap_or("no reason given")
                )));
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(ClientError::failed(format!(
                "publish job {id} did not finish within an hour"
            )));
        }
        // A job usually finishes within a few hundred milliseconds: poll briskly at first,
        // then back off for the long ones (a large incus.tar.xz and disk are hashed).
        std::thread::sleep(pause);
        polls += 1;
        if polls > 40 {
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }
}

/// Points `alias` at `version` unless it already does. Returns whether it moved.
pub fn set_alias(api: &Api, image: &str, alias: &str, version: &str) -> Result<Option<String>> {
    let path = format!("/v1/images/{}/aliases/{}", seg(image), seg(alias));
    let r = api.get(&path)?;
    let before = (r.status == 200)
        .then(|| r.json["version"].as_str().map(str::to_string))
        .flatten();
    if before.as_deref() == Some(version) {
        return Ok(None);
    }
    let r = api.send("PUT", &path, Some(&json!({ "version": version })))?;
    if r.status == 412 {
        return Err(ClientError::new(
            Kind::Conflict,
            format!("cannot point {image}/{alias} at {version}: {}", r.detail()),
        ));
    }
    r.expect(&format!("moving alias {image}/{alias}"), &[200])?;
    Ok(Some(before.unwrap_or_else(|| "(new)".to_string())))
}
