//! The patterns of docs/api.md section 1.1, written as small hand-checked predicates (they are
//! simple character classes, so a regex engine would be a dependency without a benefit), each
//! next to the check that answers a catalog request breaking it with the rule it broke.

use crate::digest::Digest;
use crate::error::{Error, Result};

fn bytes_match(s: &str, max_len: usize, first: fn(u8) -> bool, rest: fn(u8) -> bool) -> bool {
    let b = s.as_bytes();
    !b.is_empty() && b.len() <= max_len && first(b[0]) && b[1..].iter().all(|&c| rest(c))
}

fn lower_alnum(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// A catalog request that breaks a rule: every catalog check answers with this prefix.
pub fn catalog_invalid(msg: impl std::fmt::Display) -> Error {
    Error::invalid(format!("catalog invalid input: {msg}"))
}

fn must_match(matches: bool, what: &str, pattern: &str) -> Result<()> {
    if matches {
        Ok(())
    } else {
        Err(catalog_invalid(format!("{what} must match {pattern}")))
    }
}

pub const IMAGE_NAME_PATTERN: &str = "^[a-z0-9][a-z0-9._-]{0,127}$";
pub const VERSION_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._+:-]{0,127}$";
pub const ALIAS_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$";
pub const TOKEN_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$";

/// `^[a-z0-9][a-z0-9._-]{0,127}$`
pub fn image_name(s: &str) -> bool {
    bytes_match(s, 128, lower_alnum, |c| {
        lower_alnum(c) || matches!(c, b'.' | b'_' | b'-')
    })
}

pub fn check_image_name(name: &str) -> Result<()> {
    must_match(image_name(name), "image name", IMAGE_NAME_PATTERN)
}

/// `^[A-Za-z0-9][A-Za-z0-9._+:-]{0,127}$`
pub fn version(s: &str) -> bool {
    bytes_match(
        s,
        128,
        |c| c.is_ascii_alphanumeric(),
        |c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'+' | b':' | b'-'),
    )
}

pub fn check_version(v: &str) -> Result<()> {
    must_match(version(v), "version", VERSION_PATTERN)
}

/// `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`
pub fn alias(s: &str) -> bool {
    bytes_match(
        s,
        64,
        |c| c.is_ascii_alphanumeric(),
        |c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'),
    )
}

pub fn check_alias(a: &str) -> Result<()> {
    must_match(alias(a), "alias", ALIAS_PATTERN)
}

/// `^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$`: variant, operating system, architecture, attachment name.
pub fn token(s: &str) -> bool {
    bytes_match(
        s,
        64,
        |c| c.is_ascii_alphanumeric(),
        |c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'+' | b'-'),
    )
}

/// `what` names the member (variant, architecture, ...) in the answer.
pub fn check_token(what: &str, value: &str) -> Result<()> {
    must_match(token(value), what, TOKEN_PATTERN)
}

/// What a digest must look like (`crate::digest::Digest::parse` checks it).
pub const DIGEST_RULE: &str = "digest must match sha256:<64 lowercase hex chars>";

/// A digest named by a catalog request.
pub fn check_digest(d: &str) -> Result<Digest> {
    Digest::parse(d).ok_or_else(|| catalog_invalid(DIGEST_RULE))
}

/// Artifact formats: disk images (`raw`, `raw.gz`, `qcow2`) and a container root file system
/// (`squashfs`).
pub const FORMATS: [&str; 4] = ["raw", "raw.gz", "qcow2", "squashfs"];

/// The file name an artifact of this format is downloaded as (the last segment of its
/// file-name route). A container root file system is `rootfs.squashfs`, the name distrobuilder
/// gives it, so that `incus image export` writes files a person recognises; disks are
/// `disk.<format>`.
pub fn artifact_file_name(format: &str) -> String {
    if format == "squashfs" {
        "rootfs.squashfs".to_string()
    } else {
        format!("disk.{format}")
    }
}

/// Most Incus requirements an artifact may declare.
pub const MAX_INCUS_REQUIREMENTS: usize = 16;

/// An Incus requirement value: 1 to 128 printable ASCII characters. Incus stores requirements
/// as image properties, so only plain text belongs there.
pub fn incus_requirement_value(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|c| (0x20..0x7f).contains(&c))
}

/// Non-blank after trimming ASCII whitespace.
pub fn non_blank(s: &str) -> bool {
    !s.trim_matches(|c: char| c.is_ascii_whitespace()).is_empty()
}

/// An optional text member (a display name, a description) is absent or not blank.
pub fn check_optional_text(what: &str, value: &Option<String>) -> Result<()> {
    match value {
        Some(v) if !non_blank(v) => Err(catalog_invalid(format!("{what} must not be blank"))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        type Check = fn(&str) -> bool;
        let cases: &[(Check, &str, bool)] = &[
            (image_name, "debian-bookworm", true),
            (image_name, "Debian", false),
            (image_name, "-x", false),
            (image_name, "a.b_c-d", true),
            (image_name, &"a".repeat(128), true),
            (image_name, &"a".repeat(129), false),
            (image_name, "", false),
            (version, "12.5.0+build:1", true),
            (version, "_1", false),
            (version, "1 2", false),
            (alias, "latest", true),
            (alias, "v1+x", false),
            (alias, "a:b", false),
            (alias, &"a".repeat(65), false),
            (token, "x86_64", true),
            (token, "arm64+v8", true),
            (token, "a/b", false),
            (incus_requirement_value, "false", true),
            (incus_requirement_value, "", false),
            (incus_requirement_value, "a\nb", false),
            (incus_requirement_value, &"a".repeat(129), false),
        ];
        for (f, input, want) in cases {
            assert_eq!(f(input), *want, "{input:?}");
        }
    }

    #[test]
    fn file_names() {
        assert_eq!(artifact_file_name("qcow2"), "disk.qcow2");
        assert_eq!(artifact_file_name("raw.gz"), "disk.raw.gz");
        assert_eq!(artifact_file_name("squashfs"), "rootfs.squashfs");
    }
}
