//! TLS material for tests, made with the `openssl` command (callers check
//! `require_tool("openssl")` first): self-signed certificates, and CAs, intermediates and leaves
//! for chain tests.

use super::output_ok;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `openssl` in `dir`, failing the test with its error output.
pub fn openssl(dir: &Path, args: &[&str]) {
    output_ok(Command::new("openssl").args(args).current_dir(dir));
}

/// An EC P-256 key `name.key` and a certificate request or (with `-x509` in `extra`) a
/// self-signed certificate `name.pem`.
pub fn ec_req(dir: &Path, name: &str, cn: &str, extra: &[&str]) {
    let (key, out) = (format!("{name}.key"), format!("{name}.pem"));
    let subj = format!("/CN={cn}");
    let mut args = vec![
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &key,
        "-out",
        &out,
        "-subj",
        &subj,
    ];
    args.extend_from_slice(extra);
    openssl(dir, &args);
}

/// Signs `name.pem` (a request) with `ca` into `name.crt` with the given extensions.
pub fn sign(dir: &Path, name: &str, ca: &str, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.pem"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-set_serial",
            "2",
            "-days",
            "2",
            "-out",
            &format!("{name}.crt"),
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

/// A self-signed certificate for `localhost` and 127.0.0.1, valid for two days, in `dir`.
/// Returns the certificate and key files.
pub fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf) {
    ec_req(
        dir,
        "self",
        "localhost",
        &[
            "-x509",
            "-days",
            "2",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
    );
    (dir.join("self.pem"), dir.join("self.key"))
}
