//! A proxy's configuration in bounded pieces (issue #14): the control plane cuts a revision
//! into several `ProxyConfig` messages of about [`PIECE_BYTES`] each, and the proxy puts
//! them back together with an [`Assembler`] before it uses any of it. So no message limit
//! of the transport stalls a large configuration, and a proxy never applies part of one.
//!
//! Also here, because only this crate knows protobuf: the digest that names a workload's
//! configuration at a revision (so a reconnecting proxy need not be sent what it holds),
//! and the wire size the control plane checks against its per-proxy bound.

use crate::v1::{Endpoint, ProxyConfig, Resource};
use prost::Message;
use sha2::{Digest, Sha256};

/// About how many bytes of resources and endpoints one piece carries: well under gRPC's
/// usual 4 MiB. A single larger resource travels in a piece of its own.
pub const PIECE_BYTES: usize = 1024 * 1024;
/// The largest configuration an [`Assembler`] puts together.
pub const MAX_ASSEMBLED_BYTES: usize = 64 * 1024 * 1024;
/// The most pieces one revision may come in.
pub const MAX_PIECES: u32 = 4096;

/// Why pieces could not be put together. The proxy NACKs the revision with this text and
/// keeps the configuration it has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PieceError {
    #[error(
        "piece {piece} of {pieces} of revision {revision} came out of order (expected piece {expected} of revision {expected_revision})"
    )]
    OutOfOrder {
        revision: u64,
        piece: u32,
        pieces: u32,
        expected: u32,
        expected_revision: u64,
    },
    #[error(
        "revision {revision} would be {bytes} bytes once put together; this proxy takes at most {max}"
    )]
    TooLarge {
        revision: u64,
        bytes: usize,
        max: usize,
    },
    #[error("revision {revision} announced {pieces} pieces; at most {max} are accepted")]
    TooManyPieces {
        revision: u64,
        pieces: u32,
        max: u32,
    },
}

/// The wire size of one resource in a configuration.
pub fn resource_bytes(resource: &Resource) -> usize {
    resource.encoded_len() + 4
}

/// The wire size of the mesh's address table in a configuration.
pub fn endpoints_bytes(endpoints: &[Endpoint]) -> usize {
    endpoints.iter().map(|e| e.encoded_len() + 4).sum()
}

/// SHA-256 (hex) of a workload's configuration: its resources and the address table, in
/// order. Equal configurations have equal digests; any difference changes it.
pub fn digest(resources: &[Resource], endpoints: &[Endpoint]) -> String {
    let mut hash = Sha256::new();
    let mut field = |tag: u8, bytes: &[u8]| {
        hash.update([tag]);
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(bytes);
    };
    for r in resources {
        field(1, r.kind.as_bytes());
        field(2, r.namespace.as_bytes());
        field(3, r.name.as_bytes());
        field(4, r.json.as_bytes());
    }
    for e in endpoints {
        field(5, &e.encode_to_vec());
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Cuts `config` into pieces of about `piece_bytes` of resources and endpoints each, in
/// order, every one carrying the revision and digest, the trust bundle in the last. A
/// configuration that fits is one piece (`pieces` 1).
pub fn split(config: ProxyConfig, piece_bytes: usize) -> Vec<ProxyConfig> {
    let empty = |c: &ProxyConfig| ProxyConfig {
        revision: c.revision,
        digest: c.digest.clone(),
        ..ProxyConfig::default()
    };
    let mut pieces = vec![empty(&config)];
    let mut size = 0;
    let ProxyConfig {
        resources,
        endpoints,
        trust_bundle,
        revocations,
        ..
    } = config.clone();
    let start_new = |pieces: &mut Vec<ProxyConfig>, size: &mut usize, add: usize| {
        if *size > 0 && *size + add > piece_bytes {
            pieces.push(empty(&config));
            *size = 0;
        }
        *size += add;
    };
    for r in resources {
        start_new(&mut pieces, &mut size, resource_bytes(&r));
        if let Some(last) = pieces.last_mut() {
            last.resources.push(r);
        }
    }
    for e in endpoints {
        start_new(&mut pieces, &mut size, e.encoded_len() + 4);
        if let Some(last) = pieces.last_mut() {
            last.endpoints.push(e);
        }
    }
    let count = pieces.len() as u32;
    for (i, p) in pieces.iter_mut().enumerate() {
        p.piece = i as u32;
        p.pieces = count;
    }
    if let Some(last) = pieces.last_mut() {
        last.trust_bundle = trust_bundle;
        last.revocations = revocations;
    }
    pieces
}

/// Puts a revision's pieces back together, in order, within bounds.
#[derive(Debug, Default)]
pub struct Assembler {
    /// The revision being put together, its first piece's header and what came so far.
    partial: Option<ProxyConfig>,
    next: u32,
    bytes: usize,
}

impl Assembler {
    /// Takes the next message of the stream. Returns the whole configuration once its last
    /// piece has come (a message that is a whole revision, at once); `None` while pieces
    /// are missing. A piece out of order, or a revision over the bounds, is an error that
    /// drops what was gathered.
    pub fn push(&mut self, piece: ProxyConfig) -> Result<Option<ProxyConfig>, PieceError> {
        // A whole revision, or the first piece of one, starts afresh: it supersedes anything
        // gathered (the control plane never interleaves revisions, so that is a revision
        // it stopped sending).
        if piece.piece == 0 {
            self.partial = None;
            self.next = 0;
            self.bytes = 0;
            if piece.pieces <= 1 {
                return Ok(Some(ProxyConfig {
                    piece: 0,
                    pieces: 1,
                    ..piece
                }));
            }
        }
        if piece.pieces > MAX_PIECES {
            self.partial = None;
            return Err(PieceError::TooManyPieces {
                revision: piece.revision,
                pieces: piece.pieces,
                max: MAX_PIECES,
            });
        }
        let in_order = match &self.partial {
            None => piece.piece == 0,
            Some(p) => {
                piece.piece == self.next
                    && piece.revision == p.revision
                    && piece.pieces == p.pieces
                    && piece.digest == p.digest
            }
        };
        if !in_order {
            let (expected, expected_revision) = match self.partial.take() {
                Some(p) => (self.next, p.revision),
                None => (0, piece.revision),
            };
            return Err(PieceError::OutOfOrder {
                revision: piece.revision,
                piece: piece.piece,
                pieces: piece.pieces,
                expected,
                expected_revision,
            });
        }
        self.bytes += piece.resources.iter().map(resource_bytes).sum::<usize>()
            + endpoints_bytes(&piece.endpoints);
        if self.bytes > MAX_ASSEMBLED_BYTES {
            self.partial = None;
            return Err(PieceError::TooLarge {
                revision: piece.revision,
                bytes: self.bytes,
                max: MAX_ASSEMBLED_BYTES,
            });
        }
        let last = piece.piece + 1 == piece.pieces;
        match &mut self.partial {
            None => {
                self.partial = Some(piece);
            }
            Some(p) => {
                p.resources.extend(piece.resources);
                p.endpoints.extend(piece.endpoints);
                if piece.trust_bundle.is_some() {
                    p.trust_bundle = piece.trust_bundle;
                }
                if piece.revocations.is_some() {
                    p.revocations = piece.revocations;
                }
            }
        }
        self.next += 1;
        if !last {
            return Ok(None);
        }
        self.next = 0;
        self.bytes = 0;
        Ok(self.partial.take().map(|p| ProxyConfig {
            piece: 0,
            pieces: 1,
            ..p
        }))
    }

    /// The revision being put together, if pieces of one have come.
    pub fn receiving(&self) -> Option<u64> {
        self.partial.as_ref().map(|p| p.revision)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::v1::{EndpointPort, TrustBundle};

    fn resource(i: usize, bytes: usize) -> Resource {
        Resource {
            kind: "AuthorizationPolicy".into(),
            namespace: "shop".into(),
            name: format!("p{i}"),
            json: "x".repeat(bytes),
        }
    }

    fn config(resources: usize, bytes_each: usize) -> ProxyConfig {
        let resources: Vec<Resource> = (0..resources).map(|i| resource(i, bytes_each)).collect();
        let endpoints = vec![Endpoint {
            address: "10.0.0.1".into(),
            namespace: "shop".into(),
            name: "orders".into(),
            identity: "spiffe://td/ns/shop/sa/orders".into(),
            ports: vec![EndpointPort {
                port: 8080,
                protocol: "http".into(),
            }],
        }];
        ProxyConfig {
            revision: 7,
            digest: digest(&resources, &endpoints),
            resources,
            endpoints,
            trust_bundle: Some(TrustBundle {
                trust_domain: "td".into(),
                roots_der: vec![vec![1, 2, 3]],
                signing_ca_sha256: "ab".into(),
                federated: Vec::new(),
                jwt_keys: Vec::new(),
            }),
            revocations: Some(crate::v1::Revocations {
                identities: vec!["spiffe://td/ns/shop/sa/leaked".into()],
                serials: vec!["0a:0b".into()],
            }),
            ..ProxyConfig::default()
        }
    }

    fn whole(c: &ProxyConfig) -> ProxyConfig {
        ProxyConfig {
            piece: 0,
            pieces: 1,
            ..c.clone()
        }
    }

    #[test]
    fn a_large_configuration_goes_in_bounded_pieces_and_comes_back_whole() {
        let big = config(40, 100_000);
        let pieces = split(big.clone(), PIECE_BYTES);
        assert_eq!(pieces.len(), 4, "about 4 MB in pieces of 1 MiB");
        for (i, p) in pieces.iter().enumerate() {
            assert_eq!((p.piece, p.pieces, p.revision), (i as u32, 4, 7));
            assert_eq!(p.digest, big.digest);
            assert!(
                p.encoded_len() < PIECE_BYTES + 64 * 1024,
                "{}",
                p.encoded_len()
            );
            assert_eq!(p.trust_bundle.is_some(), i == 3, "the bundle comes last");
            assert_eq!(p.revocations.is_some(), i == 3, "with the revocations");
        }
        let mut a = Assembler::default();
        let mut out = None;
        for (i, p) in pieces.into_iter().enumerate() {
            let r = a.push(p).unwrap();
            if i < 3 {
                assert!(r.is_none(), "nothing is used before the last piece");
                assert_eq!(a.receiving(), Some(7));
            } else {
                out = r;
            }
        }
        assert_eq!(out.unwrap(), whole(&big));
        assert_eq!(a.receiving(), None);
    }

    #[test]
    fn a_small_configuration_is_one_message_and_a_huge_resource_travels_alone() {
        let small = config(3, 10);
        let pieces = split(small.clone(), PIECE_BYTES);
        assert_eq!(pieces.len(), 1);
        assert_eq!(
            Assembler::default().push(pieces[0].clone()).unwrap(),
            Some(whole(&small))
        );

        let mut odd = config(3, 10);
        odd.resources.insert(1, resource(99, 3 * PIECE_BYTES));
        let pieces = split(odd.clone(), PIECE_BYTES);
        assert_eq!(pieces.len(), 3);
        assert_eq!(pieces[1].resources.len(), 1);
        let mut a = Assembler::default();
        let got: Vec<_> = pieces.into_iter().map(|p| a.push(p).unwrap()).collect();
        assert_eq!(
            got[2].clone().unwrap().resources,
            odd.resources,
            "order kept"
        );
    }

    #[test]
    fn pieces_out_of_order_or_of_two_revisions_are_refused_and_forgotten() {
        let pieces = split(config(30, 100_000), PIECE_BYTES);
        let mut a = Assembler::default();
        let err = a.push(pieces[1].clone()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "piece 1 of 3 of revision 7 came out of order (expected piece 0 of revision 7)"
        );
        a.push(pieces[0].clone()).unwrap();
        let mut other = pieces[1].clone();
        other.revision = 8;
        assert!(matches!(a.push(other), Err(PieceError::OutOfOrder { .. })));
        // What was gathered is gone: the next piece 0 starts afresh and completes.
        for p in &pieces[..2] {
            assert_eq!(a.push(p.clone()).unwrap(), None);
        }
        assert!(a.push(pieces[2].clone()).unwrap().is_some());
        // A whole revision in the middle of another one supersedes it; the rest of the
        // other one is then out of order.
        a.push(pieces[0].clone()).unwrap();
        assert_eq!(
            a.push(whole(&config(1, 1))).unwrap(),
            Some(whole(&config(1, 1)))
        );
        assert!(a.push(pieces[1].clone()).is_err());
    }

    #[test]
    fn an_assembly_past_the_bounds_is_refused() {
        let mut a = Assembler::default();
        let mut p = config(1, 1);
        p.pieces = MAX_PIECES + 1;
        assert!(matches!(a.push(p), Err(PieceError::TooManyPieces { .. })));
        let mut a = Assembler::default();
        let piece = |i: u32| ProxyConfig {
            revision: 9,
            piece: i,
            pieces: 100,
            resources: vec![resource(0, MAX_ASSEMBLED_BYTES / 10)],
            ..ProxyConfig::default()
        };
        let mut refused = None;
        for i in 0..100 {
            if let Err(e) = a.push(piece(i)) {
                refused = Some((i, e));
                break;
            }
        }
        let (at, err) = refused.unwrap();
        assert_eq!(
            at, 9,
            "the tenth piece passes the bound (each is a tenth and a bit)"
        );
        assert!(err.to_string().starts_with("revision 9 would be "), "{err}");
    }

    #[test]
    fn the_digest_names_the_content() {
        let a = config(3, 10);
        let mut b = a.clone();
        assert_eq!(
            digest(&a.resources, &a.endpoints),
            digest(&b.resources, &b.endpoints)
        );
        b.resources[2].json.push('y');
        assert_ne!(
            digest(&a.resources, &a.endpoints),
            digest(&b.resources, &b.endpoints)
        );
        let mut c = a.clone();
        c.endpoints[0].address = "10.0.0.2".into();
        assert_ne!(
            digest(&a.resources, &a.endpoints),
            digest(&c.resources, &c.endpoints)
        );
        // Field boundaries count: moving bytes between fields changes the digest.
        let mut d = a.clone();
        d.resources[0].name.push('x');
        d.resources[0].json.remove(0);
        assert_ne!(
            digest(&a.resources, &a.endpoints),
            digest(&d.resources, &d.endpoints)
        );
    }
}
