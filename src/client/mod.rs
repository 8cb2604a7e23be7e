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

/// TLS trust for every client: the system's roots, plus `--ca-cert` (a private CA, or a
/// self-signed server's own certificate).
///
/// A self-signed certificate made the usual way (`openssl req -x509`) is marked as a CA, and
/// WebPKI refuses a CA certificate as a server's own (`CaUsedAsEndEntity`). So a server whose
/// certificate is byte-for-byte one of the `--ca-cert` certificates is accepted as pinned, the
/// way Incus pins `servercerts/`: the handshake signature is still checked against that
/// certificate's key, so only its key holder passes. Any other certificate must chain to a root.
pub fn tls_config(ca_cert: Option<&str>) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    // A missing or partly unreadable system store is not fatal: --ca-cert may be all we need.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let mut pinned = Vec::new();
    if let Some(path) = ca_cert {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| ClientError::usage(format!("cannot read --ca-cert {path}: {e}")))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| ClientError::usage(format!("cannot parse --ca-cert {path}: {e}")))?;
        if certs.is_empty() {
            return Err(ClientError::usage(format!(
                "no certificate found in --ca-cert {path}"
            )));
        }
        for c in certs {
            // A certificate WebPKI cannot use as an anchor may still be pinned.
            let _ = roots.add(c.clone());
            pinned.push(c);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ClientError::failed(format!("TLS configuration: {e}")))?;
    if roots.is_empty() && pinned.is_empty() {
        return Err(ClientError::usage(
            "no TLS roots: the system has no CA certificates; pass --ca-cert FILE",
        ));
    }
    let webpki = if roots.is_empty() {
        None
    } else {
        Some(
            rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .map_err(|e| ClientError::failed(format!("TLS configuration: {e}")))?,
        )
    };
    let verifier = PinnedOrRoots {
        pinned,
        webpki,
        algorithms: provider.signature_verification_algorithms,
    };
    Ok(Arc::new(
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth(),
    ))
}

#[derive(Debug)]
struct PinnedOrRoots {
    pinned: Vec<rustls::pki_types::CertificateDer<'static>>,
    webpki: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for PinnedOrRoots {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if self
            .pinned
            .iter()
            .any(|p| p.as_ref() == end_entity.as_ref())
        {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        match &self.webpki {
            Some(w) => {
                w.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            None => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl Api {
    pub fn new(
        url: &str,
        token: Option<String>,
        tls: Arc<rustls::ClientConfig>,
        parallel: usize,
    ) -> Result<Api> {
        let base = url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::usage(format!(
                "server URL {url:?} must start with http:// or https://"
            )));
        }
        let agent = ureq::AgentBuilder::new()
            .tls_config(tls)
            .timeout_connect(Duration::from_secs(15))
            // A part's answer comes once all of it is stored, and a multi-part complete hashes
            // the whole blob first: allow minutes, not seconds.
            .timeout_read(Duration::from_secs(600))
            .timeout_write(Duration::from_secs(120))
            .max_idle_connections_per_host(parallel.max(1) + 2)
            .user_agent(concat!("imgsrv/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Api { agent, base, token })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let r = self.agent.request(method, &self.url(path));
        match &self.token {
            Some(t) => r.set("Authorization", &format!("Bearer {t}")),
            None => r,
        }
    }

    /// Sends a request with an optional JSON body. Any HTTP status is a `Reply`; only a
    /// failure to talk to the server is an error.
    pub fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Reply> {
        let req = self.request(method, path);
        let result = match body {
            Some(b) => req
                .set("Content-Type", "application/json")
                .send_string(&b.to_string()),
            None if method == "GET" || method == "HEAD" || method == "DELETE" => req.call(),
            None => req.send_bytes(b""),
        };
        reply(self, method, path, result)
    }

    pub fn get(&self, path: &str) -> Result<Reply> {
        self.send("GET", path, None)
    }

    /// Streams `len` bytes from `body` as a request with that `Content-Length`.
    pub fn put_stream(&self, path: &str, len: u64, body: impl std::io::Read) -> Result<Reply> {
        let result = self
            .request("PUT", path)
            .set("Content-Type", "application/octet-stream")
            .set("Content-Length", &len.to_string())
            .send(body);
        reply(self, "PUT", path, result)
    }

    /// A GET whose body is read by the caller (a download); `range` is an inclusive byte range.
    pub fn get_stream(
        &self,
        path: &str,
        range: Option<(u64, u64)>,
    ) -> Result<(u16, Box<dyn std::io::Read + Send + Sync>)> {
        let mut req = self.request("GET", path);
        if let Some((a, b)) = range {
            req = req.set("Range", &format!("bytes={a}-{b}"));
        }
        match req.call() {
            Ok(r) => Ok((r.status(), Box::new(r.into_reader()))),
            Err(ureq::Error::Status(code, r)) => {
                let text = r.into_string().unwrap_or_default();
                let json = serde_json::from_str(&text).unwrap_or(Value::Null);
                let reply = Reply {
                    status: code,
                    json,
                    text,
                };
                Err(status_error(
                    &format!("GET {}", self.url(path)),
                    code,
                    &reply.detail(),
                ))
            }
            Err(ureq::Error::Transport(t)) => Err(transport_error(self, &t)),
        }
    }
}

fn reply(
    api: &Api,
    method: &str,
    path: &str,
    result: std::result::Result<ureq::Response, ureq::Error>,
) -> Result<Reply> {
    let (status, resp) = match result {
        Ok(r) => (r.status(), r),
        Err(ureq::Error::Status(code, r)) => (code, r),
        Err(ureq::Error::Transport(t)) => return Err(transport_error(api, &t)),
    };
    let text = resp.into_string().map_err(|e| {
        ClientError::new(
            Kind::Unreachable,
            format!("{method} {}: reading the answer: {e}", api.url(path)),
        )
    })?;
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    // A 404 in plain text from the router (rather than problem+json) on an API path means the
    // URL does not lead to an imgsrv API at all.
    if status == 404 && json.is_null() {
        return Err(ClientError::new(
            Kind::Unreachable,
            format!(
                "{method} {}: 404 without a problem document; is {} an imgsrv server?",
                api.url(path),
                api.base
            ),
        ));
    }
    Ok(Reply { status, json, text })
}

fn transport_error(api: &Api, t: &ureq::Transport) -> ClientError {
    ClientError::new(
        Kind::Unreachable,
        format!("cannot talk to {}: {t}", api.base),
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
