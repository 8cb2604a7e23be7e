//! Reads `architecture` and `os` from the `metadata.yaml` inside an `incus.tar.xz`, so that
//! `push` can default them to what distrobuilder recorded.
//!
//! The YAML read is deliberately minimal instead of a YAML crate: distrobuilder writes this file
//! itself with a fixed shape (top-level `architecture:`, `properties:` with two-space indented
//! scalar members), the two values we want are plain scalars, and every other member is ignored.
//! A YAML library would add a sizeable dependency to a static binary for two strings; a file
//! whose shape this reader does not understand simply yields nothing, and `--os`/`--arch` are
//! then required.

use super::{ClientError, Result};
use std::io::Read;
use std::path::Path;

/// The two members push needs; either may be missing.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub architecture: Option<String>,
    pub os: Option<String>,
}

/// The metadata tarball is a few kilobytes (metadata.yaml and templates); anything that
/// decompresses to more than this is not one.
const MAX_TAR: u64 = 64 * 1024 * 1024;

/// Decompresses `path` (xz), finds `metadata.yaml` in the tar and reads it.
pub fn read(path: &Path) -> Result<Meta> {
    let bad = |e: String| {
        ClientError::usage(format!(
            "{} is not a readable incus.tar.xz: {e}",
            path.display()
        ))
    };
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut tar = Vec::new();
    let mut limited = LimitedWriter {
        out: &mut tar,
        left: MAX_TAR,
    };
    lzma_rs::xz_decompress(&mut std::io::BufReader::new(file), &mut limited)
        .map_err(|e| bad(format!("xz: {e}")))?;
    let mut archive = tar::Archive::new(tar.as_slice());
    for entry in archive.entries().map_err(|e| bad(e.to_string()))? {
        let mut entry = entry.map_err(|e| bad(e.to_string()))?;
        let name = entry.path().map_err(|e| bad(e.to_string()))?.into_owned();
        if name.components().collect::<Vec<_>>()
            == Path::new("metadata.yaml").components().collect::<Vec<_>>()
        {
            let mut text = String::new();
            entry
                .read_to_string(&mut text)
                .map_err(|e| bad(format!("metadata.yaml: {e}")))?;
            return Ok(parse_yaml(&text));
        }
    }
    Err(bad("it has no metadata.yaml".into()))
}

struct LimitedWriter<'a> {
    out: &'a mut Vec<u8>,
    left: u64,
}

impl std::io::Write for LimitedWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() as u64 > self.left {
            return Err(std::io::Error::other("decompresses to more than 64 MiB"));
        }
        self.left -= buf.len() as u64;
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `properties.architecture` (else the top-level `architecture`) and `properties.os`.
pub fn parse_yaml(text: &str) -> Meta {
    let mut top_arch = None;
    let mut meta = Meta::default();
    let mut in_properties = false;
    for line in text.lines() {
        let content = line.split(" #").next().unwrap_or("");
        if content.trim().is_empty() || content.trim_start().starts_with('#') {
            continue;
        }
        let indented = content.starts_with(' ') || content.starts_with('\t');
        if !indented {
            in_properties = content.trim_end() == "properties:";
            if let Some(v) = scalar(content, "architecture") {
                top_arch = Some(v);
            }
            continue;
        }
        if in_properties {
            if let Some(v) = scalar(content.trim_start(), "architecture") {
                meta.architecture = Some(v);
            } else if let Some(v) = scalar(content.trim_start(), "os") {
                meta.os = Some(v);
            }
        }
    }
    if meta.architecture.is_none() {
        meta.architecture = top_arch;
    }
    meta
}

/// The value of `key: value` when the line is exactly that, unquoted or quoted.
fn scalar(line: &str, key: &str) -> Option<String> {
    let rest = line.strip_prefix(key)?.strip_prefix(':')?;
    let v = rest.trim();
    let v = v
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .or_else(|| v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')))
        .unwrap_or(v);
    (!v.is_empty()).then(|| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(yaml: &str, arch: Option<&str>, os: Option<&str>) {
        let m = parse_yaml(yaml);
        assert_eq!(m.architecture.as_deref(), arch, "{yaml}");
        assert_eq!(m.os.as_deref(), os, "{yaml}");
    }

    #[test]
    fn distrobuilder_shapes() {
        check(
            "architecture: x86_64\ncreation_date: 1700000000\nproperties:\n  architecture: x86_64\n  description: Debian bookworm\n  os: Debian\n  release: bookworm\ntemplates: {}\n",
            Some("x86_64"),
            Some("Debian"),
        );
        check(
            "architecture: aarch64\nproperties:\n  os: \"ubuntu\"\n",
            Some("aarch64"),
            Some("ubuntu"),
        );
        check(
            "properties:\n    architecture: 'amd64'   # quoted\n    os: alpine\n",
            Some("amd64"),
            Some("alpine"),
        );
        // `os` outside properties is not the image's OS; nested maps are not mistaken for it.
        check(
            "os: nope\ntemplates:\n  /etc/hostname:\n    os: nope\n",
            None,
            None,
        );
        check("", None, None);
    }
}
