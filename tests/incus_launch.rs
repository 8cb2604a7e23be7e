//! Instances launched by a real Incus daemon from images imgsrv publishes: a busybox
//! container (built here with `mksquashfs` from `busybox-static`), the `latest` alias, an
//! alias move reaching a host through `incus image refresh`, and a unified image (container and
//! VM under one alias). VMs are only launched where the host has `/dev/vhost-vsock`.

use crate::incus::{Client, WithDaemon, fixture};
use crate::incusd::Daemon;
use crate::util::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

/// The file only the image built with this marker contains.
const MARKER: &str = "/etc/imgsrv-marker";

/// A container root file system: a static busybox as `/sbin/init` (kept alive by one
/// respawning `sleep`, so the container stays running without any other program) and
/// `MARKER` holding `marker`. Built reproducibly, so equal markers give equal bytes.
fn rootfs(dir: &Path, name: &str, marker: &str) -> Vec<u8> {
    let root = dir.join(name).join("root");
    for d in [
        "bin", "sbin", "etc", "dev", "proc", "sys", "tmp", "root", "run",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let busybox = Command::new("sh")
        .args(["-c", "command -v busybox"])
        .output()
        .unwrap();
    let busybox = PathBuf::from(String::from_utf8(busybox.stdout).unwrap().trim());
    let bytes = std::fs::read(&busybox).unwrap();
    // A dynamically linked busybox would find no C library in this root file system.
    assert!(
        !has_interpreter(&bytes),
        "{} is not static: install busybox-static",
        busybox.display()
    );
    std::fs::write(root.join("bin/busybox"), &bytes).unwrap();
    std::fs::set_permissions(
        root.join("bin/busybox"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    std::os::unix::fs::symlink("../bin/busybox", root.join("sbin/init")).unwrap();
    std::fs::write(
        root.join("etc/inittab"),
        "::respawn:/bin/busybox sleep 86400\n",
    )
    .unwrap();
    std::fs::write(
        root.join(MARKER.trim_start_matches('/')),
        format!("{marker}\n"),
    )
    .unwrap();
    let out = dir.join(name).join("rootfs.squashfs");
    let st = Command::new("mksquashfs")
        .arg(&root)
        .arg(&out)
        .args(["-noappend", "-all-root", "-quiet", "-no-progress"])
        .args(["-mkfs-time", "1700000000", "-all-time", "1700000000"])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "mksquashfs failed");
    std::fs::read(out).unwrap()
}

/// Whether a 64-bit little-endian ELF file names a program interpreter (`PT_INTERP`), that is,
/// whether it is dynamically linked.
fn has_interpreter(elf: &[u8]) -> bool {
    assert!(
        elf.starts_with(b"\x7fELF\x02\x01"),
        "not a 64-bit little-endian ELF file"
    );
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count).any(|i| {
        let at = phoff + i * size;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == 3
    })
}

fn combined(meta: &[u8], root: &[u8]) -> String {
    let mut both = meta.to_vec();
    both.extend_from_slice(root);
    sha256_hex(&both)
}

/// The marker file of a running instance, read with `incus exec`.
fn marker_of(c: &Client, instance: &str) -> String {
    c.ok(&["exec", instance, "--", "/bin/busybox", "cat", MARKER])
        .trim()
        .to_string()
}

/// The fingerprint of a daemon's local image alias.
fn local_fingerprint(c: &Client, alias: &str) -> String {
    let out = c.ok(&["image", "info", &format!("local:{alias}")]);
    out.lines()
        .find_map(|l| l.strip_prefix("Fingerprint: "))
        .unwrap_or_else(|| panic!("no fingerprint in: {out}"))
        .trim()
        .to_string()
}

fn instance_type(c: &Client, instance: &str) -> String {
    let list: Value = serde_json::from_str(&c.ok(&["list", instance, "--format", "json"])).unwrap();
    list[0]["type"].as_str().unwrap_or_default().to_string()
}

/// Makes the daemon's cached Simple Streams documents look `age` old. The daemon keeps them
/// for an hour by file age alone and offers no setting to shorten that, so this stands in for
/// the hour passing; it returns how many cached files there were, so a test can tell that the
/// cache it means to age exists.
fn age_daemon_cache(daemon: &Daemon, age: Duration) -> usize {
    let mut aged = 0;
    let mut stack = vec![daemon.dir().join("cache")];
    let then = SystemTime::now() - age;
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(f) = std::fs::File::options().write(true).open(&p) {
                f.set_modified(then).unwrap();
                aged += 1;
            }
        }
    }
    aged
}

/// What the launch tests need besides the daemon.
const TOOLS: [&str; 7] = [
    "incus",
    "mksquashfs",
    "busybox",
    "qemu-img",
    "xz",
    "openssl",
    "curl",
];

#[test]
fn incusd_launches_containers_and_follows_a_moved_alias() {
    let Some(t) = WithDaemon::start(&TOOLS) else {
        return;
    };
    let (api, work) = (&t.api, t.work.path());
    let meta = fixture(work, "meta", "x86_64", 1).meta;
    let root1 = rootfs(work, "v1", "imgsrv-launch-1.0");
    let root2 = rootfs(work, "v2", "imgsrv-launch-2.0");
    let (fp1, fp2) = (combined(&meta, &root1), combined(&meta, &root2));
    api.publish("bb", "1.0", &[("squashfs", &root1, &meta, Value::Null)]);
    api.put_alias("bb", "latest", "1.0");
    let c = t.client();

    // A host that follows `latest`. This comes first on purpose: the daemon records where an
    // image came from only when it first stores it, so an image already pulled by version (a
    // launch of `bb/1.0`) would keep following `bb/1.0`.
    c.ok(&[
        "image",
        "copy",
        "imgsrv:bb/latest",
        "local:",
        "--auto-update",
        "--alias",
        "x",
    ]);
    assert_eq!(local_fingerprint(&c, "x"), fp1);
    let source = c.ok(&["image", "info", "local:x"]);
    assert!(source.contains("Alias: bb/latest"), "{source}");

    // A plain launch gives a container, running the published root file system.
    c.ok(&["launch", "imgsrv:bb/1.0", "c1"]);
    assert_eq!(instance_type(&c, "c1"), "container");
    assert_eq!(marker_of(&c, "c1"), "imgsrv-launch-1.0");
    c.ok(&["launch", "imgsrv:bb/latest", "c2"]);
    assert_eq!(marker_of(&c, "c2"), "imgsrv-launch-1.0");

    api.publish("bb", "2.0", &[("squashfs", &root2, &meta, Value::Null)]);
    api.put_alias("bb", "latest", "2.0");
    // Within the daemon's hour the move is not seen: it still has the old documents.
    let out = c.ok(&["image", "refresh", "x"]);
    assert_eq!(local_fingerprint(&c, "x"), fp1, "refresh: {out}");
    // Once its cached documents are an hour old, a refresh (what the 6-hourly auto-update
    // does) fetches them again, follows the alias and replaces the image.
    assert!(
        age_daemon_cache(&t.daemon, Duration::from_secs(2 * 3600)) > 0,
        "the daemon cached no Simple Streams documents under {}",
        t.daemon.dir().join("cache").display()
    );
    let out = c.ok(&["image", "refresh", "x"]);
    assert_eq!(local_fingerprint(&c, "x"), fp2, "refresh: {out}");
    c.ok(&["launch", "x", "c3"]);
    assert_eq!(marker_of(&c, "c3"), "imgsrv-launch-2.0");
    t.daemon.shutdown();
}

#[test]
fn incusd_launches_the_container_of_a_unified_image() {
    let Some(t) = WithDaemon::start(&TOOLS) else {
        return;
    };
    let vm = fixture(t.work.path(), "vm", "x86_64", 64);
    let root = rootfs(t.work.path(), "ct", "imgsrv-unified");
    t.api.publish(
        "uni",
        "1.0",
        &[
            ("squashfs", &root, &vm.meta, Value::Null),
            ("qcow2", &vm.disk, &vm.meta, json!({"secureboot": "false"})),
        ],
    );
    t.api.put_alias("uni", "latest", "1.0");
    let c = t.client();

    // One alias, two image types: the container by default, the VM with `--vm`.
    let ct = c.ok(&["image", "info", "imgsrv:uni/latest"]);
    let vmi = c.ok(&["image", "info", "imgsrv:uni/latest", "--vm"]);
    assert!(ct.contains("Type: container"), "{ct}");
    assert!(vmi.contains("Type: virtual-machine"), "{vmi}");
    assert!(
        ct.contains(&format!("Fingerprint: {}", combined(&vm.meta, &root))),
        "{ct}"
    );
    assert!(
        vmi.contains(&format!("Fingerprint: {}", combined(&vm.meta, &vm.disk))),
        "{vmi}"
    );
    // The publisher's requirement reaches Incus.
    assert!(vmi.contains("requirements.secureboot: false"), "{vmi}");

    c.ok(&["launch", "imgsrv:uni/latest", "u1"]);
    assert_eq!(instance_type(&c, "u1"), "container");
    assert_eq!(marker_of(&c, "u1"), "imgsrv-unified");

    if Path::new("/dev/vhost-vsock").exists() {
        c.ok(&["launch", "imgsrv:uni/latest", "u2", "--vm"]);
        assert_eq!(instance_type(&c, "u2"), "virtual-machine");
    } else {
        eprintln!(
            "\n!!!!!!!! SKIPPING the VM launch: this host has no /dev/vhost-vsock, so Incus \
             cannot start VMs here !!!!!!!!\n"
        );
    }
    t.daemon.shutdown();
}
