//! The control plane's certificate authorities: every CA it holds, each in a state, and the
//! trust bundle they make.
//!
//! - `active`: signs every new certificate; exactly one CA is active.
//! - `trusted`: its root is in the bundle, it signs nothing (a CA being rolled in, or one
//!   that signed until a switch and whose certificates may still be in use).
//! - `retired`: gone from the bundle, its key deleted; kept in the record for the audit.
//!
//! Rotation is add (trusted) → switch (active) → retire the old one. Pure: the data directory
//! persists a set (`datadir.rs`) and callers pass the time.

use bulkhead_api::v1 as pb;
use bulkhead_identity::{Ca, TrustBundle, fingerprint, not_after_of, subject_of};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

/// The shortest CA name the CLI accepts (a prefix of its SHA-256).
const MIN_ID_PREFIX: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum CaState {
    Active,
    Trusted,
    Retired,
}

impl CaState {
    pub(crate) fn word(self) -> &'static str {
        match self {
            CaState::Active => "active",
            CaState::Trusted => "trusted",
            CaState::Retired => "retired",
        }
    }
}

/// Where a CA came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum CaOrigin {
    /// A root the control plane made.
    Generated,
    /// A CA the operator brought, with its chain.
    Imported,
}

/// What the data directory records of one CA (in `cas.json`). No secret: the key is in its
/// own 0600 file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct CaRecord {
    /// SHA-256 (hex) of the CA's own certificate.
    pub sha256: String,
    pub state: CaState,
    pub origin: CaOrigin,
    /// The CA's certificate, then its chain up to the root; relative to the data directory.
    pub cert_file: String,
    /// Its private key, relative to the data directory; deleted when the CA is retired.
    pub key_file: String,
    pub added_unix: u64,
    /// When it last started and stopped signing (0: never).
    #[serde(default)]
    pub activated_unix: u64,
    #[serde(default)]
    pub deactivated_unix: u64,
    #[serde(default)]
    pub retired_unix: u64,
    /// The longest SVID lifetime it signed with, in seconds: how long after it stops
    /// signing a certificate it made may still be valid.
    #[serde(default)]
    pub longest_svid_lifetime_secs: u64,
}

/// The whole of `cas.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct CaFile {
    pub trust_domain: String,
    pub cas: Vec<CaRecord>,
}

/// One CA: its record, its certificates, and (unless retired) the CA able to sign.
#[derive(Clone, Debug)]
pub(crate) struct Member {
    pub record: CaRecord,
    /// The CA's own certificate and the root it chains to (the same for a root).
    pub cert: CertificateDer<'static>,
    pub root: CertificateDer<'static>,
    pub ca: Option<Arc<Ca>>,
}

impl Member {
    pub(crate) fn new(record: CaRecord, ca: Ca) -> Member {
        Member {
            cert: ca.cert_der().clone(),
            root: ca.root().clone(),
            ca: Some(Arc::new(ca)),
            record,
        }
    }

    /// When retiring this CA can no longer break a certificate in use (Unix seconds; 0 if
    /// it never signed). A certificate signed at the last moment it was active lives one
    /// SVID lifetime; the extra second covers rounding to whole seconds.
    pub(crate) fn retire_safe_unix(&self) -> u64 {
        match self.record.activated_unix {
            0 => 0,
            _ => self.record.deactivated_unix + self.record.longest_svid_lifetime_secs + 1,
        }
    }

    fn info(&self) -> pb::CaInfo {
        let r = &self.record;
        let unix = |t: std::time::SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        pb::CaInfo {
            sha256: r.sha256.clone(),
            state: r.state.word().to_string(),
            origin: match r.origin {
                CaOrigin::Generated => "generated".into(),
                CaOrigin::Imported => "imported".into(),
            },
            subject: subject_of(&self.cert).unwrap_or_default(),
            not_after_unix: not_after_of(&self.cert).map(unix).unwrap_or(0),
            root_sha256: fingerprint(&self.root),
            root_subject: subject_of(&self.root).unwrap_or_default(),
            added_unix: r.added_unix,
            activated_unix: r.activated_unix,
            deactivated_unix: r.deactivated_unix,
            retired_unix: r.retired_unix,
            retire_safe_unix: match r.state {
                CaState::Trusted => self.retire_safe_unix(),
                _ => 0,
            },
        }
    }
}

/// Why a change to the CA set was refused. The text goes to the operator.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CaChangeError {
    #[error("no CA is named {0:?}; `bulkhead ca status` lists them")]
    Unknown(String),
    #[error(
        "{id:?} is too short to name a CA; give at least {MIN_ID_PREFIX} characters of its SHA-256"
    )]
    TooShort { id: String },
    #[error("{id:?} names several CAs ({matches}); give more characters")]
    Ambiguous { id: String, matches: String },
    #[error("CA {id} is already known (state {state}); a CA is added once")]
    Duplicate { id: String, state: &'static str },
    #[error("CA {id} is retired; add a new CA instead")]
    Retired { id: String },
    #[error("CA {id} already signs")]
    AlreadyActive { id: String },
    #[error("CA {id} signs now and cannot be retired; `bulkhead ca switch` to another CA first")]
    RetireActive { id: String },
    #[error(
        "CA {id} signed certificates that may be valid until {} (in {}s): retiring it now would make peers refuse them. Retry then, or pass --force to retire it anyway",
        crate::cas::utc(*safe_unix),
        safe_unix.saturating_sub(*now_unix)
    )]
    NotYetSafe {
        id: String,
        safe_unix: u64,
        now_unix: u64,
    },
    #[error("the CA set is inconsistent: {0}")]
    Invalid(String),
}

/// The CAs the control plane holds, and the trust bundle they make. Immutable: a change
/// builds a new set.
#[derive(Clone, Debug)]
pub(crate) struct CaSet {
    trust_domain: String,
    members: Vec<Member>,
    active: Arc<Ca>,
    bundle: TrustBundle,
    wire: pb::TrustBundle,
}

impl CaSet {
    /// Checks that exactly one member is active and able to sign, and derives the bundle:
    /// the roots of every CA not retired, the signing CA's first, each once.
    pub(crate) fn new(trust_domain: &str, members: Vec<Member>) -> Result<CaSet, CaChangeError> {
        let mut active = members.iter().filter(|m| m.record.state == CaState::Active);
        let (Some(first), None) = (active.next(), active.next()) else {
            return Err(CaChangeError::Invalid(
                "exactly one CA must be active".into(),
            ));
        };
        let signer = first.ca.clone().ok_or_else(|| {
            CaChangeError::Invalid(format!("the active CA {} has no key", first.record.sha256))
        })?;
        let mut roots: Vec<CertificateDer<'static>> = vec![first.root.clone()];
        for m in &members {
            if m.record.state != CaState::Retired && !roots.contains(&m.root) {
                roots.push(m.root.clone());
            }
        }
        let bundle = TrustBundle::for_trust_domain(trust_domain, roots)
            .map_err(|e| CaChangeError::Invalid(e.to_string()))?;
        let wire = pb::TrustBundle {
            trust_domain: trust_domain.to_string(),
            roots_der: bundle.roots().iter().map(|r| r.to_vec()).collect(),
            signing_ca_sha256: signer.fingerprint(),
            federated: Vec::new(),
            jwt_keys: Vec::new(),
        };
        Ok(CaSet {
            trust_domain: trust_domain.to_string(),
            members,
            active: signer,
            bundle,
            wire,
        })
    }

    pub(crate) fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA that signs.
    pub(crate) fn active(&self) -> &Arc<Ca> {
        &self.active
    }

    pub(crate) fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// The bundle as every proxy receives it.
    pub(crate) fn wire(&self) -> &pb::TrustBundle {
        &self.wire
    }

    pub(crate) fn members(&self) -> &[Member] {
        &self.members
    }

    pub(crate) fn file(&self) -> CaFile {
        CaFile {
            trust_domain: self.trust_domain.clone(),
            cas: self.members.iter().map(|m| m.record.clone()).collect(),
        }
    }

    pub(crate) fn infos(&self) -> Vec<pb::CaInfo> {
        self.members.iter().map(Member::info).collect()
    }

    /// The member `id` (a SHA-256 or a unique prefix of one) names.
    pub(crate) fn find(&self, id: &str) -> Result<&Member, CaChangeError> {
        let id = id.trim().to_ascii_lowercase();
        if id.len() < MIN_ID_PREFIX {
            return Err(CaChangeError::TooShort { id });
        }
        let found: Vec<&Member> = self
            .members
            .iter()
            .filter(|m| m.record.sha256.starts_with(&id))
            .collect();
        match found.as_slice() {
            [] => Err(CaChangeError::Unknown(id)),
            [one] => Ok(one),
            many => Err(CaChangeError::Ambiguous {
                matches: many
                    .iter()
                    .map(|m| short(&m.record.sha256))
                    .collect::<Vec<_>>()
                    .join(", "),
                id,
            }),
        }
    }

    /// With `member` added, trusted and not signing.
    pub(crate) fn with_added(&self, member: Member) -> Result<CaSet, CaChangeError> {
        if let Some(known) = self
            .members
            .iter()
            .find(|m| m.record.sha256 == member.record.sha256)
        {
            return Err(CaChangeError::Duplicate {
                id: short(&known.record.sha256),
                state: known.record.state.word(),
            });
        }
        let mut members = self.members.clone();
        members.push(Member {
            record: CaRecord {
                state: CaState::Trusted,
                ..member.record.clone()
            },
            ..member
        });
        CaSet::new(&self.trust_domain, members)
    }

    /// With `id` signing from `now` on (the old signer becomes trusted), used with SVIDs of
    /// `svid_lifetime`.
    pub(crate) fn with_switched(
        &self,
        id: &str,
        now_unix: u64,
        svid_lifetime: Duration,
    ) -> Result<CaSet, CaChangeError> {
        let target = self.find(id)?.record.sha256.clone();
        let mut members = self.members.clone();
        for m in &mut members {
            let r = &mut m.record;
            match (r.sha256 == target, r.state) {
                (true, CaState::Active) => {
                    return Err(CaChangeError::AlreadyActive { id: short(&target) });
                }
                (true, CaState::Retired) => {
                    return Err(CaChangeError::Retired { id: short(&target) });
                }
                (true, CaState::Trusted) => {
                    r.state = CaState::Active;
                    r.activated_unix = now_unix;
                    r.deactivated_unix = 0;
                    r.longest_svid_lifetime_secs =
                        r.longest_svid_lifetime_secs.max(svid_lifetime.as_secs());
                }
                (false, CaState::Active) => {
                    r.state = CaState::Trusted;
                    r.deactivated_unix = now_unix;
                }
                (false, _) => {}
            }
        }
        CaSet::new(&self.trust_domain, members)
    }

    /// With `id` retired. Refused for the signing CA, and (unless `force`) while
    /// certificates it signed may still be valid. Returns the new set and the retired CA's
    /// record (whose key file is to be deleted).
    pub(crate) fn with_retired(
        &self,
        id: &str,
        now_unix: u64,
        force: bool,
    ) -> Result<(CaSet, CaRecord), CaChangeError> {
        let target = self.find(id)?;
        let short_id = short(&target.record.sha256);
        match target.record.state {
            CaState::Active => return Err(CaChangeError::RetireActive { id: short_id }),
            CaState::Retired => return Err(CaChangeError::Retired { id: short_id }),
            CaState::Trusted => {}
        }
        let safe_unix = target.retire_safe_unix();
        if now_unix < safe_unix && !force {
            return Err(CaChangeError::NotYetSafe {
                id: short_id,
                safe_unix,
                now_unix,
            });
        }
        let sha = target.record.sha256.clone();
        let mut retired = None;
        let members = self
            .members
            .iter()
            .cloned()
            .map(|mut m| {
                if m.record.sha256 == sha {
                    m.record.state = CaState::Retired;
                    m.record.retired_unix = now_unix;
                    m.ca = None;
                    retired = Some(m.record.clone());
                }
                m
            })
            .collect();
        let set = CaSet::new(&self.trust_domain, members)?;
        let record = retired.ok_or_else(|| CaChangeError::Unknown(short(&sha)))?;
        Ok((set, record))
    }

    /// With the signing CA's longest SVID lifetime raised to `svid_lifetime` if it is
    /// longer; `None` if nothing changes.
    pub(crate) fn with_lifetime(&self, svid_lifetime: Duration) -> Option<CaSet> {
        let secs = svid_lifetime.as_secs();
        let mut members = self.members.clone();
        let active = members
            .iter_mut()
            .find(|m| m.record.state == CaState::Active)?;
        if active.record.longest_svid_lifetime_secs >= secs {
            return None;
        }
        active.record.longest_svid_lifetime_secs = secs;
        CaSet::new(&self.trust_domain, members).ok()
    }
}

/// The first 16 hex digits of a SHA-256: how the CLI shows a CA.
pub(crate) fn short(sha256: &str) -> String {
    sha256.chars().take(16).collect()
}

/// `2026-11-25 14:03:07 UTC` for Unix seconds.
pub(crate) fn utc(unix: u64) -> String {
    let secs = unix % 86_400;
    let (year, month, day) = bulkhead_insight::civil_from_days(unix / 86_400);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::SystemTime;

    const TD: &str = "td.test";
    const HOUR: Duration = Duration::from_secs(3600);

    fn member(state: CaState, now: u64) -> Member {
        let ca = Ca::generate(TD, SystemTime::now()).unwrap();
        Member::new(
            CaRecord {
                sha256: ca.fingerprint(),
                state,
                origin: CaOrigin::Generated,
                cert_file: String::new(),
                key_file: String::new(),
                added_unix: now,
                activated_unix: if state == CaState::Active { now } else { 0 },
                deactivated_unix: 0,
                retired_unix: 0,
                longest_svid_lifetime_secs: HOUR.as_secs(),
            },
            ca,
        )
    }

    fn state_of(set: &CaSet, sha: &str) -> CaState {
        set.find(sha).unwrap().record.state
    }

    #[test]
    fn add_switch_retire() {
        let t0 = 1_000_000;
        let old = member(CaState::Active, t0);
        let old_id = old.record.sha256.clone();
        let set = CaSet::new(TD, vec![old]).unwrap();
        assert_eq!(set.bundle().roots().len(), 1);

        let new = member(CaState::Active, t0);
        let new_id = new.record.sha256.clone();
        let set = set.with_added(new).unwrap();
        assert_eq!(
            state_of(&set, &new_id),
            CaState::Trusted,
            "added CAs do not sign"
        );
        assert_eq!(set.active().fingerprint(), old_id);
        assert_eq!(set.bundle().roots().len(), 2);
        assert_eq!(set.wire().signing_ca_sha256, old_id);

        // Retiring a CA that never signed is safe at once; retiring the signer never is.
        assert_eq!(
            set.with_retired(&old_id, t0, true).unwrap_err(),
            CaChangeError::RetireActive { id: short(&old_id) }
        );

        let t1 = t0 + 100;
        let set = set.with_switched(&new_id[..8], t1, HOUR).unwrap();
        assert_eq!(set.active().fingerprint(), new_id);
        assert_eq!(set.wire().signing_ca_sha256, new_id);
        assert_eq!(state_of(&set, &old_id), CaState::Trusted);
        assert_eq!(
            set.bundle().fingerprints()[0],
            set.find(&new_id).unwrap().record.sha256,
            "the signing CA's root comes first"
        );

        // The old CA's certificates live up to one SVID lifetime after the switch.
        let err = set.with_retired(&old_id, t1 + 10, false).unwrap_err();
        assert_eq!(
            err,
            CaChangeError::NotYetSafe {
                id: short(&old_id),
                safe_unix: t1 + 3601,
                now_unix: t1 + 10
            }
        );
        assert!(
            err.to_string()
                .contains(&format!("may be valid until {} (in 3591s)", utc(t1 + 3601))),
            "{err}"
        );
        let (set, record) = set.with_retired(&old_id, t1 + 3601, false).unwrap();
        assert_eq!(record.state, CaState::Retired);
        assert_eq!(set.bundle().roots().len(), 1);
        assert_eq!(set.infos().len(), 2, "a retired CA stays in the record");
        assert!(
            set.find(&old_id).unwrap().ca.is_none(),
            "and its key is gone"
        );
        assert_eq!(
            set.with_switched(&old_id, t1 + 4000, HOUR).unwrap_err(),
            CaChangeError::Retired { id: short(&old_id) }
        );
    }

    #[test]
    fn force_retires_early_and_names_are_checked() {
        let t0 = 1_000_000;
        let a = member(CaState::Active, t0);
        let b = member(CaState::Active, t0);
        let (a_id, b_id) = (a.record.sha256.clone(), b.record.sha256.clone());
        let set = CaSet::new(TD, vec![a])
            .unwrap()
            .with_added(b.clone())
            .unwrap();
        assert!(matches!(
            set.with_added(b).unwrap_err(),
            CaChangeError::Duplicate {
                state: "trusted",
                ..
            }
        ));
        let set = set.with_switched(&b_id, t0 + 1, HOUR).unwrap();
        assert!(set.with_retired(&a_id, t0 + 2, true).is_ok());
        assert_eq!(
            set.find("ab").unwrap_err(),
            CaChangeError::TooShort { id: "ab".into() }
        );
        assert_eq!(
            set.find("zzzzzz").unwrap_err(),
            CaChangeError::Unknown("zzzzzz".into())
        );
        assert_eq!(
            set.with_switched(&b_id, t0 + 3, HOUR).unwrap_err(),
            CaChangeError::AlreadyActive { id: short(&b_id) }
        );
    }

    #[test]
    fn a_longer_lifetime_moves_the_safe_time() {
        let set = CaSet::new(TD, vec![member(CaState::Active, 0)]).unwrap();
        assert!(set.with_lifetime(HOUR).is_none());
        let longer = set.with_lifetime(2 * HOUR).unwrap();
        assert_eq!(longer.members()[0].record.longest_svid_lifetime_secs, 7200);
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_795_566_306), "2026-11-25 00:25:06 UTC");
    }
}
