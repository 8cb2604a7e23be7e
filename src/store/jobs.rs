//! Publish jobs and their steps, stored as one JSON record per job.
//!
//! State changes happen in short durable transactions: claiming a step, recording its outcome,
//! and `finalize_publish`, which flips the version to `published`, stores `published_at` and
//! the Simple Streams rows in one transaction. A crash leaves a job whose running
//! step is re-claimed at the next start (incrementing `attempt_count`), never a half-published
//! version.

use super::blobs;
use super::read::CatalogRead;
use super::streams::{INCUS_DISK_FORMAT, INCUS_METADATA_NAME, INCUS_ROOTFS_FORMAT, incus_format};
use super::tables::*;
use super::{Store, begin_write_scope, bump_generation, encode, load, save};
use crate::clock::Timestamp;
use crate::digest::{Digest, hex};
use crate::error::{Error, Result};
use crate::model::*;
use crate::streams::incus_arch;
use crate::validate::{check_image_name, check_version};
use redb::{ReadableTable, WriteTransaction};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use uuid::Uuid;

fn publish_invalid(e: Error) -> Error {
    if e.kind == crate::error::Kind::Invalid {
        Error::invalid(format!("publish invalid input: {}", e.detail))
    } else {
        e
    }
}

fn job_not_found(id: Uuid) -> Error {
    Error::not_found(format!("publish not found: job {id}"))
}

fn load_job(txn: &WriteTransaction, id: Uuid) -> Result<PublishJob> {
    load(&txn.open_table(JOBS)?, id.as_u128(), "publish job")?.ok_or_else(|| job_not_found(id))
}

fn save_job(txn: &WriteTransaction, job: &PublishJob) -> Result<()> {
    save(&mut txn.open_table(JOBS)?, job.id.as_u128(), job)
}

/// The CAS checks shared by publish and the `validate_catalog` step: at least one artifact and
/// every referenced blob trusted with exactly the declared size.
fn check_blobs(
    r: &(impl CatalogRead + ?Sized),
    txn_blobs: &impl ReadableTable<&'static [u8; 32], &'static [u8]>,
    version_id: Uuid,
) -> Result<()> {
    let artifacts = r.artifacts_of(version_id)?;
    if artifacts.is_empty() {
        return Err(Error::precondition(
            "published image_versions require at least one release_artifact",
        ));
    }
    let trusted = |digest: &Digest, size: i64| -> Result<bool> {
        Ok(blobs::get_in(txn_blobs, digest.as_bytes())?.is_some_and(|b| b.size as i64 == size))
    };
    for a in &artifacts {
        if !trusted(&a.primary_blob_digest, a.primary_blob_size_bytes)? {
            return Err(Error::precondition(
                "published image_versions require verified primary blobs",
            ));
        }
    }
    for a in &artifacts {
        for att in r.attachments_of(a.id)? {
            if !trusted(&att.blob_digest, att.blob_size_bytes)? {
                return Err(Error::precondition(
                    "published image_versions require verified attachment blobs",
                ));
            }
        }
    }
    Ok(())
}

/// The artifacts Simple Streams can list: qcow2 or squashfs with an attachment named
/// `incus.tar.xz`.
pub(crate) fn incus_eligible(
    r: &impl CatalogRead,
    version_id: Uuid,
) -> Result<Vec<(Artifact, Attachment)>> {
    let mut out = Vec::new();
    for a in r.artifacts_of(version_id)? {
        if !incus_format(&a.format) {
            continue;
        }
        if let Some(att) = r
            .attachments_of(a.id)?
            .into_iter()
            .find(|x| x.name == INCUS_METADATA_NAME)
        {
            out.push((a, att));
        }
    }
    Ok(out)
}

/// The rules for a version whose VM disk and container root file system land in one Simple
/// Streams product (same Incus architecture and variant). A product version has one metadata
/// item, so both artifacts must carry the same `incus.tar.xz` bytes, and one set of
/// requirements, so theirs must not contradict each other.
fn check_incus_products(r: &impl CatalogRead, version_id: Uuid) -> Result<()> {
    let mut products: BTreeMap<(String, String), Vec<(Artifact, Attachment)>> = BTreeMap::new();
    for (a, att) in incus_eligible(r, version_id)? {
        let arch = incus_arch(&a.architecture)
            .map(str::to_string)
            .unwrap_or_else(|| a.architecture.clone());
        products
            .entry((arch, a.variant.clone()))
            .or_default()
            .push((a, att));
    }
    for ((arch, variant), members) in &products {
        let Some(vm) = members.iter().find(|(a, _)| a.format == INCUS_DISK_FORMAT) else {
            continue;
        };
        let Some(ct) = members
            .iter()
            .find(|(a, _)| a.format == INCUS_ROOTFS_FORMAT)
        else {
            continue;
        };
        if vm.1.blob_digest != ct.1.blob_digest {
            return Err(Error::precondition(format!(
                "published image_versions require one incus.tar.xz per Incus product: the qcow2 \
                 and squashfs artifacts of architecture {arch} variant {variant} carry different \
                 incus.tar.xz bytes ({} and {}); attach the same file to both",
                vm.1.blob_digest, ct.1.blob_digest
            )));
        }
        for (k, v) in &vm.0.incus_requirements {
            if let Some(other) = ct.0.incus_requirements.get(k)
                && other != v
            {
                return Err(Error::precondition(format!(
                    "published image_versions require agreeing incus requirements per Incus \
                     product: architecture {arch} variant {variant} asks for {k}={v:?} on the \
                     qcow2 artifact and {k}={other:?} on the squashfs artifact"
                )));
            }
        }
    }
    Ok(())
}

fn new_job(version: &ImageVersion, image_name: &str) -> PublishJob {
    let now = Timestamp::now();
    let id = Uuid::new_v4();
    let step = |name, sequence| PublishJobStep {
        id: Uuid::new_v4(),
        job_id: id,
        name,
        state: StepState::Queued,
        blocking: true,
        sequence,
        attempt_count: 0,
        started_at: None,
        finished_at: None,
        failure_message: None,
        created_at: now,
        updated_at: now,
    };
    PublishJob {
        id,
        version_id: version.id,
        image_name: image_name.to_string(),
        version: version.version.clone(),
        state: JobState::Queued,
        started_at: None,
        finished_at: None,
        failure_message: None,
        created_at: now,
        updated_at: now,
        steps: vec![
            step(StepName::ValidateCatalog, 10),
            step(StepName::IncusIndex, 20),
            step(StepName::FinalizePublish, 30),
        ],
    }
}

/// What the worker should do next for a job.
pub enum NextStep {
    Run(StepName),
    /// The job is finished, failed or stopped at a failed blocking step.
    Done,
}

impl Store {
    /// Publishes a draft: returns the job and whether it was created now (202) or already
    /// existed because the version is `publishing` or `published` (200, docs/api.md, decision 4).
    pub fn publish(&self, name: &str, version: &str) -> Result<(PublishJob, bool)> {
        check_image_name(name).map_err(publish_invalid)?;
        check_version(version).map_err(publish_invalid)?;
        begin_write_scope(self, |txn| {
            let image = txn
                .image_by_name(name)?
                .ok_or_else(|| Error::not_found(format!("publish not found: image {name:?}")))?;
            let mut v = txn.version_of(&image, version)?.ok_or_else(|| {
                Error::not_found(format!(
                    "publish not found: image {name:?} version {version:?}"
                ))
            })?;
            if v.state != VersionState::Draft {
                let job_id = txn
                    .open_table(VERSION_JOBS)?
                    .get(v.id.as_u128())?
                    .map(|x| x.value())
                    .ok_or_else(|| Error::internal("publish: version has no job"))?;
                return Ok((load_job(txn, Uuid::from_u128(job_id))?, false));
            }
            check_blobs(txn, &txn.open_table(BLOBS)?, v.id)?;
            check_incus_products(txn, v.id)?;
            v.state = VersionState::Publishing;
            v.updated_at = Timestamp::now();
            save(&mut txn.open_table(VERSIONS)?, v.id.as_u128(), &v)?;
            let job = new_job(&v, name);
            txn.open_table(VERSION_JOBS)?
                .insert(v.id.as_u128(), job.id.as_u128())?;
            save_job(txn, &job)?;
            Ok((job, true))
        })
    }

    pub fn job(&self, id: Uuid) -> Result<PublishJob> {
        let txn = self.begin_read()?;
        load(&txn.open_table(JOBS)?, id.as_u128(), "publish job")?.ok_or_else(|| job_not_found(id))
    }

    /// Jobs that still have work: queued or running (after a crash).
    pub fn unfinished_jobs(&self) -> Result<Vec<Uuid>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(JOBS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            let job: PublishJob = super::decode(v.value(), "publish job")?;
            if matches!(job.state, JobState::Queued | JobState::Running) {
                out.push(job.id);
            }
        }
        Ok(out)
    }

    /// Requeues a failed job from its first failed blocking step.
    pub fn retry_job(&self, id: Uuid) -> Result<PublishJob> {
        begin_write_scope(self, |txn| {
            let mut job = load_job(txn, id)?;
            if job.state != JobState::Failed {
                return Err(Error::precondition("publish job is not failed"));
            }
            let v = txn
                .version_by_id(job.version_id)?
                .ok_or_else(|| Error::internal("publish job names a missing version"))?;
            if v.state != VersionState::Publishing {
                return Err(Error::precondition("publish version is not publishing"));
            }
            let first_failed = job
                .steps
                .iter()
                .filter(|s| s.blocking && s.state == StepState::Failed)
                .map(|s| s.sequence)
                .min()
                .ok_or_else(|| Error::precondition("publish job has no failed blocking step"))?;
            let now = Timestamp::now();
            for s in job.steps.iter_mut() {
                if s.sequence >= first_failed && s.state != StepState::Succeeded {
                    s.state = StepState::Queued;
                    s.failure_message = None;
                    s.finished_at = None;
                    s.updated_at = now;
                }
            }
            job.state = JobState::Queued;
            job.finished_at = None;
            job.failure_message = None;
            job.updated_at = now;
            save_job(txn, &job)?;
            Ok(job)
        })
    }

    /// Claims the next step of a job: marks it running (attempt + 1) and the job running.
    /// A step left `running` by a crash is claimed again.
    pub fn claim_next_step(&self, id: Uuid) -> Result<NextStep> {
        begin_write_scope(self, |txn| {
            let mut job = load_job(txn, id)?;
            if !matches!(job.state, JobState::Queued | JobState::Running) {
                return Ok(NextStep::Done);
            }
            job.steps.sort_by_key(|s| s.sequence);
            let now = Timestamp::now();
            let mut next = None;
            for s in job.steps.iter_mut() {
                match s.state {
                    StepState::Succeeded | StepState::Skipped => continue,
                    StepState::Failed if s.blocking => break,
                    StepState::Failed => continue,
                    StepState::Queued | StepState::Running => {
                        s.state = StepState::Running;
                        s.attempt_count += 1;
                        s.started_at.get_or_insert(now);
                        s.updated_at = now;
                        next = Some(s.name);
                        break;
                    }
                }
            }
            let Some(name) = next else {
                return Ok(NextStep::Done);
            };
            job.state = JobState::Running;
            job.started_at.get_or_insert(now);
            job.updated_at = now;
            save_job(txn, &job)?;
            Ok(NextStep::Run(name))
        })
    }

    /// Records a step's success (for steps other than `finalize_publish`).
    pub fn step_succeeded(&self, id: Uuid, name: StepName) -> Result<()> {
        begin_write_scope(self, |txn| {
            let mut job = load_job(txn, id)?;
            mark_step(&mut job, name, StepState::Succeeded, None);
            save_job(txn, &job)
        })
    }

    /// Records a step's failure: the step and the job become `failed` with the message.
    pub fn step_failed(&self, id: Uuid, name: StepName, message: &str) -> Result<()> {
        begin_write_scope(self, |txn| {
            let mut job = load_job(txn, id)?;
            mark_step(&mut job, name, StepState::Failed, Some(message));
            let now = Timestamp::now();
            job.state = JobState::Failed;
            job.failure_message = Some(message.to_string());
            job.finished_at = Some(now);
            job.updated_at = now;
            save_job(txn, &job)
        })
    }

    /// The `validate_catalog` step: re-runs publish's checks.
    pub fn validate_for_publish(&self, id: Uuid) -> Result<()> {
        let txn = self.begin_read()?;
        let job: PublishJob = load(&txn.open_table(JOBS)?, id.as_u128(), "publish job")?
            .ok_or_else(|| job_not_found(id))?;
        check_blobs(&txn, &txn.open_table(BLOBS)?, job.version_id)?;
        check_incus_products(&txn, job.version_id)
    }

    /// The `incus_index` step: computes, once per (metadata, disk) digest pair, the sha256 of
    /// the metadata bytes followed by the disk bytes, reading (and verifying) both blobs.
    pub fn index_for_incus(&self, id: Uuid, stop: &dyn Fn() -> bool) -> Result<()> {
        let pairs: Vec<([u8; 32], [u8; 32])> = {
            let txn = self.begin_read()?;
            let job: PublishJob = load(&txn.open_table(JOBS)?, id.as_u128(), "publish job")?
                .ok_or_else(|| job_not_found(id))?;
            let combined = txn.open_table(COMBINED)?;
            let mut out = Vec::new();
            for (artifact, att) in incus_eligible(&txn, job.version_id)? {
                let meta = *att.blob_digest.as_bytes();
                let disk = *artifact.primary_blob_digest.as_bytes();
                if combined.get((&meta, &disk))?.is_none() {
                    out.push((meta, disk));
                }
            }
            out
        };
        for (meta, disk) in pairs {
            if stop() {
                return Err(Error::internal("shutting down"));
            }
            let mut hasher = Sha256::new();
            for digest in [&meta, &disk] {
                let (_, reader) = self.open_blob(digest)?.ok_or_else(|| {
                    Error::internal(format!("blob {} is not stored", Digest::from(*digest)))
                })?;
                reader
                    .hash_into(&mut hasher)
                    .map_err(|e| Error::internal(format!("reading blob: {e}")))?;
            }
            let sum: [u8; 32] = hasher.finalize().into();
            begin_write_scope(self, |txn| {
                txn.open_table(COMBINED)?.insert((&meta, &disk), &sum)?;
                Ok(())
            })?;
        }
        Ok(())
    }

    /// The `finalize_publish` step: one transaction publishes the version, writes its Simple
    /// Streams rows and finishes the step and the job.
    pub fn finalize_publish(&self, id: Uuid) -> Result<()> {
        begin_write_scope(self, |txn| {
            let mut job = load_job(txn, id)?;
            let mut v = txn
                .version_by_id(job.version_id)?
                .ok_or_else(|| Error::internal("publish job names a missing version"))?;
            if v.state != VersionState::Publishing {
                return Err(Error::internal(format!(
                    "version is {} rather than publishing",
                    v.state
                )));
            }
            let combined = txn.open_table(COMBINED)?;
            let mut rows = txn.open_table(INCUS_ROWS)?;
            for (artifact, att) in incus_eligible(txn, v.id)? {
                let meta = att.blob_digest.as_bytes();
                let disk = artifact.primary_blob_digest.as_bytes();
                let sum = combined
                    .get((meta, disk))?
                    .map(|x| *x.value())
                    .ok_or_else(|| Error::internal("incus index is missing; rerun incus_index"))?;
                let row = IncusRow {
                    artifact_id: artifact.id,
                    attachment_id: att.id,
                    combined_sha256: hex(&sum),
                };
                rows.insert(
                    (v.id.as_u128(), artifact.id.as_u128()),
                    encode(&row)?.as_slice(),
                )?;
            }
            drop(rows);
            drop(combined);
            let now = Timestamp::now();
            v.state = VersionState::Published;
            v.published_at = Some(now);
            v.updated_at = now;
            save(&mut txn.open_table(VERSIONS)?, v.id.as_u128(), &v)?;
            mark_step(
                &mut job,
                StepName::FinalizePublish,
                StepState::Succeeded,
                None,
            );
            job.state = JobState::Succeeded;
            job.finished_at = Some(now);
            job.updated_at = now;
            save_job(txn, &job)?;
            bump_generation(txn)
        })
    }
}

fn mark_step(job: &mut PublishJob, name: StepName, state: StepState, message: Option<&str>) {
    let now = Timestamp::now();
    for s in job.steps.iter_mut().filter(|s| s.name == name) {
        s.state = state;
        s.failure_message = message.map(str::to_string);
        s.finished_at = Some(now);
        s.updated_at = now;
    }
    job.updated_at = now;
}
