//! Command-line flags (argh). Raw values only; `config.rs` validates them and applies the
//! `IMGSRV_*` environment equivalents (a flag wins over the environment).

use argh::FromArgs;

/// imgsrv: stores, publishes and serves VM and disk images from one redb file.
#[derive(FromArgs, Debug)]
pub struct Cli {
    /// print the version and exit
    #[argh(switch)]
    pub version: bool,
    #[argh(subcommand)]
    pub command: Option<Command>,
}

// The enum is built once per process, so the size of the `serve` variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum Command {
    Serve(ServeArgs),
    Backup(BackupArgs),
    Check(CheckArgs),
    Compact(CompactArgs),
    Push(PushArgs),
    Mirror(MirrorArgs),
}

/// Run the HTTP server.
#[derive(FromArgs, Debug, Default)]
#[argh(subcommand, name = "serve")]
pub struct ServeArgs {
    /// address to listen on (IMGSRV_LISTEN; default 127.0.0.1:8080)
    #[argh(option)]
    pub listen: Option<String>,
    /// data directory holding the database (IMGSRV_DATA_DIR; default $STATE_DIRECTORY, else ./imgsrv-data)
    #[argh(option)]
    pub data_dir: Option<String>,
    /// PEM certificate chain for TLS (IMGSRV_TLS_CERT)
    #[argh(option)]
    pub tls_cert: Option<String>,
    /// PEM private key for TLS (IMGSRV_TLS_KEY)
    #[argh(option)]
    pub tls_key: Option<String>,
    /// metrics address, empty disables (IMGSRV_METRICS_LISTEN; default 127.0.0.1:9464)
    #[argh(option)]
    pub metrics_listen: Option<String>,
    /// the URL clients reach this server at, e.g. https://images.example.org; the catalog page's commands show it (IMGSRV_PUBLIC_URL; default: from each request's Host)
    #[argh(option)]
    pub public_url: Option<String>,
    /// lifetime of upload sessions, e.g. 24h, 30m (IMGSRV_UPLOAD_TTL; default 24h)
    #[argh(option)]
    pub upload_ttl: Option<String>,
    /// how often expired uploads and unreferenced blobs are swept (IMGSRV_SWEEP_INTERVAL; default 1m)
    #[argh(option)]
    pub sweep_interval: Option<String>,
    /// how long a retired version's files stay downloadable by their direct URLs (IMGSRV_RETIRE_GRACE; default 2h)
    #[argh(option)]
    pub retire_grace: Option<String>,
    /// log format: text or json (IMGSRV_LOG_FORMAT; default text)
    #[argh(option)]
    pub log_format: Option<String>,
    /// log verbosity: 0 errors and warnings, 1 lifecycle, 2 every request (IMGSRV_VERBOSITY; default 2)
    #[argh(option)]
    pub verbosity: Option<u8>,
    /// number of HTTP worker threads (IMGSRV_HTTP_THREADS; default 32)
    #[argh(option)]
    pub http_threads: Option<usize>,
    /// number of publish workers (IMGSRV_PUBLISH_WORKERS; default 2)
    #[argh(option)]
    pub publish_workers: Option<usize>,
    /// redb page cache size in MiB (IMGSRV_CACHE_MIB; default 8)
    #[argh(option)]
    pub cache_mib: Option<usize>,
    /// most client connections served at once; more get 503 (IMGSRV_MAX_CONNECTIONS; default 4096)
    #[argh(option)]
    pub max_connections: Option<usize>,
    /// time allowed for a request head or TLS handshake (IMGSRV_HEADER_TIMEOUT; default 30s)
    #[argh(option)]
    pub header_timeout: Option<String>,
    /// time an idle kept-alive connection stays open (IMGSRV_IDLE_TIMEOUT; default 60s)
    #[argh(option)]
    pub idle_timeout: Option<String>,
    /// time a body read or response write may stall (IMGSRV_IO_TIMEOUT; default 60s)
    #[argh(option)]
    pub io_timeout: Option<String>,
    /// how long a shutdown waits for in-flight requests (IMGSRV_SHUTDOWN_TIMEOUT; default 30s)
    #[argh(option)]
    pub shutdown_timeout: Option<String>,
    /// free space that writes must leave on the data filesystem, e.g. 256MiB, 2GiB, 0 (IMGSRV_DISK_RESERVE; default 256MiB)
    #[argh(option)]
    pub disk_reserve: Option<String>,
    /// time from the end of one scrub pass over every stored chunk to the next, e.g. 7d, 24h (IMGSRV_SCRUB_INTERVAL; default 7d)
    #[argh(option)]
    pub scrub_interval: Option<String>,
    /// bytes per second the scrub reads, e.g. 64MiB; 0 disables it (IMGSRV_SCRUB_RATE; default 64MiB)
    #[argh(option)]
    pub scrub_rate: Option<String>,
}

/// Declares a subcommand that opens the database file itself rather than asking a server:
/// `--data-dir` (resolved as `serve` resolves it), then its own flags. The own fields pass
/// through as raw tokens: argh tells `Option` and `Vec` fields apart by their tokens, which a
/// `ty` fragment would hide from it.
macro_rules! database_command {
    (
        $(#[$attr:meta])*
        pub struct $name:ident { $($own:tt)* }
    ) => {
        $(#[$attr])*
        pub struct $name {
            /// data directory holding the database (IMGSRV_DATA_DIR; default $STATE_DIRECTORY, else ./imgsrv-data)
            #[argh(option)]
            pub data_dir: Option<String>,
            $($own)*
        }
    };
}

database_command! {
    /// Copy the database consistently into a new file, while the server runs or not.
    #[derive(FromArgs, Debug)]
    #[argh(subcommand, name = "backup")]
    pub struct BackupArgs {
        /// at most this many bytes a second, e.g. 200MiB, to leave the disk to downloads (default: as fast as the disk goes)
        #[argh(option)]
        pub rate: Option<String>,
        /// the file to write (must not exist), or an existing directory to write imgsrv.redb into
        #[argh(positional)]
        pub out: String,
    }
}

database_command! {
    /// Verify a stopped database (or a backup): checksums, reference counts, catalog links.
    #[derive(FromArgs, Debug)]
    #[argh(subcommand, name = "check")]
    pub struct CheckArgs {}
}

database_command! {
    /// Return the space of deleted data to the filesystem (server stopped).
    #[derive(FromArgs, Debug)]
    #[argh(subcommand, name = "compact")]
    pub struct CompactArgs {}
}

/// Declares a client subcommand's flags: its own (passed through as `database_command!` passes
/// them), then the five every uploading command shares and `client::push` and `client::mirror`
/// read the same way (token, CA, part size, parallelism, state directory). argh has no flatten,
/// so the shared flags are spliced in here rather than written out in each struct. Three of
/// their help lines say what the command does with them, so the caller gives those.
macro_rules! uploading_command {
    (
        $(#[$attr:meta])*
        pub struct $name:ident { $($own:tt)* }
        token_file = $token_doc:literal,
        ca_cert = $ca_doc:literal,
        parallel = $parallel_doc:literal,
        parallel_default = $parallel_default:literal,
    ) => {
        $(#[$attr])*
        pub struct $name {
            $($own)*
            #[doc = $token_doc]
            #[argh(option)]
            pub token_file: Option<String>,
            #[doc = $ca_doc]
            #[argh(option)]
            pub ca_cert: Option<String>,
            /// upload part size in MiB (default 128)
            #[argh(option, default = "128")]
            pub part_size_mib: u64,
            #[doc = $parallel_doc]
            #[argh(option, default = $parallel_default)]
            pub parallel: usize,
            /// where resumable upload state is kept (default $XDG_STATE_HOME/imgsrv/uploads)
            #[argh(option)]
            pub state_dir: Option<String>,
        }
    };
}

uploading_command! {
    /// Upload image files, describe them as a version, publish it and move aliases. The token is
    /// read from IMGSRV_TOKEN or --token-file (never a flag: it would show in the process list).
    /// Exit codes: 0 published or already published, 1 failure, 2 usage, 3 token refused,
    /// 4 conflict, 5 server disk full, 6 server unreachable.
    #[derive(FromArgs, Debug, Default)]
    #[argh(subcommand, name = "push")]
    pub struct PushArgs {
        /// server URL, e.g. https://images.example.org
        #[argh(option)]
        pub server: String,
        /// image name, e.g. debian-bookworm
        #[argh(positional)]
        pub image: String,
        /// version name, e.g. 12.5.0
        #[argh(positional)]
        pub version: String,
        /// files as distrobuilder names them (disk.qcow2, rootfs.squashfs, incus.tar.xz) or one directory holding them
        #[argh(positional)]
        pub paths: Vec<String>,
        /// alias to point at the version once published (repeatable)
        #[argh(option)]
        pub alias: Vec<String>,
        /// operating system (default: properties.os of incus.tar.xz's metadata.yaml)
        #[argh(option)]
        pub os: Option<String>,
        /// architecture (default: the architecture in incus.tar.xz's metadata.yaml)
        #[argh(option)]
        pub arch: Option<String>,
        /// artifact variant (default: default)
        #[argh(option)]
        pub variant: Option<String>,
    }
    token_file = "file holding the API token (default: IMGSRV_TOKEN)",
    ca_cert = "PEM certificate(s) to trust besides the system roots, e.g. a self-signed server's",
    parallel = "parts sent at once (default 1: in order, so the server hashes them as they arrive)",
    parallel_default = "1",
}

uploading_command! {
    /// Copy published versions and aliases from one imgsrv to another (read anonymously from
    /// --from, written with the token from IMGSRV_TOKEN or --token-file to --to). Exit codes as
    /// for push.
    #[derive(FromArgs, Debug, Default)]
    #[argh(subcommand, name = "mirror")]
    pub struct MirrorArgs {
        /// upstream server URL (read anonymously)
        #[argh(option)]
        pub from: String,
        /// downstream server URL (written with the token)
        #[argh(option)]
        pub to: String,
        /// only this image (repeatable; default: every image)
        #[argh(option)]
        pub image: Vec<String>,
        /// only artifacts of this architecture (repeatable; default: every architecture)
        #[argh(option)]
        pub arch: Vec<String>,
    }
    token_file = "file holding the downstream API token (default: IMGSRV_TOKEN)",
    ca_cert = "PEM certificate(s) to trust besides the system roots, for either server",
    parallel = "parts copied at once (default 4)",
    parallel_default = "4",
}
