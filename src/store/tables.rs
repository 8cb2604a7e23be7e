//! Every redb table, with its key encoding and value layout. This file and the README's
//! on-disk-format section are the specification of the database file; change both together
//! and bump `SCHEMA_VERSION` with an explicit upgrade when a layout changes. A new table also
//! goes into the list of `backup.rs` (a backup refuses a database holding a table it does not
//! know, rather than leave it out of the copy).
//!
//! Conventions: UUIDs are keys as `u128` (big-endian order of the canonical form, so range
//! scans over a prefix tuple work); blob digests are keys as their 32 raw sha256 bytes, chunk
//! keys are 32 bytes too (BLAKE3 of the chunk, or sha256 for chunks stored before schema 3); catalog
//! records are JSON (the wire form of docs/api.md section 5, see `model.rs`); integers inside
//! binary values are big-endian.

use redb::TableDefinition;

/// Bumped whenever a table layout changes. Checked at open: an older file is upgraded in place
/// by `migrate.rs`, a newer one refuses to start.
///
/// History: 1, the first release; 2 adds `RETENTION` and `RETIRED` (version retirement); 3 keys
/// new chunks by BLAKE3 and carries the blob's sha256 state in part records (hash once).
pub const SCHEMA_VERSION: u64 = 3;

/// `"schema_version"` -> u64, `"generation"` -> u64 (bumped by every change that affects
/// what consumers see in the catalog or Simple Streams).
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// chunk key -> the chunk's bytes (at most `CHUNK_SIZE`). The key is the BLAKE3 hash of the
/// bytes (schema 3 on; chunks stored before keep their sha256 keys, and the two never need to
/// meet: finding a BLAKE3 output equal to a sha256 output of other bytes is as hard as any
/// 256-bit collision). Verified against `CHUNK_SUMS` whenever read.
pub const CHUNKS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("chunks");
/// chunk key -> number of references (blob chunk lists, upload parts, staging rows).
/// The chunk row and this row are deleted together when the count reaches zero.
pub const CHUNK_REFS: TableDefinition<&[u8; 32], u64> = TableDefinition::new("chunk_refs");
/// chunk key -> XXH3-128 of the chunk's bytes (twox-hash, AVX2 chosen at run time), written and deleted with the chunk row.
/// Downloads verify chunks against this checksum: it catches any corruption of the stored
/// bytes as surely as sha256 for our purpose (redb does not check its page checksums on
/// ordinary reads) at a small fraction of the CPU, which sha256 dominated (57 % of a
/// download's CPU, capping a core at about 1.3 GB/s). The key stays the chunk's identity
/// (computed from the bytes on every write); `complete` checks the whole blob's sha256.
pub const CHUNK_SUMS: TableDefinition<&[u8; 32], u128> = TableDefinition::new("chunk_sums");

/// sha256(blob) -> blob record (see `blobs.rs`: size, verification time, media type and the
/// ordered chunk list). Only verified ("trusted") blobs have a row.
pub const BLOBS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("blobs");
/// sha256(blob) -> (catalog references, hold-until unix seconds). Counts the artifacts and
/// attachments that name the digest (drafts too, even before the blob exists). A blob with
/// zero references whose hold time has passed is garbage; the hold is the expiry of the
/// latest `ready` upload session for the digest, so a fresh upload survives until used.
pub const BLOB_REFS: TableDefinition<&[u8; 32], (u64, i64)> = TableDefinition::new("blob_refs");

/// upload id -> UploadSession JSON.
pub const UPLOADS: TableDefinition<u128, &[u8]> = TableDefinition::new("uploads");
/// (upload id, part number) -> part record (see `uploads.rs`: layout byte, size, etag, the
/// blob's sha256 state before and after the part, chunk list). Rewritten by the schema-3
/// upgrade.
pub const PARTS: TableDefinition<(u128, u32), &[u8]> = TableDefinition::new("upload_parts");
/// (part write nonce, chunk index) -> 36-byte chunk reference (key + u32 length) of a part
/// still streaming in. Each row holds one chunk reference. Rows left by a crash are released
/// at the next start.
pub const STAGING: TableDefinition<(u128, u32), &[u8; 36]> = TableDefinition::new("part_staging");

/// image id -> Image JSON.
pub const IMAGES: TableDefinition<u128, &[u8]> = TableDefinition::new("images");
/// image name -> image id.
pub const IMAGE_NAMES: TableDefinition<&str, u128> = TableDefinition::new("image_names");
/// version id -> ImageVersion JSON.
pub const VERSIONS: TableDefinition<u128, &[u8]> = TableDefinition::new("versions");
/// (image id, version string) -> version id.
pub const VERSION_KEYS: TableDefinition<(u128, &str), u128> = TableDefinition::new("version_keys");
/// artifact id -> Artifact JSON.
pub const ARTIFACTS: TableDefinition<u128, &[u8]> = TableDefinition::new("artifacts");
/// (version id, artifact id) -> (): the artifacts of a version.
pub const VERSION_ARTIFACTS: TableDefinition<(u128, u128), ()> =
    TableDefinition::new("version_artifacts");
/// attachment id -> Attachment JSON.
pub const ATTACHMENTS: TableDefinition<u128, &[u8]> = TableDefinition::new("attachments");
/// (artifact id, attachment id) -> (): the attachments of an artifact.
pub const ARTIFACT_ATTACHMENTS: TableDefinition<(u128, u128), ()> =
    TableDefinition::new("artifact_attachments");
/// (image id, alias name) -> Alias JSON.
pub const ALIASES: TableDefinition<(u128, &str), &[u8]> = TableDefinition::new("aliases");

/// job id -> PublishJob JSON (steps included).
pub const JOBS: TableDefinition<u128, &[u8]> = TableDefinition::new("publish_jobs");
/// version id -> job id (at most one job per version, ever).
pub const VERSION_JOBS: TableDefinition<u128, u128> = TableDefinition::new("version_jobs");
/// (version id, artifact id) -> IncusRow JSON, written by the `incus_index` step.
pub const INCUS_ROWS: TableDefinition<(u128, u128), &[u8]> = TableDefinition::new("incus_rows");
/// (metadata blob sha256, disk blob sha256) -> combined sha256, so each pair is hashed once.
pub const COMBINED: TableDefinition<(&[u8; 32], &[u8; 32]), &[u8; 32]> =
    TableDefinition::new("combined_hashes");

/// principal id -> AuthPrincipal JSON.
pub const PRINCIPALS: TableDefinition<u128, &[u8]> = TableDefinition::new("principals");
/// token id -> StoredToken JSON (the secret's sha256 only, never the secret).
pub const TOKENS: TableDefinition<u128, &[u8]> = TableDefinition::new("api_tokens");

/// image id -> RetentionPolicy JSON (`keep_last`, `keep_days`). Absent: keep every version.
/// Added in schema 2.
pub const RETENTION: TableDefinition<u128, &[u8]> = TableDefinition::new("retention_policies");
/// (image id, version string) -> RetiredVersion JSON: who retired it, why, when, and until when
/// its files stay downloadable. Retiring a version moves its name from `VERSION_KEYS` to this
/// table (so the name stays reserved) and drops its `INCUS_ROWS`; the version's artifact and
/// attachment rows, and so its blob references, stay until the grace has passed and the
/// sweeper purges them. Added in schema 2.
pub const RETIRED: TableDefinition<(u128, &str), &[u8]> = TableDefinition::new("retired_versions");
