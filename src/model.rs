//! The catalog's records. Each is stored as JSON in its redb table and is also the wire
//! representation of docs/api.md section 5, so what is stored is exactly what clients see.
//! Optional members are omitted when unset, never `null`.

use crate::clock::Timestamp;
use crate::digest::Digest;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! string_enum {
    ($name:ident { $($variant:ident => $text:literal),* $(,)? }) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        pub enum $name { $(#[serde(rename = $text)] $variant),* }
        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),* }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(UploadState {
    Created => "created",
    Uploading => "uploading",
    Completed => "completed",
    Ingesting => "ingesting",
    Ready => "ready",
    Failed => "failed",
    Aborted => "aborted",
});

string_enum!(VersionState {
    Draft => "draft",
    Publishing => "publishing",
    Published => "published",
});

string_enum!(JobState {
    Queued => "queued",
    Running => "running",
    Succeeded => "succeeded",
    Failed => "failed",
});

string_enum!(StepState {
    Queued => "queued",
    Running => "running",
    Succeeded => "succeeded",
    Failed => "failed",
    Skipped => "skipped",
});

string_enum!(StepName {
    ValidateCatalog => "validate_catalog",
    IncusIndex => "incus_index",
    FinalizePublish => "finalize_publish",
});

string_enum!(PrincipalKind {
    User => "user",
    Service => "service",
});

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadSession {
    pub id: Uuid,
    /// Absent while a session begun without a digest waits for `complete` to give it
    /// (docs/api.md, decision 18); records written before that decision always have one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub expected_digest: Option<Digest>,
    pub expected_size_bytes: i64,
    pub state: UploadState,
    pub expires_at: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub media_type_hint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub filename_hint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub failure_message: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadPart {
    pub upload_id: Uuid,
    pub part_number: u32,
    pub etag: String,
    pub size_bytes: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Image {
    pub id: Uuid,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub display_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub description: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageVersion {
    pub id: Uuid,
    pub image_id: Uuid,
    pub version: String,
    pub state: VersionState,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub published_at: Option<Timestamp>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Artifact {
    pub id: Uuid,
    pub version_id: Uuid,
    pub variant: String,
    pub operating_system: String,
    pub architecture: String,
    pub format: String,
    pub primary_blob_digest: Digest,
    pub primary_blob_size_bytes: i64,
    pub primary_media_type: String,
    /// What an Incus host must offer to run this image (for example `secureboot: "false"`
    /// for an unsigned boot chain). Simple Streams carries them as the product's
    /// `requirements`; absent on records written before the member existed.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty", default)]
    pub incus_requirements: std::collections::BTreeMap<String, String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attachment {
    pub id: Uuid,
    pub artifact_id: Uuid,
    pub name: String,
    pub media_type: String,
    pub blob_digest: Digest,
    pub blob_size_bytes: i64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Alias {
    pub id: Uuid,
    pub image_id: Uuid,
    pub alias: String,
    pub version_id: Uuid,
    pub version: String,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArtifactWithAttachments {
    pub artifact: Artifact,
    pub attachments: Vec<Attachment>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub image: Image,
    pub version: ImageVersion,
    pub artifacts: Vec<ArtifactWithAttachments>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublishJob {
    pub id: Uuid,
    pub version_id: Uuid,
    pub image_name: String,
    pub version: String,
    pub state: JobState,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub started_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub finished_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub failure_message: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub steps: Vec<PublishJobStep>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublishJobStep {
    pub id: Uuid,
    pub job_id: Uuid,
    pub name: StepName,
    pub state: StepState,
    pub blocking: bool,
    pub sequence: i64,
    pub attempt_count: i64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub started_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub finished_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub failure_message: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthRole {
    pub id: &'static str,
    pub display_name: &'static str,
    pub description: &'static str,
    pub actions: Vec<&'static str>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthPrincipal {
    pub id: Uuid,
    pub kind: PrincipalKind,
    pub display_name: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub attributes: Option<serde_json::Map<String, serde_json::Value>>,
    pub role_ids: Vec<String>,
}

/// An API token as stored: the public view plus the sha256 of its secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredToken {
    #[serde(flatten)]
    pub token: AuthApiToken,
    pub secret_sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthApiToken {
    pub id: Uuid,
    pub principal_id: Uuid,
    pub name: String,
    pub expires_at: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_used_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub revoked_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub plaintext: Option<String>,
}

/// What the `incus_index` publish step records for one eligible artifact; the Simple Streams
/// renderer reads these rows instead of opening blobs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncusRow {
    pub artifact_id: Uuid,
    pub attachment_id: Uuid,
    /// Hex sha256 of the `incus.tar.xz` bytes followed by the disk bytes (the Incus fingerprint).
    pub combined_sha256: String,
}

/// Decodes an integer member of a request body. JSON has one number type, and JSON Schema's
/// `integer` includes integral values written with a fraction or an exponent (`473.0`, `4.73e2`),
/// which clients and generators emit; they are accepted as that integer. A non-integral number
/// (`473.5`) or one outside `i64` stays a wrong type (400). Use it on every integer member of a
/// request struct: `#[serde(deserialize_with = "crate::model::integer")]`.
pub(crate) fn integer<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    struct Integer;
    impl serde::de::Visitor<'_> for Integer {
        type Value = i64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an integer")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<i64, E> {
            // 2^63 is exactly representable; every integral f64 below it fits in an i64.
            if v.fract() == 0.0 && v >= i64::MIN as f64 && v < 9_223_372_036_854_775_808.0 {
                Ok(v as i64)
            } else {
                Err(E::invalid_type(serde::de::Unexpected::Float(v), &self))
            }
        }
    }
    d.deserialize_any(Integer)
}

/// [`integer`] for a member whose absence matters: absent is `None` (with `#[serde(default)]`).
pub(crate) fn optional_integer<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<i64>, D::Error> {
    integer(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Upload sessions are stored as this JSON: records written before decision 18 (which
    /// always have a digest) still load, and a session without one leaves the member out.
    #[test]
    fn upload_sessions_with_and_without_a_digest() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let old = format!(
            r#"{{"id":"6f1c0b7e-2d1a-4c3e-9a8b-0f1e2d3c4b5a","expected_digest":"{digest}","expected_size_bytes":3,"state":"uploading","expires_at":"2026-12-01T00:00:00Z"}}"#
        );
        let s: UploadSession = serde_json::from_str(&old).unwrap();
        assert_eq!(s.expected_digest.map(|d| d.to_string()), Some(digest));
        let late = UploadSession {
            expected_digest: None,
            ..s
        };
        let text = serde_json::to_string(&late).unwrap();
        assert!(!text.contains("expected_digest"), "{text}");
        let back: UploadSession = serde_json::from_str(&text).unwrap();
        assert!(back.expected_digest.is_none());
    }
}
