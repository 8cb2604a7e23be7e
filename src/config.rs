//! Validated settings: flags first, then `IMGSRV_*` environment variables, then defaults
//! (docs/api.md, decision 12).

use crate::cli::ServeArgs;
use crate::clock::parse_duration;
use crate::log::Format;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub data_dir: PathBuf,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub metrics_listen: Option<String>,
    /// The base URL the catalog page's commands show, in place of one made from each
    /// request's `Host`.
    pub public_url: Option<String>,
    pub upload_ttl: Duration,
    pub sweep_interval: Duration,
    /// How long a retired version's files stay downloadable by their direct URLs.
    pub retire_grace: Duration,
    pub log_format: Format,
    pub verbosity: u8,
    pub http_threads: usize,
    pub publish_workers: usize,
    pub cache_bytes: usize,
    pub limits: crate::frontdoor::Limits,
    pub shutdown_timeout: Duration,
    /// Bytes that writes must leave free on the data directory's filesystem.
    pub disk_reserve: u64,
    /// The background scrub's pass interval and read rate.
    pub scrub: crate::scrub::Settings,
}

/// The data directory: the flag, else `IMGSRV_DATA_DIR`, else systemd's `$STATE_DIRECTORY`
/// (its first entry), else `./imgsrv-data`. Shared by `serve` and the operator commands, so
/// that `imgsrv backup` run beside a service finds the service's directory.
pub fn data_dir(flag: Option<String>) -> PathBuf {
    let dir = pick(flag, "IMGSRV_DATA_DIR")
        .or_else(|| {
            std::env::var("STATE_DIRECTORY")
                .ok()
                .map(|s| s.split(':').next().unwrap_or("").to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "./imgsrv-data".into());
    PathBuf::from(dir)
}

fn pick(flag: Option<String>, env: &str) -> Option<String> {
    flag.or_else(|| std::env::var(env).ok())
}

fn number<T: std::str::FromStr>(flag: Option<T>, env: &str, default: T) -> Result<T, String> {
    if let Some(v) = flag {
        return Ok(v);
    }
    match std::env::var(env) {
        Ok(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("{env}={s:?} is not a number")),
        Err(_) => Ok(default),
    }
}

fn duration(
    flag: Option<String>,
    env: &str,
    default: &str,
    what: &str,
) -> Result<Duration, String> {
    let raw = pick(flag, env).unwrap_or_else(|| default.to_string());
    match parse_duration(&raw) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(format!(
            "{what} {raw:?} is not a duration such as 24h, 30m, 15s or 500ms"
        )),
    }
}

/// Parses a size such as `0`, `4096`, `512KiB`, `256MiB`, `2GiB`, `1TiB` (binary units; `K`,
/// `M`, `G`, `T` mean the same) or `500MB`, `2GB` (decimal units).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Checks a public URL (`http://` or `https://`, a host and optional port, an optional path
/// prefix) and drops a trailing `/`, since the page appends paths that start with one. Query
/// strings and fragments are refused: they would end up in the middle of every command.
fn public_url(raw: &str) -> Result<String, String> {
    let bad = |why: &str| {
        Err(format!(
            "public URL {raw:?} {why}; give one such as https://images.example.org"
        ))
    };
    let Some((scheme, rest)) = raw.split_once("://") else {
        return bad("has no scheme");
    };
    if scheme != "http" && scheme != "https" {
        return bad("must start with http:// or https://");
    }
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if !crate::http::is_host(host) {
        return bad("has no valid host name or address");
    }
    if !path
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"/.-_~%".contains(&c))
    {
        return bad("may hold only a host and a path prefix, without a query or fragment");
    }
    Ok(format!("{scheme}://{host}{}", path.trim_end_matches('/')))
}

impl Config {
    pub fn from_args(a: ServeArgs) -> Result<Config, String> {
        let listen = pick(a.listen, "IMGSRV_LISTEN").unwrap_or_else(|| "127.0.0.1:8080".into());
        let data_dir = data_dir(a.data_dir);
        let tls_cert = pick(a.tls_cert, "IMGSRV_TLS_CERT")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        let tls_key = pick(a.tls_key, "IMGSRV_TLS_KEY")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        if tls_cert.is_some() != tls_key.is_some() {
            return Err("--tls-cert and --tls-key must be given together".into());
        }
        let metrics_listen = pick(a.metrics_listen, "IMGSRV_METRICS_LISTEN")
            .unwrap_or_else(|| "127.0.0.1:9464".into());
        let metrics_listen = (!metrics_listen.is_empty()).then_some(metrics_listen);
        let public_url = match pick(a.public_url, "IMGSRV_PUBLIC_URL") {
            Some(u) if !u.is_empty() => Some(public_url(&u)?),
            _ => None,
        };
        let log_format = match pick(a.log_format, "IMGSRV_LOG_FORMAT").as_deref() {
            None | Some("text") => Format::Text,
            Some("json") => Format::Json,
            Some(other) => return Err(format!("log format {other:?} must be text or json")),
        };
        // Small on purpose: downloads read each 1 MiB chunk once, so caching their pages only
        // costs memory (with 64 MiB, a single download held the process at 190-250 MiB, with 8
        // MiB at 24 MiB, for the same CPU per GiB); the catalog's small pages fit, and the
        // kernel page cache serves the rest.
        let cache_mib: usize = number(a.cache_mib, "IMGSRV_CACHE_MIB", 8)?;
        let http_threads = number(a.http_threads, "IMGSRV_HTTP_THREADS", 32)?;
        let publish_workers = number(a.publish_workers, "IMGSRV_PUBLISH_WORKERS", 2)?;
        let reserve_raw =
            pick(a.disk_reserve, "IMGSRV_DISK_RESERVE").unwrap_or_else(|| "256MiB".into());
        let disk_reserve = parse_size(&reserve_raw).ok_or_else(|| {
            format!("disk reserve {reserve_raw:?} is not a size such as 256MiB, 2GiB or 0")
        })?;
        let rate_raw = pick(a.scrub_rate, "IMGSRV_SCRUB_RATE").unwrap_or_else(|| "64MiB".into());
        let scrub_rate = parse_size(&rate_raw).ok_or_else(|| {
            format!("scrub rate {rate_raw:?} is not a size per second such as 64MiB, 1GiB or 0")
        })?;
        let scrub = crate::scrub::Settings {
            interval: duration(
                a.scrub_interval,
                "IMGSRV_SCRUB_INTERVAL",
                "7d",
                "scrub interval",
            )?,
            rate: scrub_rate,
        };
        if http_threads == 0 || publish_workers == 0 {
            return Err("thread counts must be at least 1".into());
        }
        Ok(Config {
            listen,
            data_dir,
            tls_cert,
            tls_key,
            metrics_listen,
            public_url,
            upload_ttl: duration(a.upload_ttl, "IMGSRV_UPLOAD_TTL", "24h", "upload TTL")?,
            sweep_interval: duration(
                a.sweep_interval,
                "IMGSRV_SWEEP_INTERVAL",
                "1m",
                "sweep interval",
            )?,
            retire_grace: duration(a.retire_grace, "IMGSRV_RETIRE_GRACE", "2h", "retire grace")?,
            log_format,
            disk_reserve,
            scrub,
            verbosity: number(a.verbosity, "IMGSRV_VERBOSITY", 2)?,
            http_threads,
            publish_workers,
            cache_bytes: cache_mib.max(1) * 1024 * 1024,
            shutdown_timeout: duration(
                a.shutdown_timeout,
                "IMGSRV_SHUTDOWN_TIMEOUT",
                "30s",
                "shutdown timeout",
            )?,
            limits: crate::frontdoor::Limits {
                max_connections: number(a.max_connections, "IMGSRV_MAX_CONNECTIONS", 4096)?.max(1),
                header_timeout: duration(
                    a.header_timeout,
                    "IMGSRV_HEADER_TIMEOUT",
                    "30s",
                    "header timeout",
                )?,
                idle_timeout: duration(
                    a.idle_timeout,
                    "IMGSRV_IDLE_TIMEOUT",
                    "60s",
                    "idle timeout",
                )?,
                io_timeout: duration(a.io_timeout, "IMGSRV_IO_TIMEOUT", "60s", "I/O timeout")?,
                ..Default::default()
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_size, public_url};

    #[test]
    fn public_urls() {
        for (raw, want) in [
            (
                "https://images.example.org",
                Some("https://images.example.org"),
            ),
            (
                "https://images.example.org/",
                Some("https://images.example.org"),
            ),
            ("http://10.0.0.5:8080", Some("http://10.0.0.5:8080")),
            (
                "https://[2001:db8::1]:8443",
                Some("https://[2001:db8::1]:8443"),
            ),
            (
                "https://example.org/images/",
                Some("https://example.org/images"),
            ),
            ("images.example.org", None),
            ("ftp://images.example.org", None),
            ("https://", None),
            ("https:///images", None),
            ("https://example.org/?a=b", None),
            ("https://example.org/#top", None),
            ("https://exa mple.org", None),
            ("https://user@example.org", None),
        ] {
            assert_eq!(public_url(raw).ok().as_deref(), want, "{raw}");
        }
    }

    #[test]
    fn sizes() {
        for (s, want) in [
            ("0", Some(0)),
            ("4096", Some(4096)),
            ("16MiB", Some(16 << 20)),
            ("16M", Some(16 << 20)),
            ("2GiB", Some(2 << 30)),
            ("500MB", Some(500_000_000)),
            ("1TiB", Some(1 << 40)),
            ("", None),
            ("MiB", None),
            ("12 parsecs", None),
            ("99999999999999999999GiB", None),
        ] {
            assert_eq!(parse_size(s), want, "{s}");
        }
    }
}
