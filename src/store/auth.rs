//! Principals, role assignments and API tokens (docs/api.md, decision 9).
//!
//! A token's plaintext is `imgsrv_at_<token id as 32 hex>_<secret as 64 hex>`; only the sha256
//! of the secret is stored and it is compared in constant time. The id part lets a lookup go
//! straight to one row instead of hashing every stored token.

use super::tables::{PRINCIPALS, TOKENS};
use super::{Store, begin_write_scope, decode, load, save};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::model::*;
use crate::validate;
use redb::ReadableTable;
use sha2::{Digest, Sha256};
use std::time::Duration;
use subtle::ConstantTimeEq;
use uuid::Uuid;

pub const ROLE_CONTENT_WRITER: &str = "content-writer";
pub const ROLE_AUTH_MANAGER: &str = "auth-manager";
pub const ACTION_CONTENT_WRITE: &str = "content.write";
pub const ACTION_AUTH_MANAGE: &str = "auth.manage";
pub const TOKEN_PREFIX: &str = "imgsrv_at_";

pub fn roles() -> Vec<AuthRole> {
    vec![
        AuthRole {
            id: ROLE_AUTH_MANAGER,
            display_name: "Auth manager",
            description: "Can manage imgsrv authentication policy.",
            actions: vec![ACTION_AUTH_MANAGE],
        },
        AuthRole {
            id: ROLE_CONTENT_WRITER,
            display_name: "Content writer",
            description: "Can write imgsrv content.",
            actions: vec![ACTION_CONTENT_WRITE],
        },
    ]
}

fn role_action(role: &str) -> Option<&'static str> {
    match role {
        ROLE_AUTH_MANAGER => Some(ACTION_AUTH_MANAGE),
        ROLE_CONTENT_WRITER => Some(ACTION_CONTENT_WRITE),
        _ => None,
    }
}

/// Who made a request, as established by a valid token.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal_id: Uuid,
    pub token_id: Uuid,
    pub actions: Vec<&'static str>,
}

fn principal_not_found(id: Uuid) -> Error {
    Error::not_found(format!("auth not found: principal {id}"))
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| Error::internal(format!("random source failed: {e}")))?;
    Ok(b)
}

fn parse_token(plaintext: &str) -> Option<(Uuid, &str)> {
    let rest = plaintext.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    if id.len() != 32 || secret.len() != 64 {
        return None;
    }
    Some((Uuid::parse_str(id).ok()?, secret))
}

impl Store {
    pub fn create_principal(
        &self,
        kind: PrincipalKind,
        display_name: &str,
        attributes: Option<serde_json::Map<String, serde_json::Value>>,
    ) -> Result<AuthPrincipal> {
        if !validate::non_blank(display_name) {
            return Err(Error::invalid(
                "auth invalid input: display name is required",
            ));
        }
        let p = AuthPrincipal {
            id: Uuid::new_v4(),
            kind,
            display_name: display_name.to_string(),
            attributes,
            role_ids: Vec::new(),
        };
        begin_write_scope(self, |txn| {
            save(&mut txn.open_table(PRINCIPALS)?, p.id.as_u128(), &p)?;
            Ok(p.clone())
        })
    }

    pub fn principals(&self) -> Result<Vec<AuthPrincipal>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(PRINCIPALS)?;
        let mut out: Vec<AuthPrincipal> = Vec::new();
        for row in t.iter()? {
            out.push(decode(row?.1.value(), "principal")?);
        }
        out.sort_by(|a, b| (&a.display_name, a.id).cmp(&(&b.display_name, b.id)));
        Ok(out)
    }

    pub fn principal(&self, id: Uuid) -> Result<AuthPrincipal> {
        let txn = self.begin_read()?;
        load(&txn.open_table(PRINCIPALS)?, id.as_u128(), "principal")?
            .ok_or_else(|| principal_not_found(id))
    }

    /// Grants (`grant == true`) or revokes a role; both are idempotent.
    pub fn set_role(&self, id: Uuid, role: &str, grant: bool) -> Result<()> {
        if role_action(role).is_none() {
            return Err(Error::not_found(format!("auth not found: role {role:?}")));
        }
        begin_write_scope(self, |txn| {
            let mut t = txn.open_table(PRINCIPALS)?;
            let mut p: AuthPrincipal =
                load(&t, id.as_u128(), "principal")?.ok_or_else(|| principal_not_found(id))?;
            p.role_ids.retain(|r| r != role);
            if grant {
                p.role_ids.push(role.to_string());
                p.role_ids.sort();
            }
            save(&mut t, id.as_u128(), &p)
        })
    }

    /// Issues a token; the returned record carries the plaintext, which is never stored.
    pub fn issue_token(
        &self,
        principal: Uuid,
        name: &str,
        expires_at: Timestamp,
    ) -> Result<AuthApiToken> {
        let id = Uuid::new_v4();
        let secret = crate::digest::hex(&random_bytes::<32>()?);
        let plaintext = format!("{TOKEN_PREFIX}{}_{secret}", id.simple());
        let token = AuthApiToken {
            id,
            principal_id: principal,
            name: name.to_string(),
            expires_at,
            last_used_at: None,
            revoked_at: None,
            plaintext: None,
        };
        let stored = StoredToken {
            token: token.clone(),
            secret_sha256: crate::digest::hex(&Sha256::digest(secret.as_bytes())),
        };
        begin_write_scope(self, |txn| {
            if load::<AuthPrincipal>(
                &txn.open_table(PRINCIPALS)?,
                principal.as_u128(),
                "principal",
            )?
            .is_none()
            {
                return Err(principal_not_found(principal));
            }
            save(&mut txn.open_table(TOKENS)?, id.as_u128(), &stored)
        })?;
        Ok(AuthApiToken {
            plaintext: Some(plaintext),
            ..token
        })
    }

    pub fn tokens_of(&self, principal: Uuid) -> Result<Vec<AuthApiToken>> {
        self.principal(principal)?;
        let txn = self.begin_read()?;
        let t = txn.open_table(TOKENS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let s: StoredToken = decode(row?.1.value(), "token")?;
            if s.token.principal_id == principal {
                out.push(s.token);
            }
        }
        out.sort_by(|a, b| (&a.name, a.id).cmp(&(&b.name, b.id)));
        Ok(out)
    }

    /// Revokes a token. A token already revoked is reported as not found.
    pub fn revoke_token(&self, id: Uuid) -> Result<()> {
        begin_write_scope(self, |txn| {
            let mut t = txn.open_table(TOKENS)?;
            let mut s: StoredToken = load(&t, id.as_u128(), "token")?
                .filter(|s: &StoredToken| s.token.revoked_at.is_none())
                .ok_or_else(|| Error::not_found(format!("auth not found: api token {id}")))?;
            s.token.revoked_at = Some(Timestamp::now());
            save(&mut t, id.as_u128(), &s)
        })
    }

    /// Checks a bearer token: known, secret matching (constant time), not expired or revoked.
    /// Returns `None` for any failure so callers answer one uniform 401.
    pub fn authenticate(&self, plaintext: &str) -> Result<Option<Caller>> {
        let Some((id, secret)) = parse_token(plaintext) else {
            return Ok(None);
        };
        let txn = self.begin_read()?;
        let Some(stored) = load::<StoredToken>(&txn.open_table(TOKENS)?, id.as_u128(), "token")?
        else {
            return Ok(None);
        };
        let presented = crate::digest::hex(&Sha256::digest(secret.as_bytes()));
        let matches: bool = presented
            .as_bytes()
            .ct_eq(stored.secret_sha256.as_bytes())
            .into();
        let now = Timestamp::now();
        if !matches || stored.token.revoked_at.is_some() || stored.token.expires_at <= now {
            return Ok(None);
        }
        let Some(p) = load::<AuthPrincipal>(
            &txn.open_table(PRINCIPALS)?,
            stored.token.principal_id.as_u128(),
            "principal",
        )?
        else {
            return Ok(None);
        };
        drop(txn);
        // Record use at most once a minute, cheaply: losing it in a crash is harmless.
        let stale = stored
            .token
            .last_used_at
            .is_none_or(|t| t.add(Duration::from_secs(60)) < now);
        if stale {
            let txn = self.begin_write_cheap()?;
            {
                let mut t = txn.open_table(TOKENS)?;
                if let Some(mut s) = load::<StoredToken>(&t, id.as_u128(), "token")? {
                    s.token.last_used_at = Some(now);
                    save(&mut t, id.as_u128(), &s)?;
                }
            }
            txn.commit()?;
        }
        Ok(Some(Caller {
            principal_id: p.id,
            token_id: id,
            actions: p.role_ids.iter().filter_map(|r| role_action(r)).collect(),
        }))
    }

    /// Whether some auth-manager principal holds a token that still works.
    pub fn has_live_auth_manager(&self) -> Result<bool> {
        let txn = self.begin_read()?;
        let principals = txn.open_table(PRINCIPALS)?;
        let t = txn.open_table(TOKENS)?;
        let now = Timestamp::now();
        for row in t.iter()? {
            let s: StoredToken = decode(row?.1.value(), "token")?;
            if s.token.revoked_at.is_some() || s.token.expires_at <= now {
                continue;
            }
            if let Some(p) =
                load::<AuthPrincipal>(&principals, s.token.principal_id.as_u128(), "principal")?
                && p.role_ids.iter().any(|r| r == ROLE_AUTH_MANAGER)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Mints a bootstrap auth-manager token valid for 24 hours and returns its plaintext.
    pub fn mint_bootstrap_token(&self) -> Result<String> {
        let p = self.create_principal(PrincipalKind::Service, "bootstrap", None)?;
        self.set_role(p.id, ROLE_AUTH_MANAGER, true)?;
        let token = self.issue_token(
            p.id,
            "bootstrap",
            Timestamp::now().add(Duration::from_secs(24 * 3600)),
        )?;
        Ok(token.plaintext.unwrap_or_default())
    }
}
