//! `bulkhead ca …`: the CAs' status, and rotation: add a root (generated or imported), switch
//! the signing CA, retire the old one. The procedure is in docs/ca.md.

use crate::admin_cmd::{ago, request};
use crate::client;
use anyhow::{Context, Result, bail};
use bulkhead_api::v1::admin_client::AdminClient;
use bulkhead_api::v1::{
    AddCaRequest, CaBundleRequest, CaChangeResponse, CaInfo, CaStatusRequest, CaStatusResponse,
    RetireCaRequest, SwitchCaRequest,
};
use std::path::Path;
use tonic::transport::Channel;

type Admin = AdminClient<Channel>;

/// How the CLI shows a CA: the first 16 hex digits of its SHA-256.
fn short(sha256: &str) -> &str {
    sha256.get(..16).unwrap_or(sha256)
}

pub async fn status(admin: &mut Admin, output: &str) -> Result<()> {
    let status = admin
        .ca_status(request(CaStatusRequest {}))
        .await
        .map_err(client::status)?
        .into_inner();
    if output == "json" {
        println!("{}", serde_json::to_string_pretty(&status_json(&status))?);
    } else {
        print_status(&status);
    }
    Ok(())
}

/// Prints the trust bundle as PEM or as the SPIFFE bundle document.
pub async fn bundle(admin: &mut Admin, output: &str) -> Result<()> {
    let bundle = admin
        .ca_bundle(request(CaBundleRequest {}))
        .await
        .map_err(client::status)?
        .into_inner();
    match output {
        "spiffe" => print!("{}", bundle.spiffe_json),
        _ => print!("{}", bundle.pem),
    }
    Ok(())
}

fn status_json(s: &CaStatusResponse) -> serde_json::Value {
    let cas: Vec<serde_json::Value> = s
        .cas
        .iter()
        .map(|c| {
            serde_json::json!({
                "sha256": c.sha256, "state": c.state, "origin": c.origin,
                "subject": c.subject, "notAfter": crate::jsonstyle::time(c.not_after_unix),
                "rootSha256": c.root_sha256, "rootSubject": c.root_subject,
                "added": crate::jsonstyle::time(c.added_unix),
                "activated": crate::jsonstyle::time(c.activated_unix),
                "deactivated": crate::jsonstyle::time(c.deactivated_unix),
                "retired": crate::jsonstyle::time(c.retired_unix),
                "retireSafe": crate::jsonstyle::time(c.retire_safe_unix),
            })
        })
        .collect();
    serde_json::json!({
        "trustDomain": s.trust_domain,
        "svidLifetimeSeconds": s.svid_lifetime_seconds,
        "bundleSha256": s.bundle_sha256,
        "cas": cas,
        "proxies": {
            "connected": s.proxies_connected,
            "withCurrentBundle": s.proxies_with_current_bundle,
            "onSigningCa": s.proxies_on_signing_ca,
        },
    })
}

fn print_status(s: &CaStatusResponse) {
    println!(
        "trust domain {}, SVID lifetime {}s, bundle of {} root(s)",
        s.trust_domain,
        s.svid_lifetime_seconds,
        s.bundle_sha256.len()
    );
    println!(
        "{:<17} {:<8} {:<6} {:<10} {:<11} SUBJECT",
        "ID", "STATE", "SIGNS", "ORIGIN", "NOT AFTER"
    );
    let now = crate::unix_now();
    for c in &s.cas {
        println!(
            "{:<17} {:<8} {:<6} {:<10} {:<11} {}",
            short(&c.sha256),
            c.state,
            if c.state == "active" { "yes" } else { "no" },
            c.origin,
            ago(c.not_after_unix),
            c.subject
        );
        if c.root_sha256 != c.sha256 {
            println!(
                "{:<17} chains to root {} {}",
                "",
                short(&c.root_sha256),
                c.root_subject
            );
        }
        match c.state.as_str() {
            "trusted" if c.retire_safe_unix > now => println!(
                "{:<17} signed until {}; certificates it signed may still be valid: retire it {} or later",
                "",
                ago(c.deactivated_unix),
                ago(c.retire_safe_unix)
            ),
            "trusted" if c.activated_unix != 0 => println!(
                "{:<17} signed until {}; nothing it signed is valid any more: it can be retired",
                "",
                ago(c.deactivated_unix)
            ),
            "retired" => println!("{:<17} retired {}", "", ago(c.retired_unix)),
            _ => {}
        }
    }
    let signing = s
        .cas
        .iter()
        .find(|c| c.state == "active")
        .map(|c| short(&c.sha256))
        .unwrap_or("-");
    println!(
        "proxies: {} connected, {} hold the current bundle, {} have certificates from the signing CA {signing}",
        s.proxies_connected, s.proxies_with_current_bundle, s.proxies_on_signing_ca
    );
}

fn read(what: &str, path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

fn ca_named(resp: &CaChangeResponse) -> Option<&CaInfo> {
    resp.status
        .as_ref()?
        .cas
        .iter()
        .find(|c| c.sha256 == resp.sha256)
}

pub async fn add_root(
    admin: &mut Admin,
    import_cert: Option<&Path>,
    import_key: Option<&Path>,
    chain: Option<&Path>,
) -> Result<()> {
    let request_body = match (import_cert, import_key) {
        (Some(cert), Some(key)) => AddCaRequest {
            cert_pem: read("--import-cert", cert)?,
            key_pem: read("--import-key", key)?,
            chain_pem: chain
                .map(|c| read("--chain", c))
                .transpose()?
                .unwrap_or_default(),
        },
        (None, None) => AddCaRequest::default(),
        _ => bail!("importing a CA needs both --import-cert and --import-key"),
    };
    let resp = admin
        .add_ca(request(request_body))
        .await
        .map_err(client::status)?
        .into_inner();
    let id = short(&resp.sha256);
    let roots = resp.status.as_ref().map_or(0, |s| s.bundle_sha256.len());
    match ca_named(&resp) {
        Some(c) if c.root_sha256 != c.sha256 => println!(
            "added CA {id} ({}), chaining to root {} ({}): trusted, not signing",
            c.subject,
            short(&c.root_sha256),
            c.root_subject
        ),
        Some(c) => println!("added CA {id} ({}): trusted, not signing", c.subject),
        None => println!("added CA {id}: trusted, not signing"),
    }
    println!(
        "the bundle now holds {roots} root(s) and is being pushed to every proxy.\nnext: when `bulkhead ca status` shows every proxy holding the current bundle, `bulkhead ca switch {id}`"
    );
    Ok(())
}

pub async fn switch(admin: &mut Admin, id: &str, force: bool) -> Result<()> {
    let resp = admin
        .switch_ca(request(SwitchCaRequest {
            id: id.to_string(),
            force,
        }))
        .await
        .map_err(client::status)?
        .into_inner();
    let id = short(&resp.sha256);
    println!(
        "CA {id} signs now: proxies renew soon, and the control plane's certificate and the admin credential were re-issued from it"
    );
    let previous = resp
        .status
        .iter()
        .flat_map(|s| &s.cas)
        .filter(|c| c.state == "trusted" && c.retire_safe_unix > crate::unix_now())
        .max_by_key(|c| c.deactivated_unix);
    if let Some(old) = previous {
        println!(
            "CA {} no longer signs; once the certificates it signed have expired ({}), `bulkhead ca retire {}`",
            short(&old.sha256),
            ago(old.retire_safe_unix),
            short(&old.sha256)
        );
    }
    Ok(())
}

pub async fn retire(admin: &mut Admin, id: &str, force: bool) -> Result<()> {
    let resp = admin
        .retire_ca(request(RetireCaRequest {
            id: id.to_string(),
            force,
        }))
        .await
        .map_err(client::status)?
        .into_inner();
    let roots = resp.status.as_ref().map_or(0, |s| s.bundle_sha256.len());
    println!(
        "retired CA {}: its key is deleted, and the bundle, now of {roots} root(s) without its root, is being pushed to every proxy",
        short(&resp.sha256)
    );
    Ok(())
}
