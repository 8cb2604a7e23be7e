//! The redb tables that tests open directly, declared once as the README's on-disk format
//! section gives them (the tests read the file from outside, like any other tool would, rather
//! than through the crate's own definitions).

use redb::TableDefinition;

pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub const CHUNKS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("chunks");
pub const CHUNK_REFS: TableDefinition<&[u8; 32], u64> = TableDefinition::new("chunk_refs");
pub const BLOBS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("blobs");
pub const PARTS: TableDefinition<(u128, u32), &[u8]> = TableDefinition::new("upload_parts");
pub const STAGING: TableDefinition<(u128, u32), &[u8; 36]> = TableDefinition::new("part_staging");
pub const VERSIONS: TableDefinition<u128, &[u8]> = TableDefinition::new("versions");
pub const JOBS: TableDefinition<u128, &[u8]> = TableDefinition::new("publish_jobs");
