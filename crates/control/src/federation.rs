//! SPIFFE federation: the trust domains this mesh federates with (`bulkhead control
//! --federation FILE`, `FederatedTrustDomain` documents shaped like SPIRE's), their bundles
//! fetched from their bundle endpoints and refreshed, and pushed to every proxy.
//!
//! A foreign bundle endpoint is reached in the `https_spiffe` profile: TLS 1.3, its
//! certificate verified against the last bundle known for that trust domain (the bootstrap
//! bundle the first time) and its SPIFFE ID checked, never a host name. The bundle is
//! refreshed at the `spiffe_refresh_hint` it carries; on any failure the last good bundle
//! stays in force, the failure is counted (`bulkhead_federation_refresh_failures_total`),
//! logged, and recorded once per run of failures as a `federation-refresh-failed` event. The
//! last good bundle of each domain is kept in `DATA_DIR/federation/<trust domain>.json`, so a
//! restart authenticates the endpoint with what it last learned, not the bootstrap.
//!
//! Proxies trust a federated domain's roots for that domain's identities only
//! (`bulkhead_identity::tls`); this module never adds a root to our own trust domain.

use crate::error::ControlError;
use crate::service::State;
use base64::Engine;
use bulkhead_identity::jwt::JwtPublicKey;
use bulkhead_identity::tls::{ExpectedServer, client_config, server_name};
use bulkhead_identity::{SpiffeId, TrustBundle, TrustDomain, fingerprint};
use bulkhead_insight::events::{Event, EventKind};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::CertificateDer;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A bundle endpoint that does not answer within this is a failed refresh.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// A bundle document larger than this is refused.
const MAX_BUNDLE_BYTES: usize = 1024 * 1024;
/// When a bundle gives no refresh hint, SPIRE's default.
const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// Refresh hints are kept within these bounds, whatever a bundle says.
const MIN_REFRESH: Duration = Duration::from_secs(1);
const MAX_REFRESH: Duration = Duration::from_secs(24 * 3600);
/// After a failure, try again at the refresh hint or this, whichever is sooner.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);

/// The federated trust domains, each with its roots (DER) and JWT-SVID keys, as proxies
/// receive them.
pub(crate) type FederatedRoots = BTreeMap<String, Federated>;

/// What proxies need of one federated trust domain.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Federated {
    pub roots: Vec<Vec<u8>>,
    pub jwt_keys: Vec<JwtPublicKey>,
}

/// One `FederatedTrustDomain` document, as written in the `--federation` file.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Document {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: Spec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    #[serde(rename = "trustDomain")]
    trust_domain: String,
    #[serde(rename = "bundleEndpointURL")]
    bundle_endpoint_url: String,
    #[serde(rename = "bundleEndpointProfile")]
    bundle_endpoint_profile: Profile,
    /// The bootstrap bundle, a SPIFFE bundle document (JSON) inline, as SPIRE takes it…
    #[serde(rename = "trustDomainBundle", default)]
    trust_domain_bundle: Option<String>,
    /// …or in a file (relative paths from the `--federation` file's directory).
    #[serde(rename = "trustDomainBundleFile", default)]
    trust_domain_bundle_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Profile {
    #[serde(rename = "type")]
    kind: String,
    #[serde(rename = "endpointSPIFFEID")]
    endpoint_spiffe_id: String,
}

/// A trust domain this mesh federates with, checked.
#[derive(Clone, Debug)]
pub struct FederatedTrustDomain {
    pub name: String,
    pub trust_domain: String,
    /// `https://HOST:PORT/PATH`.
    pub url: http::Uri,
    /// The SPIFFE ID the bundle endpoint must present.
    pub endpoint_id: SpiffeId,
    /// The bundle that authenticates the endpoint the first time.
    pub bootstrap: ForeignBundle,
}

/// A SPIFFE bundle document of another trust domain, parsed: its X.509 roots, sequence and
/// refresh hint.
#[derive(Clone, Debug, PartialEq)]
pub struct ForeignBundle {
    pub roots: Vec<CertificateDer<'static>>,
    /// Its `jwt-svid` keys that can be read (EC P-256 with a `kid`); others are left aside.
    pub jwt_keys: Vec<JwtPublicKey>,
    pub sequence: Option<u64>,
    pub refresh_hint: Option<u64>,
    /// The document as received, kept as the last good bundle.
    text: String,
}

impl ForeignBundle {
    /// Parses a SPIFFE bundle document (a JWK Set) for `trust_domain`: every `x509-svid`
    /// key's single `x5c` certificate is a root; other keys are left aside. Refused if it
    /// is not such a document, a certificate does not parse, or there is no root.
    pub fn parse(trust_domain: &str, text: &str) -> Result<ForeignBundle, String> {
        #[derive(Deserialize)]
        struct Doc {
            keys: Vec<serde_json::Value>,
            #[serde(default)]
            spiffe_sequence: Option<u64>,
            #[serde(default)]
            spiffe_refresh_hint: Option<u64>,
        }
        let doc: Doc = serde_json::from_str(text)
            .map_err(|e| format!("not a SPIFFE bundle document (a JWK Set): {e}"))?;
        let mut roots = Vec::new();
        let mut jwt_keys = Vec::new();
        for (i, key) in doc.keys.iter().enumerate() {
            match key.get("use").and_then(|u| u.as_str()) {
                Some("x509-svid") => {}
                Some("jwt-svid") => {
                    match JwtPublicKey::from_json(key) {
                        Ok(k) => jwt_keys.push(k),
                        Err(e) => {
                            tracing::debug!(
                                trust_domain,
                                key = i,
                                error = e,
                                "a jwt-svid key left aside"
                            );
                        }
                    }
                    continue;
                }
                _ => continue,
            }
            let x5c = key
                .get("x5c")
                .and_then(|v| v.as_array())
                .filter(|a| a.len() == 1)
                .and_then(|a| a[0].as_str())
                .ok_or_else(|| {
                    format!("key {i}: an x509-svid key must carry exactly one certificate in x5c")
                })?;
            let der = base64::engine::general_purpose::STANDARD
                .decode(x5c)
                .map_err(|e| format!("key {i}: x5c is not base64: {e}"))?;
            roots.push(CertificateDer::from(der));
        }
        // Checks the trust domain's name and that every root parses.
        TrustBundle::for_trust_domain(trust_domain, roots.clone())
            .map_err(|e| format!("no usable X.509 root: {e}"))?;
        Ok(ForeignBundle {
            roots,
            jwt_keys,
            sequence: doc.spiffe_sequence,
            refresh_hint: doc.spiffe_refresh_hint,
            text: text.to_string(),
        })
    }

    fn fingerprints(&self) -> Vec<String> {
        self.roots.iter().map(|r| short(&fingerprint(r))).collect()
    }

    fn refresh(&self) -> Duration {
        self.refresh_hint
            .map_or(DEFAULT_REFRESH, Duration::from_secs)
            .clamp(MIN_REFRESH, MAX_REFRESH)
    }
}

fn short(sha256: &str) -> String {
    sha256.get(..16).unwrap_or(sha256).to_string()
}

/// Reads and checks the `--federation` file: YAML documents of kind `FederatedTrustDomain`.
pub fn read(
    path: &Path,
    own_trust_domain: &str,
) -> Result<Vec<FederatedTrustDomain>, ControlError> {
    let fail = |message: String| ControlError::Federation {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let docs: Vec<Document> =
        serde_saphyr::from_multiple(&text).map_err(|e| fail(e.to_string()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut out: Vec<FederatedTrustDomain> = Vec::new();
    for doc in docs {
        let d = check(doc, base, own_trust_domain).map_err(&fail)?;
        if out.iter().any(|o| o.trust_domain == d.trust_domain) {
            return Err(fail(format!(
                "trust domain {} is federated twice; keep one FederatedTrustDomain per trust domain",
                d.trust_domain
            )));
        }
        out.push(d);
    }
    Ok(out)
}

fn check(doc: Document, base: &Path, own: &str) -> Result<FederatedTrustDomain, String> {
    let name = doc.metadata.name;
    let at = |m: String| format!("FederatedTrustDomain {name}: {m}");
    if doc.api_version != "bulkhead.dev/v1alpha1" || doc.kind != "FederatedTrustDomain" {
        return Err(at(format!(
            "expected apiVersion bulkhead.dev/v1alpha1 and kind FederatedTrustDomain, found {} {}",
            doc.api_version, doc.kind
        )));
    }
    let spec = doc.spec;
    let td =
        TrustDomain::parse(&spec.trust_domain).map_err(|e| at(format!("spec.trustDomain: {e}")))?;
    if td.as_str() == own {
        return Err(at(format!(
            "spec.trustDomain {own} is this mesh's own trust domain; federate only with others"
        )));
    }
    let url: http::Uri = spec
        .bundle_endpoint_url
        .parse()
        .map_err(|e| at(format!("spec.bundleEndpointURL: {e}")))?;
    if url.scheme_str() != Some("https") || url.host().is_none() {
        return Err(at(format!(
            "spec.bundleEndpointURL {url} must be an https:// URL with a host"
        )));
    }
    if spec.bundle_endpoint_profile.kind != "https_spiffe" {
        return Err(at(format!(
            "spec.bundleEndpointProfile.type {:?}: only https_spiffe is supported",
            spec.bundle_endpoint_profile.kind
        )));
    }
    let endpoint_id = SpiffeId::parse(&spec.bundle_endpoint_profile.endpoint_spiffe_id)
        .map_err(|e| at(format!("spec.bundleEndpointProfile.endpointSPIFFEID: {e}")))?;
    if endpoint_id.trust_domain() != td.as_str() {
        return Err(at(format!(
            "spec.bundleEndpointProfile.endpointSPIFFEID {endpoint_id} is not in trust domain {td}: the endpoint is authenticated with that domain's own bundle"
        )));
    }
    let bootstrap = match (spec.trust_domain_bundle, spec.trust_domain_bundle_file) {
        (Some(text), None) => text,
        (None, Some(file)) => {
            let file = base.join(file);
            std::fs::read_to_string(&file).map_err(|e| {
                at(format!(
                    "spec.trustDomainBundleFile {}: {e}",
                    file.display()
                ))
            })?
        }
        _ => {
            return Err(at(
                "give the bootstrap bundle (the other domain's `bulkhead ca bundle -o spiffe`) as exactly one of spec.trustDomainBundle or spec.trustDomainBundleFile".into(),
            ));
        }
    };
    let bootstrap = ForeignBundle::parse(td.as_str(), &bootstrap)
        .map_err(|e| at(format!("the bootstrap bundle: {e}")))?;
    Ok(FederatedTrustDomain {
        name,
        trust_domain: td.as_str().to_string(),
        url,
        endpoint_id,
        bootstrap,
    })
}

/// Where the last good bundle of `trust_domain` is kept.
fn kept_path(data_dir: &Path, trust_domain: &str) -> PathBuf {
    data_dir
        .join("federation")
        .join(format!("{trust_domain}.json"))
}

fn keep(data_dir: &Path, trust_domain: &str, bundle: &ForeignBundle) -> std::io::Result<()> {
    let path = kept_path(data_dir, trust_domain);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, &bundle.text)?;
    std::fs::rename(&tmp, &path)
}

/// Starts following every federated trust domain: each one's last good bundle (kept, else
/// its bootstrap) is trusted at once, then refreshed from its endpoint.
pub(crate) fn spawn(state: Arc<State>, domains: Vec<FederatedTrustDomain>) {
    let data_dir = state.dir.path().to_path_buf();
    let mut initial = Vec::new();
    for d in domains {
        let kept = std::fs::read_to_string(kept_path(&data_dir, &d.trust_domain))
            .ok()
            .and_then(|text| match ForeignBundle::parse(&d.trust_domain, &text) {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::warn!(trust_domain = d.trust_domain, error = e, "the kept bundle of a federated trust domain is unusable; starting from the bootstrap bundle");
                    None
                }
            });
        let current = kept.unwrap_or_else(|| d.bootstrap.clone());
        tracing::info!(
            trust_domain = d.trust_domain,
            endpoint = %d.url,
            endpoint_id = %d.endpoint_id,
            roots = ?current.fingerprints(),
            sequence = current.sequence,
            "federating with another trust domain"
        );
        publish(&state, &d.trust_domain, &current);
        initial.push((d, current));
    }
    for (d, current) in initial {
        tokio::spawn(follow(state.clone(), d, current, data_dir.clone()));
    }
}

fn publish(state: &State, trust_domain: &str, bundle: &ForeignBundle) {
    let federated = Federated {
        roots: bundle.roots.iter().map(|r| r.to_vec()).collect(),
        jwt_keys: bundle.jwt_keys.clone(),
    };
    state.federated.send_if_modified(|map| {
        if map.get(trust_domain) == Some(&federated) {
            return false;
        }
        let mut next = (**map).clone();
        next.insert(trust_domain.to_string(), federated);
        *map = Arc::new(next);
        true
    });
}

/// Refreshes one trust domain's bundle for as long as the control plane runs.
async fn follow(
    state: Arc<State>,
    d: FederatedTrustDomain,
    mut current: ForeignBundle,
    data_dir: PathBuf,
) {
    let mut failing = false;
    loop {
        let wait = match refresh(&d, &current).await {
            Ok(fetched) => {
                state.metrics.federation_refreshed(&d.trust_domain);
                if failing {
                    tracing::info!(
                        trust_domain = d.trust_domain,
                        "the federated bundle endpoint answers again"
                    );
                    failing = false;
                }
                if fetched.roots != current.roots
                    || fetched.jwt_keys != current.jwt_keys
                    || fetched.sequence != current.sequence
                {
                    tracing::info!(
                        trust_domain = d.trust_domain,
                        roots = ?fetched.fingerprints(),
                        sequence = fetched.sequence,
                        "new bundle of a federated trust domain; pushed to every proxy"
                    );
                    if let Err(e) = keep(&data_dir, &d.trust_domain, &fetched) {
                        tracing::warn!(trust_domain = d.trust_domain, error = %e, "cannot keep the federated bundle on disk; a restart would start from an older one");
                    }
                    publish(&state, &d.trust_domain, &fetched);
                }
                let wait = fetched.refresh();
                current = fetched;
                wait
            }
            Err(reason) => {
                state.metrics.federation_failed(&d.trust_domain);
                tracing::warn!(
                    trust_domain = d.trust_domain,
                    endpoint = %d.url,
                    reason,
                    roots = ?current.fingerprints(),
                    "cannot refresh a federated trust domain's bundle; its last good bundle stays in force"
                );
                if !failing {
                    failing = true;
                    record_failure(&state, &d, &reason);
                }
                current.refresh().min(RETRY_AFTER_FAILURE)
            }
        };
        tokio::time::sleep(wait).await;
    }
}

fn record_failure(state: &State, d: &FederatedTrustDomain, reason: &str) {
    let now = crate::proxies::unix_now();
    let event = Event {
        seq: 0,
        at: now,
        kind: EventKind::FederationRefreshFailed,
        source_identity: None,
        source_workload: None,
        destination: None,
        port: None,
        requests: 0,
        denied: 0,
        detail: format!(
            "the bundle of federated trust domain {} could not be refreshed from {} ({reason}); its last good bundle stays in force",
            d.trust_domain, d.url
        ),
        replica: None,
    };
    match state
        .store
        .append_events(vec![event], now, &crate::anomaly::EVENT_RETENTION)
    {
        Ok(_) => state.metrics.anomaly(EventKind::FederationRefreshFailed),
        Err(e) => tracing::warn!(error = %e, "cannot record the federation event"),
    }
}

/// Fetches the bundle from the endpoint, authenticated with `known`'s roots, and checks it.
async fn refresh(d: &FederatedTrustDomain, known: &ForeignBundle) -> Result<ForeignBundle, String> {
    let text = tokio::time::timeout(FETCH_TIMEOUT, fetch(d, known))
        .await
        .map_err(|_| format!("no answer within {FETCH_TIMEOUT:?}"))??;
    let fetched = ForeignBundle::parse(&d.trust_domain, &text)?;
    if let (Some(new), Some(old)) = (fetched.sequence, known.sequence)
        && new < old
    {
        return Err(format!(
            "the endpoint served spiffe_sequence {new}, older than the {old} already known; refused as a rollback"
        ));
    }
    Ok(fetched)
}

async fn fetch(d: &FederatedTrustDomain, known: &ForeignBundle) -> Result<String, String> {
    let bundle = TrustBundle::for_trust_domain(&d.trust_domain, known.roots.clone())
        .map_err(|e| e.to_string())?;
    let tls = client_config(
        None,
        &bundle,
        ExpectedServer::Exact(d.endpoint_id.clone()),
        &[b"http/1.1"],
    )
    .map_err(|e| e.to_string())?;
    let host = d.url.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = d.url.port_u16().unwrap_or(443);
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    let mut last = format!("{host} resolves to no address");
    for addr in addrs {
        match get(addr, &tls, d).await {
            Ok(text) => return Ok(text),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(last)
}

async fn get(
    addr: std::net::SocketAddr,
    tls: &rustls::ClientConfig,
    d: &FederatedTrustDomain,
) -> Result<String, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls.clone()))
        .connect(server_name(), tcp)
        .await
        .map_err(|e| format!("TLS (https_spiffe, expecting {}): {e}", d.endpoint_id))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let path = d
        .url
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let authority = d.url.authority().map(|a| a.to_string()).unwrap_or_default();
    let req = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    if resp.status() != http::StatusCode::OK {
        return Err(format!("the endpoint answered {}", resp.status()));
    }
    let body = Limited::new(resp.into_body(), MAX_BUNDLE_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading the bundle (at most {MAX_BUNDLE_BYTES} bytes): {e}"))?
        .to_bytes();
    String::from_utf8(body.to_vec()).map_err(|_| "the bundle is not UTF-8".to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn bundle_of(ca: &bulkhead_identity::Ca, sequence: u64) -> String {
        let key = bulkhead_identity::jwk::x509_svid_key(ca.cert_der()).unwrap();
        serde_json::json!({
            "keys": [{"use": "x509-svid", "x5c": [key.x5c], "kty": "EC"},
                     {"use": "jwt-svid", "kid": "k", "kty": "EC"}],
            "spiffe_sequence": sequence,
            "spiffe_refresh_hint": 2,
        })
        .to_string()
    }

    #[test]
    fn a_bundle_document_gives_its_x509_roots() {
        let ca = bulkhead_identity::Ca::generate("a.test", std::time::SystemTime::now()).unwrap();
        let b = ForeignBundle::parse("a.test", &bundle_of(&ca, 3)).unwrap();
        assert_eq!(b.roots, vec![ca.cert_der().clone()]);
        assert_eq!((b.sequence, b.refresh()), (Some(3), Duration::from_secs(2)));
        for bad in [
            "{}",
            r#"{"keys": []}"#,
            r#"{"keys": [{"use": "x509-svid", "x5c": ["!!"]}]}"#,
            r#"{"keys": [{"use": "x509-svid", "x5c": ["AAAA"]}]}"#,
            r#"{"keys": [{"use": "x509-svid", "x5c": []}]}"#,
        ] {
            assert!(ForeignBundle::parse("a.test", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_federation_file_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let ca = bulkhead_identity::Ca::generate("a.test", std::time::SystemTime::now()).unwrap();
        std::fs::write(dir.path().join("a.json"), bundle_of(&ca, 1)).unwrap();
        let doc = |td: &str, url: &str, id: &str, bundle: &str| {
            format!(
                "apiVersion: bulkhead.dev/v1alpha1\nkind: FederatedTrustDomain\nmetadata: {{name: a}}\nspec:\n  trustDomain: {td}\n  bundleEndpointURL: {url}\n  bundleEndpointProfile: {{type: https_spiffe, endpointSPIFFEID: {id}}}\n  {bundle}\n"
            )
        };
        let file = dir.path().join("federation.yaml");
        let read_doc = |text: &str| {
            std::fs::write(&file, text).unwrap();
            read(&file, "b.test").map_err(|e| e.to_string())
        };
        let good = doc(
            "a.test",
            "https://127.0.0.1:8443/",
            "spiffe://a.test/bulkhead/bundle-endpoint",
            "trustDomainBundleFile: a.json",
        );
        let d = read_doc(&good).unwrap();
        assert_eq!(d[0].trust_domain, "a.test");
        assert_eq!(d[0].bootstrap.roots, vec![ca.cert_der().clone()]);
        let refused = [
            (
                doc(
                    "b.test",
                    "https://h/",
                    "spiffe://b.test/e",
                    "trustDomainBundleFile: a.json",
                ),
                "own trust domain",
            ),
            (
                doc(
                    "a.test",
                    "http://h/",
                    "spiffe://a.test/e",
                    "trustDomainBundleFile: a.json",
                ),
                "https://",
            ),
            (
                doc(
                    "a.test",
                    "https://h/",
                    "spiffe://c.test/e",
                    "trustDomainBundleFile: a.json",
                ),
                "is not in trust domain a.test",
            ),
            (
                doc("a.test", "https://h/", "spiffe://a.test/e", "x: 1"),
                "unknown field",
            ),
            (
                doc(
                    "a.test",
                    "https://h/",
                    "spiffe://a.test/e",
                    "trustDomainBundle: '{}'",
                ),
                "bootstrap bundle",
            ),
            (format!("{good}---\n{good}"), "federated twice"),
        ];
        for (text, why) in refused {
            let err = read_doc(&text).unwrap_err();
            assert!(err.contains(why), "{why}: {err}");
        }
    }
}
