//! Image files as the tools that build images write them, for the tests that push or serve
//! them: an `incus.tar.xz` holding a `metadata.yaml`, and a directory laid out the way
//! distrobuilder leaves one.

use super::output_ok;
use std::path::{Path, PathBuf};
use std::process::Command;

/// An `incus.tar.xz` as distrobuilder writes it: a `metadata.yaml` for `arch` and `os`, described
/// as `description`, and an empty `templates` directory, tarred reproducibly (equal arguments give
/// equal bytes) and compressed with xz. The tree is laid out in `scratch` first.
pub fn incus_tar_xz(scratch: &Path, arch: &str, os: &str, description: &str) -> Vec<u8> {
    std::fs::create_dir_all(scratch.join("templates")).unwrap();
    std::fs::write(
        scratch.join("metadata.yaml"),
        format!(
            "architecture: {arch}\ncreation_date: 1700000000\nexpiry_date: 0\nproperties:\n  architecture: {arch}\n  description: {description}\n  os: {os}\n  release: bookworm\n  variant: default\ntemplates: {{}}\n"
        ),
    )
    .unwrap();
    output_ok(Command::new("sh").arg("-c").arg(format!(
        "cd '{}' && tar --sort=name --mtime=@1700000000 --owner=0 --group=0 --numeric-owner -cf - metadata.yaml templates | xz -T1",
        scratch.display()
    )))
    .stdout
}

/// A directory `root/name` holding `disk.qcow2` (arbitrary bytes: imgsrv does not parse disks)
/// and the `incus.tar.xz` of a Debian image for `arch`.
pub fn image_dir(root: &Path, name: &str, disk: &[u8], arch: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("disk.qcow2"), disk).unwrap();
    let meta = incus_tar_xz(
        &root.join(format!("meta-{name}")),
        arch,
        "Debian",
        &format!("Debian {name}"),
    );
    std::fs::write(dir.join("incus.tar.xz"), meta).unwrap();
    dir
}
