//! `bulkhead token list|delete`, `bulkhead revoke identity|proxy`, `bulkhead unrevoke
//! identity` and `bulkhead get revocations`: the Credentials service, with the admin
//! credential. Every change is in `bulkhead history`.

use crate::admin_cmd::{ago, request};
use crate::client;
use anyhow::Result;
use bulkhead_api::v1::credentials_client::CredentialsClient;
use bulkhead_api::v1::{
    DeleteTokenRequest, ListRevocationsRequest, ListTokensRequest, Revocation, RevokeRequest,
    TokenInfo, UnrevokeRequest,
};
use bulkhead_insight::rfc3339;
use std::io::Write;
use tonic::transport::Channel;

pub type Credentials = CredentialsClient<Channel>;

fn token_json(t: &TokenInfo) -> serde_json::Value {
    serde_json::json!({
        "id": t.id, "spiffeId": t.spiffe_id, "namespace": t.namespace,
        "workload": t.workload, "usesLeft": t.uses_left,
        "expires": rfc3339(t.expires_unix),
    })
}

fn revocation_json(r: &Revocation) -> serde_json::Value {
    serde_json::json!({
        "kind": r.kind, "subject": r.subject, "reason": r.reason, "actor": r.actor,
        "time": rfc3339(r.time_unix), "spiffeId": r.spiffe_id,
        "namespace": r.namespace, "workload": r.workload,
        "certsValidUntil": rfc3339(r.certs_valid_until_unix),
    })
}

/// Every join token the control plane holds (never a secret).
pub async fn list_tokens(c: &mut Credentials, output: &str, out: &mut dyn Write) -> Result<()> {
    let tokens = c
        .list_tokens(request(ListTokensRequest {}))
        .await
        .map_err(client::status)?
        .into_inner()
        .tokens;
    if output == "json" {
        let rows: Vec<_> = tokens.iter().map(token_json).collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<18} {:<46} {:<24} {:<5} EXPIRES",
        "ID", "IDENTITY", "WORKLOAD", "USES"
    )?;
    for t in &tokens {
        writeln!(
            out,
            "{:<18} {:<46} {:<24} {:<5} {}",
            t.id,
            t.spiffe_id,
            format!("{}/{}", t.namespace, t.workload),
            t.uses_left,
            ago(t.expires_unix)
        )?;
    }
    Ok(())
}

pub async fn delete_token(c: &mut Credentials, id: &str, out: &mut dyn Write) -> Result<()> {
    let token = c
        .delete_token(request(DeleteTokenRequest { id: id.to_string() }))
        .await
        .map_err(client::status)?
        .into_inner()
        .token
        .unwrap_or_default();
    writeln!(
        out,
        "join token {} deleted (it was for {}, workload {}/{}, {} use(s) left)",
        token.id, token.spiffe_id, token.namespace, token.workload, token.uses_left
    )?;
    Ok(())
}

pub async fn revoke(
    c: &mut Credentials,
    kind: &str,
    subject: &str,
    reason: &str,
    out: &mut dyn Write,
) -> Result<()> {
    let resp = c
        .revoke(request(RevokeRequest {
            kind: kind.to_string(),
            subject: subject.to_string(),
            reason: reason.to_string(),
        }))
        .await
        .map_err(client::status)?
        .into_inner();
    let r = resp.revocation.unwrap_or_default();
    match kind {
        "proxy" => writeln!(
            out,
            "proxy instance {} ({}, workload {}/{}) revoked: every proxy refuses its certificates and closes its open connections; its renewals are refused",
            r.subject, r.spiffe_id, r.namespace, r.workload
        )?,
        _ => writeln!(
            out,
            "identity {} revoked: every proxy refuses it and closes its open connections; its joins and renewals are refused",
            r.subject
        )?,
    }
    if !resp.tokens_deleted.is_empty() {
        writeln!(
            out,
            "join tokens deleted: {}",
            resp.tokens_deleted.join(", ")
        )?;
    }
    if !resp.serials.is_empty() {
        writeln!(out, "certificates refused: {}", resp.serials.join(", "))?;
    }
    Ok(())
}

pub async fn unrevoke(c: &mut Credentials, subject: &str, out: &mut dyn Write) -> Result<()> {
    let r = c
        .unrevoke(request(UnrevokeRequest {
            kind: "identity".into(),
            subject: subject.to_string(),
        }))
        .await
        .map_err(client::status)?
        .into_inner()
        .revocation
        .unwrap_or_default();
    writeln!(
        out,
        "identity {} is no longer revoked (it was revoked by {}: {})",
        r.subject, r.actor, r.reason
    )?;
    Ok(())
}

pub async fn list_revocations(
    c: &mut Credentials,
    output: &str,
    out: &mut dyn Write,
) -> Result<()> {
    let revocations = c
        .list_revocations(request(ListRevocationsRequest {}))
        .await
        .map_err(client::status)?
        .into_inner()
        .revocations;
    if output == "json" {
        let rows: Vec<_> = revocations.iter().map(revocation_json).collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<9} {:<46} {:<10} {:<22} REASON",
        "KIND", "SUBJECT", "WHEN", "CERTS VALID UNTIL"
    )?;
    for r in &revocations {
        writeln!(
            out,
            "{:<9} {:<46} {:<10} {:<22} {}",
            r.kind,
            r.subject,
            ago(r.time_unix),
            rfc3339(r.certs_valid_until_unix),
            if r.reason.is_empty() { "-" } else { &r.reason }
        )?;
        if r.kind == "proxy" {
            writeln!(
                out,
                "          {}, workload {}/{}",
                r.spiffe_id, r.namespace, r.workload
            )?;
        }
    }
    Ok(())
}
