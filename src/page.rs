//! The catalog page served at `/`: a pure function from a catalog listing and the server's
//! public base URL to one self-contained HTML document.
//!
//! The page has no scripts and loads nothing else (its style sheet is inline), so it works
//! from any network and under the strict `Content-Security-Policy` it is served with. Every
//! string that comes from the catalog or the request is HTML-escaped where it is written;
//! link targets are built from percent-encoded path segments and then escaped as well.
//! Download links are relative to the server, so they resolve whatever name a client used;
//! the copy-paste commands need an absolute URL and use the base URL given.

use crate::http::percent_encode_segment;
use crate::model::{Artifact, Attachment};
use crate::store::listing::{ListedImage, ListedVersion, Listing};
use crate::store::streams::{INCUS_DISK_FORMAT, INCUS_METADATA_NAME, INCUS_ROOTFS_FORMAT};
use crate::streams::DEFAULT_VARIANT;
use std::fmt::Write;

/// The name the page's commands give the Simple Streams remote.
const REMOTE: &str = "imgsrv";

/// Escapes text for HTML element content and double- or single-quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A byte count as people read it, with the exact count next to it.
fn size(bytes: i64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {} ({bytes} bytes)", UNITS[unit])
}

/// `2026-05-11 05:24 UTC` from a timestamp, for reading; the `datetime` attribute keeps the
/// exact RFC 3339 value.
fn date(t: crate::clock::Timestamp) -> (String, String) {
    let exact = t.rfc3339();
    let shown = format!("{} {} UTC", &exact[..10], &exact[11..16]);
    (exact, shown)
}

fn version_path(image: &str, version: &str) -> String {
    format!(
        "/v1/images/{}/versions/{}",
        percent_encode_segment(image),
        percent_encode_segment(version)
    )
}

fn artifact_download(image: &str, version: &str, a: &Artifact) -> (String, String) {
    let name = crate::validate::artifact_file_name(&a.format);
    let path = format!(
        "{}/artifacts/{}/download/{}",
        version_path(image, version),
        a.id,
        percent_encode_segment(&name)
    );
    (path, name)
}

fn attachment_download(image: &str, version: &str, a: &Artifact, t: &Attachment) -> String {
    format!(
        "{}/artifacts/{}/attachments/{}/download/{}",
        version_path(image, version),
        a.id,
        t.id,
        percent_encode_segment(&t.name)
    )
}

/// The Incus alias of a version or alias name for an artifact's variant.
fn incus_alias(image: &str, name: &str, variant: &str) -> String {
    if variant == DEFAULT_VARIANT {
        format!("{image}/{name}")
    } else {
        format!("{image}/{name}/{variant}")
    }
}

/// `incus launch` commands for the images Simple Streams lists for this version: a container
/// by default where there is one, a VM with `--vm`.
fn launch_commands(image: &str, name: &str, v: &ListedVersion) -> Vec<String> {
    let mut out = Vec::new();
    for a in &v.artifacts {
        let art = &a.artifact;
        if !a.attachments.iter().any(|t| t.name == INCUS_METADATA_NAME) {
            continue;
        }
        let alias = incus_alias(image, name, &art.variant);
        let cmd = match art.format.as_str() {
            INCUS_ROOTFS_FORMAT => format!("incus launch {REMOTE}:{alias} my-container"),
            INCUS_DISK_FORMAT => format!("incus launch {REMOTE}:{alias} my-vm --vm"),
            _ => continue,
        };
        if !out.contains(&cmd) {
            out.push(cmd);
        }
    }
    out
}

const STYLE: &str = "\
body{font-family:system-ui,sans-serif;margin:0 auto;padding:0 1rem 2rem;max-width:60rem;\
line-height:1.45;color:#1b1b1b;background:#fff}\
h1{margin:1rem 0 .25rem}h2{margin:2rem 0 .5rem;border-bottom:1px solid #ccc}\
h3{margin:1.25rem 0 .25rem}\
code,pre{font-family:ui-monospace,monospace;font-size:.9em}\
pre{background:#f4f4f4;padding:.5rem;overflow-x:auto;white-space:pre}\
.artifact{border:1px solid #ddd;border-radius:4px;padding:.5rem .75rem;margin:.5rem 0}\
dl{display:grid;grid-template-columns:max-content 1fr;gap:.1rem .75rem;margin:.25rem 0}\
dt{font-weight:600}dd{margin:0;min-width:0}\
.sha{overflow-wrap:anywhere;word-break:break-all}\
.muted{color:#555}\
@media (prefers-color-scheme:dark){body{color:#e8e8e8;background:#161616}\
pre{background:#262626}.artifact{border-color:#444}.muted{color:#aaa}a{color:#8ab4f8}}";

/// Renders the catalog page. `base` is the absolute URL of this server as clients reach it
/// (`https://images.example.org`), used only in the copy-paste commands.
pub fn render(listing: &Listing, base: &str) -> String {
    let mut h = String::with_capacity(8192);
    let b = escape(base);
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    h.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    h.push_str("<title>Images</title>\n<style>");
    h.push_str(STYLE);
    h.push_str("</style>\n</head>\n<body>\n<header>\n<h1>Images</h1>\n");
    let _ = writeln!(
        h,
        "<p class=\"muted\">Published images on <code>{b}</code>. Every download is also \
         described by the JSON API under <a href=\"/v1/images\">/v1/images</a> \
         (<a href=\"/openapi/v1.yaml\">contract</a>).</p>\n</header>"
    );
    h.push_str("<section id=\"use\">\n<h2>Use this server</h2>\n");
    let _ = writeln!(
        h,
        "<p>With Incus (the server must be reached over <code>https://</code>; pin a \
         self-signed certificate as <code>~/.config/incus/servercerts/{REMOTE}.crt</code> \
         first):</p>\n<pre id=\"remote-add\">incus remote add {REMOTE} {b} \
         --protocol=simplestreams\nincus image list {REMOTE}:</pre>"
    );
    h.push_str("</section>\n");
    if listing.images.is_empty() {
        h.push_str("<p id=\"empty\">No image has been published yet.</p>\n");
    }
    for image in &listing.images {
        render_image(&mut h, image, &b);
    }
    h.push_str("</body>\n</html>\n");
    h
}

fn render_image(h: &mut String, li: &ListedImage, b: &str) {
    let name = &li.image.name;
    let n = escape(name);
    let _ = writeln!(h, "<section class=\"image\" id=\"image-{n}\">");
    match li.image.display_name.as_deref() {
        Some(d) if crate::validate::non_blank(d) => {
            let _ = writeln!(h, "<h2>{} <code>{n}</code></h2>", escape(d));
        }
        _ => {
            let _ = writeln!(h, "<h2><code>{n}</code></h2>");
        }
    }
    if let Some(d) = li.image.description.as_deref() {
        let _ = writeln!(h, "<p>{}</p>", escape(d));
    }
    if !li.aliases.is_empty() {
        h.push_str("<p class=\"aliases\">Aliases: ");
        for (i, a) in li.aliases.iter().enumerate() {
            if i > 0 {
                h.push_str(", ");
            }
            let _ = write!(
                h,
                "<code class=\"alias\">{}</code> &#8594; <a href=\"#v-{n}-{}\">{}</a>",
                escape(&a.alias),
                escape(&a.version),
                escape(&a.version)
            );
        }
        h.push_str("</p>\n");
    }
    for v in &li.versions {
        render_version(h, name, v, b);
    }
    h.push_str("</section>\n");
}

fn render_version(h: &mut String, image: &str, v: &ListedVersion, b: &str) {
    let name = &v.version.version;
    let (n, ver) = (escape(image), escape(name));
    let (exact, shown) = date(v.version.published_at.unwrap_or(v.version.created_at));
    let _ = writeln!(
        h,
        "<article class=\"version\" id=\"v-{n}-{ver}\">\n<h3>{ver}</h3>\n\
         <p class=\"muted\">Published <time datetime=\"{exact}\">{shown}</time></p>"
    );
    for a in &v.artifacts {
        let art = &a.artifact;
        let (path, file) = artifact_download(image, name, art);
        let hex = art.primary_blob_digest.hex();
        let _ = writeln!(
            h,
            "<div class=\"artifact\">\n<dl>\n\
             <dt>Architecture</dt><dd class=\"arch\">{}</dd>\n\
             <dt>Format</dt><dd class=\"format\">{}</dd>\n\
             <dt>Variant</dt><dd>{}</dd>\n\
             <dt>OS</dt><dd>{}</dd>\n\
             <dt>Size</dt><dd>{}</dd>\n\
             <dt>sha256</dt><dd class=\"sha\"><code>{}</code></dd>\n\
             <dt>Download</dt><dd><a class=\"download\" href=\"{}\" data-sha256=\"{}\">{}</a>",
            escape(&art.architecture),
            escape(&art.format),
            escape(&art.variant),
            escape(&art.operating_system),
            size(art.primary_blob_size_bytes),
            escape(&hex),
            escape(&path),
            escape(&hex),
            escape(&file),
        );
        for t in &a.attachments {
            let d = t.blob_digest.hex();
            let _ = write!(
                h,
                "<br><a class=\"download\" href=\"{}\" data-sha256=\"{}\">{}</a> \
                 <span class=\"muted\">({}, sha256 <code class=\"sha\">{}</code>)</span>",
                escape(&attachment_download(image, name, art, t)),
                escape(&d),
                escape(&t.name),
                size(t.blob_size_bytes),
                escape(&d),
            );
        }
        h.push_str("</dd>\n");
        if !art.incus_requirements.is_empty() {
            h.push_str("<dt>Incus requirements</dt><dd>");
            for (i, (k, val)) in art.incus_requirements.iter().enumerate() {
                if i > 0 {
                    h.push_str(", ");
                }
                let _ = write!(h, "<code>{}={}</code>", escape(k), escape(val));
            }
            h.push_str("</dd>\n");
        }
        let _ = writeln!(
            h,
            "</dl>\n<pre>curl -fLO {b}{}</pre>\n</div>",
            escape(&path)
        );
    }
    let launch = launch_commands(image, name, v);
    if !launch.is_empty() {
        h.push_str("<pre class=\"launch\">");
        h.push_str(&escape(&launch.join("\n")));
        h.push_str("</pre>\n");
    }
    h.push_str("</article>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Timestamp;
    use crate::digest::Digest;
    use crate::model::{Alias, ArtifactWithAttachments, Image, ImageVersion, VersionState};
    use crate::store::listing::{ListedImage, ListedVersion};
    use uuid::Uuid;

    fn at(s: &str) -> Timestamp {
        Timestamp::parse_rfc3339(s).unwrap()
    }

    fn listing(display: &str, version: &str, alias: &str) -> Listing {
        let t = at("2026-05-11T05:24:59Z");
        let image = Image {
            id: Uuid::from_u128(1),
            name: "img".into(),
            display_name: Some(display.into()),
            description: None,
            created_at: t,
            updated_at: t,
        };
        let v = ImageVersion {
            id: Uuid::from_u128(2),
            image_id: image.id,
            version: version.into(),
            state: VersionState::Published,
            published_at: Some(t),
            created_at: t,
            updated_at: t,
        };
        let artifact = |n: u128, format: &str| Artifact {
            id: Uuid::from_u128(n),
            version_id: v.id,
            variant: "default".into(),
            operating_system: "debian".into(),
            architecture: "x86_64".into(),
            format: format.into(),
            primary_blob_digest: Digest::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap(),
            primary_blob_size_bytes: 3 * 1024 * 1024,
            primary_media_type: "application/octet-stream".into(),
            incus_requirements: Default::default(),
            created_at: t,
            updated_at: t,
        };
        let meta = |n: u128| Attachment {
            id: Uuid::from_u128(n),
            artifact_id: Uuid::from_u128(n - 0x100),
            name: "incus.tar.xz".into(),
            media_type: "application/x-xz".into(),
            blob_digest: Digest::parse(&format!("sha256:{}", "cd".repeat(32))).unwrap(),
            blob_size_bytes: 300,
            created_at: t,
            updated_at: t,
        };
        Listing {
            generation: 3,
            images: vec![ListedImage {
                aliases: vec![Alias {
                    id: Uuid::from_u128(9),
                    image_id: image.id,
                    alias: alias.into(),
                    version_id: v.id,
                    version: version.into(),
                    created_at: t,
                    updated_at: t,
                }],
                image,
                versions: vec![ListedVersion {
                    artifacts: vec![
                        ArtifactWithAttachments {
                            artifact: artifact(0xa1, "qcow2"),
                            attachments: vec![meta(0x1a1)],
                        },
                        ArtifactWithAttachments {
                            artifact: artifact(0xa2, "squashfs"),
                            attachments: vec![meta(0x1a2)],
                        },
                    ],
                    version: v,
                }],
            }],
        }
    }

    #[test]
    fn escapes_everything_from_the_catalog() {
        let page = render(
            &listing("<script>alert(1)</script>", "1.0", "latest"),
            "https://x\"><b>",
        );
        assert!(!page.contains("<script>"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!page.contains("x\"><b>"));
        assert!(page.contains("https://x&quot;&gt;&lt;b&gt;"));
    }

    #[test]
    fn lists_artifacts_links_and_commands() {
        let page = render(
            &listing("Debian", "1.0+b1", "latest"),
            "https://img.example",
        );
        assert!(
            page.contains("<time datetime=\"2026-05-11T05:24:59Z\">2026-05-11 05:24 UTC</time>")
        );
        assert!(page.contains(
            "href=\"/v1/images/img/versions/1.0%2Bb1/artifacts/00000000-0000-0000-0000-0000000000a1/download/disk.qcow2\""
        ));
        assert!(page.contains("/download/rootfs.squashfs\""));
        assert!(
            page.contains(
                "/attachments/00000000-0000-0000-0000-0000000001a1/download/incus.tar.xz\""
            )
        );
        assert!(page.contains("3.0 MiB (3145728 bytes)"));
        assert!(page.contains(&"ab".repeat(32)));
        assert!(
            page.contains("incus remote add imgsrv https://img.example --protocol=simplestreams")
        );
        assert!(page.contains("incus launch imgsrv:img/1.0+b1 my-vm --vm"));
        assert!(page.contains("incus launch imgsrv:img/1.0+b1 my-container"));
        assert!(page.contains("curl -fLO https://img.example/v1/images/img/versions/1.0%2Bb1/"));
        assert!(page.contains(
            "<code class=\"alias\">latest</code> &#8594; <a href=\"#v-img-1.0+b1\">1.0+b1</a>"
        ));
        // Self-contained: nothing is loaded from elsewhere and nothing runs.
        assert!(!page.contains("<script") && !page.contains("<link") && !page.contains("src="));
    }

    #[test]
    fn empty_catalog_says_so() {
        let page = render(&Listing::default(), "http://127.0.0.1:8080");
        assert!(page.contains("No image has been published yet."));
        assert!(page.ends_with("</html>\n"));
    }

    #[test]
    fn sizes() {
        assert_eq!(size(0), "0 bytes");
        assert_eq!(size(1023), "1023 bytes");
        assert_eq!(size(1536), "1.5 KiB (1536 bytes)");
        assert_eq!(size(5 << 30), "5.0 GiB (5368709120 bytes)");
    }
}
