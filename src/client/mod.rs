//! The command-line clients `imgsrv push` and `imgsrv mirror`: HTTP against an imgsrv server,
//! the token, and errors that end in a documented exit code.
//!
//! Nothing in the server depends on this module; it speaks to a server only through the public
//! HTTP API, exactly as curl would, so a client of one release works against another.

pub mod incus_meta;
pub mod late;
pub mod mirror;
pub mod progress;
pub mod push;
pub mod sync;
pub mod tls;
pub mod upload;

use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Why a client command failed; each kind is one exit code (README, "Exit codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Anything else: a server error, a failed publish job, bytes that did not verify.
    Failed,
    /// Bad flags or files, or no token: nothing was sent.
    Usage,
    /// The token was refused (401) or lacks the role (403).
    Auth,
    /// The server holds something else under that name: a version published with other bytes,
    /// a retired version name, an alias that cannot move.
    Conflict,
    /// The server's disk is full (507).
    Full,
    /// The server could not be reached or is not an imgsrv (DNS, connection, TLS).
    Unreachable,
}

impl Kind {
    pub fn exit_code(self) -> u8 {
        match self {
            Kind::Failed => 1,
            Kind::Usage => 2,
            Kind::Auth => 3,
            Kind::Conflict => 4,
            Kind::Full => 5,
            Kind::Unreachable => 6,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClientError {
    pub kind: Kind,
    pub message: String,
}

impl ClientError {
    pub fn new(kind: Kind, message: impl Into<String>) -> ClientError {
        ClientError {
            kind,
            message: message.into(),
        }
    }
    pub fn usage(message: impl Into<String>) -> ClientError {
        ClientError::new(Kind::Usage, message)
    }
    pub fn failed(message: impl Into<String>) -> ClientError {
        ClientError::new(Kind::Failed, message)
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// The API token: `--token-file` if given, else `IMGSRV_TOKEN`. Never a flag value, which any
/// user could read from the process list.
pub fn read_token(token_file: Option<&str>) -> Result<String> {
    let token = match token_file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| ClientError::usage(format!("cannot read token file {path}: {e}")))?,
        None => std::env::var("IMGSRV_TOKEN").map_err(|_| {
            ClientError::usage(
                "no token: set IMGSRV_TOKEN or pass --token-file FILE (a content-writer token)",
            )
        })?,
    };
    let token = token.trim().to_string();
    if token.is_empty() || token.split_whitespace().count() != 1 {
        return Err(ClientError::usage(
            "the token is empty or has whitespace inside",
        ));
    }
    Ok(token)
}

/// Checks `--part-size-mib` and `--parallel`, then reads the token (`read_token`): what `push`
/// and `mirror` do before they talk to a server.
pub fn check_upload_flags(
    part_size_mib: u64,
    parallel: usize,
    token_file: Option<&str>,
) -> Result<String> {
    if part_size_mib == 0 || part_size_mib > 5 * 1024 {
        return Err(ClientError::usage(
            "--part-size-mib must be between 1 and 5120",
        ));
    }
    if parallel == 0 || parallel > 16 {
        return Err(ClientError::usage("--parallel must be between 1 and 16"));
    }
    read_token(token_file)
}

/// One HTTP reply: status and body, the JSON document when the body is one.
pub struct Reply {
    pub status: u16,
    pub json: Value,
    pub text: String,
}

impl Reply {
    /// The problem document's detail, or the body itself.
    pub fn detail(&self) -> String {
        self.json["detail"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| self.text.trim().chars().take(300).collect())
    }

    /// The JSON body when the status is one of `ok`; otherwise the error it amounts to, with
    /// `what` saying what was being done.
    pub fn expect(self, what: &str, ok: &[u16]) -> Result<Value> {
        if ok.contains(&self.status) {
            return Ok(self.json);
        }
        Err(status_error(what, self.status, &self.detail()))
    }
}

/// Maps an unexpected status to an error of the right kind.
pub fn status_error(what: &str, status: u16, detail: &str) -> ClientError {
    let kind = match status {
        401 | 403 => Kind::Auth,
        409 => Kind::Conflict,
        507 => Kind::Full,
        _ => Kind::Failed,
    };
    let hint = match status {
        401 => " (the token is unknown, expired or revoked)",
        403 => " (the token needs the content-writer role)",
        507 => " (the server is out of disk space; free space or raise its disk)",
        _ => "",
    };
    ClientError::new(
        kind,
        format!("{what}: the server answered {status}: {detail}{hint}"),
    )
}

/// A server: its base URL, an HTTP agent, and the token for writes (absent for anonymous
/// reads).
#[derive(Clone)]
pub struct Api {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

impl Api {
    pub fn new(
        url: &str,
        token: Option<String>,
        tls: Arc<rustls::ClientConfig>,
        parallel: usize,
    ) -> Result<Api> {
        use ureq::unversioned::resolver::DefaultResolver;
        use ureq::unversioned::transport::{Connector, TcpConnector};
        let base = url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::usage(format!(
                "server URL {url:?} must start with http:// or https://"
            )));
        }
        let config = ureq::Agent::config_builder()
            // Any status is an answer to read (problem+json), not a transport error.
            .http_status_as_error(false)
            // Proxies from the environment are not used: a publish goes to the URL given.
            .proxy(None)
            .timeout_connect(Some(Duration::from_secs(15)))
            // A part's answer comes once all of it is stored, and a multi-part complete hashes
            // the whole blob first: allow minutes of silence, not seconds.
            .timeout_per_read(Some(Duration::from_secs(600)))
            .timeout_per_write(Some(Duration::from_secs(120)))
            // Body bytes leave in writes this large: 8 KiB writes cost a part upload a third
            // more system time than 128 KiB ones.
            .output_buffer_size(OUTPUT_BUFFER)
            .max_idle_connections_per_host(parallel.max(1) + 2)
            .user_agent(concat!("imgsrv/", env!("CARGO_PKG_VERSION")))
            .build();
        let connector = ().chain(TcpConnector::default()).chain(tls::TlsConnector { config: tls });
        let agent = ureq::Agent::with_parts(config, connector, DefaultResolver::default());
        Ok(Api { agent, base, token })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn request(&self, method: &str, path: &str) -> ureq::http::request::Builder {
        let r = ureq::http::Request::builder()
            .method(method)
            .uri(self.url(path));
        match &self.token {
            Some(t) => r.header("Authorization", format!("Bearer {t}")),
            None => r,
        }
    }

    fn run(
        &self,
        method: &str,
        path: &str,
        request: std::result::Result<ureq::http::Request<impl ureq::AsSendBody>, ureq::http::Error>,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        let request = request.map_err(|e| {
            ClientError::usage(format!(
                "{method} {}: not a valid request: {e}",
                self.url(path)
            ))
        })?;
        self.agent
            .run(request)
            .map_err(|e| transport_error(self, &e))
    }

    /// Sends a request with an optional JSON body. Any HTTP status is a `Reply`; only a
    /// failure to talk to the server is an error.
    pub fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Reply> {
        let req = self.request(method, path);
        let resp = match body {
            Some(b) => self.run(
                method,
                path,
                req.header("Content-Type", "application/json")
                    .body(b.to_string()),
            )?,
            None if method == "GET" || method == "HEAD" || method == "DELETE" => {
                self.run(method, path, req.body(()))?
            }
            None => self.run(method, path, req.body(&b""[..]))?,
        };
        reply(self, method, path, resp)
    }

    pub fn get(&self, path: &str) -> Result<Reply> {
        self.send("GET", path, None)
    }

    /// Streams `len` bytes from `body` as a request with that `Content-Length`.
    pub fn put_stream(&self, path: &str, len: u64, mut body: impl std::io::Read) -> Result<Reply> {
        let req = self
            .request("PUT", path)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Length", len.to_string())
            .body(ureq::SendBody::from_reader(&mut body));
        let resp = self.run("PUT", path, req)?;
        reply(self, "PUT", path, resp)
    }

    /// A GET whose body is read by the caller (a download); `range` is an inclusive byte range.
    pub fn get_stream(
        &self,
        path: &str,
        range: Option<(u64, u64)>,
    ) -> Result<(u16, Box<dyn std::io::Read + Send + Sync>)> {
        let mut req = self.request("GET", path);
        if let Some((a, b)) = range {
            req = req.header("Range", format!("bytes={a}-{b}"));
        }
        let resp = self.run("GET", path, req.body(()))?;
        let status = resp.status().as_u16();
        if status >= 400 {
            // An answer that cannot be read still names the status.
            let detail = read_answer(resp).map(|r| r.detail()).unwrap_or_default();
            return Err(status_error(
                &format!("GET {}", self.url(path)),
                status,
                &detail,
            ));
        }
        Ok((status, Box::new(resp.into_body().into_reader())))
    }
}

/// The size of the writes that carry a request body (ureq's default, stated because the push
/// speed depends on it).
const OUTPUT_BUFFER: usize = 128 * 1024;

fn reply(
    api: &Api,
    method: &str,
    path: &str,
    resp: ureq::http::Response<ureq::Body>,
) -> Result<Reply> {
    let answer = read_answer(resp).map_err(|e| {
        ClientError::new(
            Kind::Unreachable,
            format!("{method} {}: reading the answer: {e}", api.url(path)),
        )
    })?;
    // A 404 in plain text from the router (rather than problem+json) on an API path means the
    // URL does not lead to an imgsrv API at all.
    if answer.status == 404 && answer.json.is_null() {
        return Err(ClientError::new(
            Kind::Unreachable,
            format!(
                "{method} {}: 404 without a problem document; is {} an imgsrv server?",
                api.url(path),
                api.base
            ),
        ));
    }
    Ok(answer)
}

/// Reads a whole answer: its status, its text and, when the text is JSON, the document.
fn read_answer(resp: ureq::http::Response<ureq::Body>) -> std::result::Result<Reply, ureq::Error> {
    let status = resp.status().as_u16();
    let text = resp.into_body().read_to_string()?;
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok(Reply { status, json, text })
}

fn transport_error(api: &Api, e: &ureq::Error) -> ClientError {
    ClientError::new(
        Kind::Unreachable,
        format!("cannot talk to {}: {e}", api.base),
    )
}

/// Percent-encodes one path segment (names are restricted to safe characters by the server's
/// patterns, but `+` and `:` in versions are escaped to be safe with every proxy).
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Maps architecture names to the ones imgsrv stores (the kernel's, as Incus writes them in
/// `metadata.yaml`); Debian's and Go's names for the same machines are accepted too.
pub fn normalize_arch(arch: &str) -> String {
    match arch {
        "amd64" | "x86-64" | "x64" => "x86_64",
        "arm64" => "aarch64",
        "i386" | "i586" | "386" => "i686",
        "armhf" | "arm" => "armv7l",
        "ppc64el" => "ppc64le",
        other => other,
    }
    .to_string()
}

/// Human-readable sizes for progress and summaries.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Where resumable upload state lives: `--state-dir`, else `$XDG_STATE_HOME/imgsrv/uploads`,
/// else `~/.local/state/imgsrv/uploads`.
pub fn state_dir(flag: Option<&str>) -> Result<std::path::PathBuf> {
    if let Some(d) = flag {
        return Ok(Path::new(d).to_path_buf());
    }
    let base = match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(x) => std::path::PathBuf::from(x),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(h) => std::path::PathBuf::from(h).join(".local/state"),
            None => {
                return Err(ClientError::usage(
                    "neither XDG_STATE_HOME nor HOME is set: pass --state-dir DIR",
                ));
            }
        },
    };
    Ok(base.join("imgsrv/uploads"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names() {
        for (i, o) in [
            ("amd64", "x86_64"),
            ("x86_64", "x86_64"),
            ("arm64", "aarch64"),
            ("aarch64", "aarch64"),
            ("riscv64", "riscv64"),
        ] {
            assert_eq!(normalize_arch(i), o);
        }
    }

    #[test]
    fn segments_and_sizes() {
        assert_eq!(seg("1.0+build:2"), "1.0%2Bbuild%3A2");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(1 << 30), "1.0 GiB");
    }

    #[test]
    fn exit_codes_are_distinct() {
        let kinds = [
            Kind::Failed,
            Kind::Usage,
            Kind::Auth,
            Kind::Conflict,
            Kind::Full,
            Kind::Unreachable,
        ];
        let mut codes: Vec<u8> = kinds.iter().map(|k| k.exit_code()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), kinds.len());
        assert_eq!(status_error("x", 507, "full").kind, Kind::Full);
        assert_eq!(status_error("x", 403, "no").kind, Kind::Auth);
        assert_eq!(status_error("x", 409, "c").kind, Kind::Conflict);
    }
}
