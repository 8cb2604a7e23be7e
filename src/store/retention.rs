//! Retention policies: per image, which published versions to retire automatically.
//!
//! A policy has `keep_last` (keep the newest N published versions) and `keep_days` (keep
//! versions published less than D days ago), either or both. A version is retired only when
//! it breaks every rule given: outside the newest `keep_last` **and** older than `keep_days`
//! when both are set (the registry convention: either rule alone is enough to keep it). Two
//! versions are never retired by a policy: the newest published version (an image never loses
//! its last version to a policy) and any version an alias points at (aliases are moved
//! deliberately; retiring their target would break them). Those count towards `keep_last`
//! like any other version: "the newest N" means the N most recently published, whatever their
//! aliases.
//!
//! Versions are ordered by `published_at`, newest first (then version string and id, for a
//! stable order), and their age is measured from `published_at`: retention is about how long
//! content has been public, not when its draft was started.
//!
//! The policy runs right after each successful publish of the image and at every sweep;
//! [`select`] is the one pure function both use, and the preview endpoint shows its answer
//! without applying it.

use super::read::CatalogRead;
use super::retire::{self, RetiredVersion, Retirer};
use super::tables::*;
use super::{Store, begin_write_scope, encode, load};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::model::{Image, VersionState};
use crate::validate::check_image_name;
use redb::{ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use uuid::Uuid;

/// The longest `keep_days` accepted (about 100 years), so day arithmetic cannot overflow.
pub const MAX_KEEP_DAYS: i64 = 36_500;
/// The largest `keep_last` accepted.
pub const MAX_KEEP_LAST: i64 = 1_000_000;

/// A stored retention policy (value of `RETENTION`); also its wire form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub keep_last: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub keep_days: Option<u32>,
    pub updated_at: Timestamp,
}

/// Checks the two rules as a client gave them and builds a policy.
pub fn policy(keep_last: Option<i64>, keep_days: Option<i64>) -> Result<RetentionPolicy> {
    let invalid = |m: &str| Error::invalid(format!("retention invalid input: {m}"));
    if keep_last.is_none() && keep_days.is_none() {
        return Err(invalid("give keep_last, keep_days or both"));
    }
    if keep_last.is_some_and(|n| !(1..=MAX_KEEP_LAST).contains(&n)) {
        return Err(invalid(&format!(
            "keep_last must be between 1 and {MAX_KEEP_LAST}"
        )));
    }
    if keep_days.is_some_and(|n| !(1..=MAX_KEEP_DAYS).contains(&n)) {
        return Err(invalid(&format!(
            "keep_days must be between 1 and {MAX_KEEP_DAYS}"
        )));
    }
    Ok(RetentionPolicy {
        keep_last: keep_last.map(|n| n as u32),
        keep_days: keep_days.map(|n| n as u32),
        updated_at: Timestamp::now(),
    })
}

/// A published version as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: Uuid,
    pub version: String,
    pub published_at: Timestamp,
    /// The aliases pointing at it, sorted.
    pub aliases: Vec<String>,
}

/// What the policy decides for one version, with the reason in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Keep(String),
    Retire(String),
}

/// Decides every candidate at time `now`. Returns the candidates newest first, each with its
/// verdict. Pure, so that tests can inject any time.
pub fn select(
    policy: &RetentionPolicy,
    mut versions: Vec<Candidate>,
    now: Timestamp,
) -> Vec<(Candidate, Verdict)> {
    versions.sort_by(|a, b| {
        b.published_at
            .cmp(&a.published_at)
            .then_with(|| b.version.cmp(&a.version))
            .then_with(|| b.id.cmp(&a.id))
    });
    let cutoff = policy
        .keep_days
        .map(|d| Timestamp(now.0.saturating_sub(i64::from(d) * 86_400 * 1_000_000)));
    versions
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let verdict = verdict(policy, i, &c, cutoff);
            (c, verdict)
        })
        .collect()
}

fn verdict(
    policy: &RetentionPolicy,
    position: usize,
    c: &Candidate,
    cutoff: Option<Timestamp>,
) -> Verdict {
    if position == 0 {
        return Verdict::Keep("newest published version".into());
    }
    if !c.aliases.is_empty() {
        return Verdict::Keep(format!("alias target ({})", c.aliases.join(", ")));
    }
    let days = |d: u32| {
        if d == 1 {
            "1 day".to_string()
        } else {
            format!("{d} days")
        }
    };
    // A rule that is not set cannot keep a version; `select` is only called with at least one.
    if let Some(n) = policy.keep_last
        && position < n as usize
    {
        return Verdict::Keep(format!("among the newest {n}"));
    }
    if let Some(cutoff) = cutoff
        && c.published_at > cutoff
    {
        return Verdict::Keep(format!(
            "published less than {} ago",
            days(policy.keep_days.unwrap_or(0))
        ));
    }
    let reason = match (policy.keep_last, policy.keep_days) {
        (Some(n), Some(d)) => format!(
            "not among the newest {n} and published over {} ago",
            days(d)
        ),
        (Some(n), None) => format!("not among the newest {n}"),
        (None, Some(d)) => format!("published over {} ago", days(d)),
        (None, None) => return Verdict::Keep("no rule set".into()),
    };
    Verdict::Retire(format!("retention policy: {reason}"))
}

/// The 404 of an image without a stored policy, with `hint` after it.
fn no_policy(name: &str, hint: &str) -> Error {
    Error::not_found(format!(
        "catalog not found: image {name:?} has no retention policy{hint}"
    ))
}

/// The published versions of an image with their aliases, as the policy sees them.
fn candidates(r: &impl CatalogRead, image: &Image) -> Result<Vec<Candidate>> {
    let aliases = r.aliases_of(image.id)?;
    Ok(r.versions_of(image)?
        .into_iter()
        .filter(|v| v.state == VersionState::Published)
        .map(|v| {
            let mut names: Vec<String> = aliases
                .iter()
                .filter(|a| a.version_id == v.id)
                .map(|a| a.alias.clone())
                .collect();
            names.sort();
            Candidate {
                id: v.id,
                published_at: v.published_at.unwrap_or(v.updated_at),
                version: v.version,
                aliases: names,
            }
        })
        .collect())
}

/// Applies an image's policy inside `txn`: retires what [`select`] says. Returns the records,
/// for the caller to announce once the transaction has committed.
fn apply_in(
    txn: &WriteTransaction,
    image: &Image,
    now: Timestamp,
    grace: Duration,
) -> Result<Vec<RetiredVersion>> {
    let Some(policy) = txn.retention_policy(image.id)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (c, verdict) in select(&policy, candidates(txn, image)?, now) {
        if let Verdict::Retire(reason) = verdict {
            let v = txn
                .version_of(image, &c.version)?
                .ok_or_else(|| Error::internal("a candidate version vanished"))?;
            out.push(retire::retire_in(
                txn,
                image,
                &v,
                Retirer::Policy,
                reason,
                now,
                grace,
            )?);
        }
    }
    Ok(out)
}

/// What `POST .../retention/preview` answers: every published version with its verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Preview {
    pub policy: RetentionPolicy,
    pub evaluated_at: Timestamp,
    /// The versions the policy would retire now, newest first.
    pub retire: Vec<PreviewEntry>,
    /// The versions it keeps, newest first.
    pub keep: Vec<PreviewEntry>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PreviewEntry {
    pub version: String,
    pub published_at: Timestamp,
    pub reason: String,
}

impl Store {
    /// `PUT /v1/images/{name}/retention`: sets (or replaces) the image's policy. The image need
    /// not have a published version yet. The policy takes effect at the next publish of the
    /// image or the next sweep, whichever comes first.
    pub fn put_retention(&self, name: &str, policy: RetentionPolicy) -> Result<RetentionPolicy> {
        check_image_name(name)?;
        begin_write_scope(self, |txn| {
            let image = txn.image_named(name)?;
            txn.open_table(RETENTION)?
                .insert(image.id.as_u128(), encode(&policy)?.as_slice())?;
            Ok(policy)
        })
    }

    /// The image's policy; 404 when the image does not exist or has none.
    pub fn retention(&self, name: &str) -> Result<RetentionPolicy> {
        check_image_name(name)?;
        let txn = self.begin_read()?;
        let image = txn.image_named(name)?;
        txn.retention_policy(image.id)?
            .ok_or_else(|| no_policy(name, ""))
    }

    /// Removes the image's policy (keep everything); 404 when it has none.
    pub fn delete_retention(&self, name: &str) -> Result<()> {
        check_image_name(name)?;
        begin_write_scope(self, |txn| {
            let image = txn.image_named(name)?;
            if txn
                .open_table(RETENTION)?
                .remove(image.id.as_u128())?
                .is_none()
            {
                return Err(no_policy(name, ""));
            }
            Ok(())
        })
    }

    /// What `policy` (or, when `None`, the stored policy) would retire at `now`; changes
    /// nothing.
    pub fn preview_retention(
        &self,
        name: &str,
        policy: Option<RetentionPolicy>,
        now: Timestamp,
    ) -> Result<Preview> {
        check_image_name(name)?;
        let txn = self.begin_read()?;
        let image = txn.image_named(name)?;
        let policy = match policy {
            Some(p) => p,
            None => txn
                .retention_policy(image.id)?
                .ok_or_else(|| no_policy(name, "; send one to preview it"))?,
        };
        let mut preview = Preview {
            policy: policy.clone(),
            evaluated_at: now,
            retire: Vec::new(),
            keep: Vec::new(),
        };
        for (c, verdict) in select(&policy, candidates(&txn, &image)?, now) {
            let (list, reason) = match verdict {
                Verdict::Keep(r) => (&mut preview.keep, r),
                Verdict::Retire(r) => (&mut preview.retire, r),
            };
            list.push(PreviewEntry {
                version: c.version,
                published_at: c.published_at,
                reason,
            });
        }
        Ok(preview)
    }

    /// Applies the policy of the image a publish job published (called once the job has
    /// succeeded). Returns the versions retired, already announced.
    pub fn apply_retention_after_publish(
        &self,
        job_id: Uuid,
        grace: Duration,
    ) -> Result<Vec<RetiredVersion>> {
        let job = self.job(job_id)?;
        let retired = begin_write_scope(self, |txn| match txn.image_by_name(&job.image_name)? {
            Some(image) => apply_in(txn, &image, Timestamp::now(), grace),
            None => Ok(Vec::new()),
        })?;
        for r in &retired {
            retire::announce(&job.image_name, r);
        }
        Ok(retired)
    }

    /// Whether the policy of image `id` would retire anything at `now`.
    fn retention_due(&self, id: u128, now: Timestamp) -> Result<bool> {
        let txn = self.begin_read()?;
        let Some(image) = load::<Image>(&txn.open_table(IMAGES)?, id, "image")? else {
            return Ok(false);
        };
        let Some(policy) = txn.retention_policy(Uuid::from_u128(id))? else {
            return Ok(false);
        };
        Ok(select(&policy, candidates(&txn, &image)?, now)
            .iter()
            .any(|(_, v)| matches!(v, Verdict::Retire(_))))
    }

    /// Applies every image's policy at `now`, one image per transaction (the sweeper). Returns
    /// how many versions were retired; an image whose policy fails is logged and skipped.
    pub fn apply_all_retention(&self, now: Timestamp, grace: Duration) -> Result<usize> {
        let images: Vec<u128> = {
            let txn = self.begin_read()?;
            let t = txn.open_table(RETENTION)?;
            let mut out = Vec::new();
            for row in t.iter()? {
                out.push(row?.0.value());
            }
            out
        };
        let mut count = 0;
        for id in images {
            // Decide in a read transaction first: most sweeps retire nothing, and a write
            // transaction would cost a durable commit per image per sweep for no change. A
            // failure here falls through to the write, which reports it.
            if let Ok(false) = self.retention_due(id, now) {
                continue;
            }
            let result = begin_write_scope(self, |txn| {
                let image: Option<Image> = load(&txn.open_table(IMAGES)?, id, "image")?;
                match image {
                    Some(image) => Ok((image.name.clone(), apply_in(txn, &image, now, grace)?)),
                    None => Ok((String::new(), Vec::new())),
                }
            });
            match result {
                Ok((name, retired)) => {
                    for r in &retired {
                        retire::announce(&name, r);
                    }
                    count += retired.len();
                }
                Err(e) => crate::log::error(&format!(
                    "applying the retention policy of image {} failed: {e}",
                    Uuid::from_u128(id)
                )),
            }
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400 * 1_000_000;

    fn c(version: &str, days_ago: i64, aliases: &[&str], now: Timestamp) -> Candidate {
        Candidate {
            id: Uuid::from_u128(version.bytes().map(u128::from).sum()),
            version: version.into(),
            published_at: Timestamp(now.0 - days_ago * DAY),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn p(keep_last: Option<u32>, keep_days: Option<u32>) -> RetentionPolicy {
        RetentionPolicy {
            keep_last,
            keep_days,
            updated_at: Timestamp(0),
        }
    }

    /// Runs `select` and returns (version, retired?) newest first.
    fn check(policy: RetentionPolicy, versions: &[(&str, i64, &[&str])], expect: &[(&str, bool)]) {
        let now = Timestamp::parse_rfc3339("2026-06-01T00:00:00Z").unwrap();
        let list = versions.iter().map(|(v, d, a)| c(v, *d, a, now)).collect();
        let got: Vec<(String, bool)> = select(&policy, list, now)
            .into_iter()
            .map(|(c, v)| (c.version, matches!(v, Verdict::Retire(_))))
            .collect();
        let want: Vec<(String, bool)> = expect.iter().map(|(v, r)| (v.to_string(), *r)).collect();
        assert_eq!(got, want, "policy {policy:?}");
    }

    #[test]
    fn keep_last_alone() {
        check(
            p(Some(2), None),
            &[
                ("1", 30, &[]),
                ("2", 20, &[]),
                ("3", 10, &[]),
                ("4", 1, &[]),
            ],
            &[("4", false), ("3", false), ("2", true), ("1", true)],
        );
    }

    #[test]
    fn keep_days_alone() {
        check(
            p(None, Some(15)),
            &[
                ("1", 30, &[]),
                ("2", 20, &[]),
                ("3", 10, &[]),
                ("4", 1, &[]),
            ],
            &[("4", false), ("3", false), ("2", true), ("1", true)],
        );
        // Exactly `keep_days` old counts as older than the limit.
        check(
            p(None, Some(10)),
            &[("1", 10, &[]), ("2", 1, &[])],
            &[("2", false), ("1", true)],
        );
    }

    #[test]
    fn both_rules_must_be_broken() {
        // Outside keep_last but young: kept. Old but inside keep_last: kept.
        check(
            p(Some(2), Some(15)),
            &[
                ("1", 40, &[]),
                ("2", 30, &[]),
                ("3", 12, &[]),
                ("4", 11, &[]),
                ("5", 1, &[]),
            ],
            &[
                ("5", false),
                ("4", false),
                ("3", false),
                ("2", true),
                ("1", true),
            ],
        );
        check(
            p(Some(3), Some(5)),
            &[("1", 40, &[]), ("2", 30, &[]), ("3", 20, &[])],
            &[("3", false), ("2", false), ("1", false)],
        );
    }

    #[test]
    fn newest_and_alias_targets_are_never_retired() {
        // Even the newest version older than keep_days stays, and aliases protect old ones.
        check(
            p(Some(1), Some(1)),
            &[("1", 40, &["stable"]), ("2", 30, &[]), ("3", 20, &[])],
            &[("3", false), ("2", true), ("1", false)],
        );
        // A protected version still takes a keep_last place.
        check(
            p(Some(2), None),
            &[("1", 3, &[]), ("2", 2, &["stable"]), ("3", 1, &[])],
            &[("3", false), ("2", false), ("1", true)],
        );
    }

    #[test]
    fn reasons_name_the_rules() {
        let now = Timestamp::parse_rfc3339("2026-06-01T00:00:00Z").unwrap();
        let got = select(
            &p(Some(1), Some(7)),
            vec![
                c("a", 30, &[], now),
                c("b", 3, &[], now),
                c("c", 1, &[], now),
                c("d", 60, &["lts"], now),
            ],
            now,
        );
        let reasons: Vec<(String, Verdict)> =
            got.into_iter().map(|(c, v)| (c.version, v)).collect();
        assert_eq!(
            reasons,
            [
                ("c".into(), Verdict::Keep("newest published version".into())),
                (
                    "b".into(),
                    Verdict::Keep("published less than 7 days ago".into())
                ),
                (
                    "a".into(),
                    Verdict::Retire(
                        "retention policy: not among the newest 1 and published over 7 days ago"
                            .into()
                    )
                ),
                ("d".into(), Verdict::Keep("alias target (lts)".into())),
            ]
        );
    }

    #[test]
    fn policy_validation() {
        assert!(policy(None, None).is_err());
        assert!(policy(Some(0), None).is_err());
        assert!(policy(None, Some(0)).is_err());
        assert!(policy(Some(-1), Some(3)).is_err());
        assert!(policy(None, Some(MAX_KEEP_DAYS + 1)).is_err());
        let ok = policy(Some(3), None).unwrap();
        assert_eq!((ok.keep_last, ok.keep_days), (Some(3), None));
        let ok = policy(Some(1), Some(MAX_KEEP_DAYS)).unwrap();
        assert_eq!(ok.keep_days, Some(MAX_KEEP_DAYS as u32));
    }
}
