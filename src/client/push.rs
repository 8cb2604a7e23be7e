//! `imgsrv push`: distrobuilder's output files to a published version, in one command that is
//! safe to run again (it resumes an interrupted upload and is a no-op once published).

use super::late;
use super::sync::{self, Found, Seen, WantArtifact};
use super::upload::{self, BlobRef};
use super::{Api, ClientError, Result, human_bytes, incus_meta, normalize_arch};
use crate::cli::PushArgs;
use std::path::PathBuf;

/// A file push knows by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// An artifact: format and media type.
    Artifact(&'static str, &'static str),
    /// `incus.tar.xz`, attached to every artifact.
    IncusMeta,
}

fn role_of(name: &str) -> Option<Role> {
    match name {
        "disk.qcow2" => Some(Role::Artifact("qcow2", "application/x-qemu-disk")),
        "rootfs.squashfs" => Some(Role::Artifact("squashfs", "application/vnd.squashfs")),
        "incus.tar.xz" => Some(Role::IncusMeta),
        _ => None,
    }
}

/// The files named on the command line (a directory stands for the files in it).
fn collect(paths: &[String]) -> Result<Vec<(PathBuf, Role)>> {
    if paths.is_empty() {
        return Err(ClientError::usage(
            "no files given: name disk.qcow2, rootfs.squashfs and incus.tar.xz, or a directory holding them",
        ));
    }
    let mut files = Vec::new();
    for p in paths {
        let path = PathBuf::from(p);
        let meta = std::fs::metadata(&path)
            .map_err(|e| ClientError::usage(format!("cannot read {p}: {e}")))?;
        if meta.is_dir() {
            if paths.len() != 1 {
                return Err(ClientError::usage(format!(
                    "{p} is a directory: give either one directory or files"
                )));
            }
            let mut entries: Vec<PathBuf> = std::fs::read_dir(&path)
                .map_err(|e| ClientError::usage(format!("cannot list {p}: {e}")))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|e| e.is_file())
                .collect();
            entries.sort();
            files.extend(entries);
        } else {
            files.push(path);
        }
    }
    let mut out: Vec<(PathBuf, Role)> = Vec::new();
    for f in files {
        let name = f
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let role = role_of(&name).ok_or_else(|| {
            ClientError::usage(format!(
                "{}: not a file push knows; expected disk.qcow2, rootfs.squashfs or incus.tar.xz (named as distrobuilder writes them)",
                f.display()
            ))
        })?;
        if out.iter().any(|(_, r)| *r == role) {
            return Err(ClientError::usage(format!("{name} is given twice")));
        }
        out.push((f, role));
    }
    if !out.iter().any(|(_, r)| matches!(r, Role::Artifact(..))) {
        return Err(ClientError::usage(
            "no disk.qcow2 or rootfs.squashfs given: incus.tar.xz alone is not an image",
        ));
    }
    Ok(out)
}

pub fn run(args: PushArgs) -> Result<()> {
    let files = collect(&args.paths)?;
    let token = super::check_upload_flags(
        args.part_size_mib,
        args.parallel,
        args.token_file.as_deref(),
    )?;
    let meta_file = files
        .iter()
        .find(|(_, r)| *r == Role::IncusMeta)
        .map(|(p, _)| p.clone());
    let meta = match &meta_file {
        Some(p) => incus_meta::read(p)?,
        None => incus_meta::Meta::default(),
    };
    let os = args.os.clone().or(meta.os).ok_or_else(|| {
        ClientError::usage("no --os given and no os in incus.tar.xz's metadata.yaml")
    })?;
    let arch = args
        .arch
        .clone()
        .or(meta.architecture)
        .map(|a| normalize_arch(&a))
        .ok_or_else(|| {
            ClientError::usage(
                "no --arch given and no architecture in incus.tar.xz's metadata.yaml",
            )
        })?;
    let tls = super::tls::config(args.ca_cert.as_deref())?;
    let api = Api::new(&args.server, Some(token), tls, args.parallel)?;
    let opts = upload::Options {
        part_size: args.part_size_mib * 1024 * 1024,
        parallel: args.parallel,
        state_dir: super::state_dir(args.state_dir.as_deref())?,
    };

    // A version that is publishing or published must hold exactly these files: hash them
    // first and compare, so that nothing is sent when it does not. Otherwise each file is
    // uploaded while it is hashed, and the version is built once the digests are known.
    let seen = sync::look(&api, &args.image, &args.version)?;
    let settled = matches!(seen, Seen::Settled { .. });
    let mut hashed: Vec<(PathBuf, Role, BlobRef)> = Vec::new();
    let mut sent = 0u64;
    for (path, role) in files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("file")
            .to_string();
        let media = match role {
            Role::Artifact(_, m) => m,
            Role::IncusMeta => "application/x-xz",
        };
        let blob = if settled {
            late::hash_file(&path)?
        } else {
            let pushed = late::ensure_file(&api, &path, &name, Some(media), &opts)?;
            if pushed.present && pushed.sent == 0 {
                eprintln!("{name}: already on the server, not sent");
            }
            sent += pushed.sent;
            pushed.blob
        };
        eprintln!(
            "{}: {} ({})",
            path.display(),
            blob.digest,
            human_bytes(blob.size)
        );
        hashed.push((path, role, blob));
    }
    let attachments: Vec<(String, String, BlobRef)> = hashed
        .iter()
        .filter(|(_, r, _)| *r == Role::IncusMeta)
        .map(|(_, _, b)| {
            (
                "incus.tar.xz".to_string(),
                "application/x-xz".to_string(),
                b.clone(),
            )
        })
        .collect();
    let want: Vec<WantArtifact> = hashed
        .iter()
        .filter_map(|(_, r, b)| match r {
            Role::Artifact(format, media) => Some(WantArtifact {
                variant: args.variant.clone().unwrap_or_default(),
                os: os.clone(),
                arch: arch.clone(),
                format: format.to_string(),
                media_type: media.to_string(),
                blob: b.clone(),
                attachments: attachments.clone(),
            }),
            _ => None,
        })
        .collect();
    // After an upload, look again: another run may have built or published the version
    // meanwhile.
    let found = if settled {
        sync::judge(seen, &args.image, &args.version, &want)?
    } else {
        sync::inspect(&api, &args.image, &args.version, &want)?
    };
    let already = matches!(found, Found::Same { published: true }) && sent == 0;
    sync::build_and_publish(
        &api,
        &args.image,
        &serde_json::json!({}),
        &args.version,
        &want,
        found,
    )?;
    let mut moved = Vec::new();
    for alias in &args.alias {
        if let Some(before) = sync::set_alias(&api, &args.image, alias, &args.version)? {
            moved.push(format!("{alias} (was {before})"));
        }
    }

    if already {
        println!(
            "{} {} was already published with these files; nothing uploaded",
            args.image, args.version
        );
    } else {
        println!(
            "published {} {} ({} uploaded)",
            args.image,
            args.version,
            human_bytes(sent)
        );
    }
    for a in &want {
        println!("  artifact {}", a.describe());
        for (name, _, b) in &a.attachments {
            println!("    attachment {name} {} ({} bytes)", b.digest, b.size);
        }
    }
    for alias in &args.alias {
        println!("  alias {}/{alias} -> {}", args.image, args.version);
    }
    if !moved.is_empty() {
        println!("  moved: {}", moved.join(", "));
    }
    println!(
        "  manifest {}",
        api.url(&format!(
            "/v1/images/{}/versions/{}",
            super::seg(&args.image),
            super::seg(&args.version)
        ))
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_roles() {
        assert_eq!(
            role_of("disk.qcow2"),
            Some(Role::Artifact("qcow2", "application/x-qemu-disk"))
        );
        assert_eq!(
            role_of("rootfs.squashfs"),
            Some(Role::Artifact("squashfs", "application/vnd.squashfs"))
        );
        assert_eq!(role_of("incus.tar.xz"), Some(Role::IncusMeta));
        assert_eq!(role_of("disk.raw"), None);
        assert_eq!(role_of("lxd.tar.xz"), None);
    }
}
