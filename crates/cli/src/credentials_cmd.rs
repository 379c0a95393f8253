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
pub async fn list_tokens(
    c: &mut Credentials,
    namespace: Option<&str>,
    output: &str,
    out: &mut dyn Write,
) -> Result<()> {
    let tokens = c
        .list_tokens(request(ListTokensRequest {}))
        .await
        .map_err(client::status)?
        .into_inner()
        .tokens;
    print_tokens(&tokens, namespace, output, out)
}

/// The tokens (of `namespace`'s workloads, if given) as `output` asks: `table`, `wide` (with
/// the expiry as a time), `json`, `yaml` or `name` (`token/<id>`).
fn print_tokens(
    tokens: &[TokenInfo],
    namespace: Option<&str>,
    output: &str,
    out: &mut dyn Write,
) -> Result<()> {
    let tokens: Vec<&TokenInfo> = tokens
        .iter()
        .filter(|t| namespace.is_none_or(|ns| t.namespace == ns))
        .collect();
    match output {
        "json" | "yaml" => {
            let rows: Vec<_> = tokens.iter().map(|t| token_json(t)).collect();
            match output {
                "yaml" => write!(out, "{}", serde_saphyr::to_string(&rows)?)?,
                _ => writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?,
            }
        }
        "name" => {
            for t in &tokens {
                writeln!(out, "token/{}", t.id)?;
            }
        }
        _ => {
            let wide = output == "wide";
            let rows: Vec<[String; 6]> = tokens
                .iter()
                .map(|t| {
                    [
                        t.id.clone(),
                        t.spiffe_id.clone(),
                        format!("{}/{}", t.namespace, t.workload),
                        t.uses_left.to_string(),
                        ago(t.expires_unix),
                        if wide {
                            rfc3339(t.expires_unix)
                        } else {
                            String::new()
                        },
                    ]
                })
                .collect();
            let header = [
                "ID",
                "IDENTITY",
                "WORKLOAD",
                "USES",
                "EXPIRES",
                "EXPIRES AT",
            ];
            let text = if wide {
                crate::table::render(&header, &rows)
            } else {
                let rows: Vec<[String; 5]> = rows
                    .into_iter()
                    .map(|[a, b, c, d, e, _]| [a, b, c, d, e])
                    .collect();
                crate::table::render(&["ID", "IDENTITY", "WORKLOAD", "USES", "EXPIRES"], &rows)
            };
            write!(out, "{text}")?;
        }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tokens() -> Vec<TokenInfo> {
        // Ten days and a bit from now: "in 10d" however long the test takes.
        let expires_unix = crate::unix_now() + 10 * 86_400 + 3_600;
        let token = |id: &str, ns: &str, name: &str| TokenInfo {
            id: id.into(),
            spiffe_id: format!("spiffe://bulkhead.local/ns/{ns}/sa/{name}"),
            namespace: ns.into(),
            workload: name.into(),
            uses_left: 1,
            expires_unix,
        };
        vec![
            token("AbCdEfGhIjKlMnOp", "shop", "orders"),
            token("QrStUvWxYz012345", "billing", "payments-processor"),
        ]
    }

    fn print(namespace: Option<&str>, output: &str) -> String {
        let mut out = Vec::new();
        print_tokens(&tokens(), namespace, output, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn token_list_takes_a_namespace_and_every_output_format() {
        expect_test::expect![[r#"
            ID                IDENTITY                                                  WORKLOAD                    USES  EXPIRES
            AbCdEfGhIjKlMnOp  spiffe://bulkhead.local/ns/shop/sa/orders                 shop/orders                 1     in 10d
            QrStUvWxYz012345  spiffe://bulkhead.local/ns/billing/sa/payments-processor  billing/payments-processor  1     in 10d
        "#]]
        .assert_eq(&print(None, "table"));
        expect_test::expect![[r#"
            ID                IDENTITY                                   WORKLOAD     USES  EXPIRES
            AbCdEfGhIjKlMnOp  spiffe://bulkhead.local/ns/shop/sa/orders  shop/orders  1     in 10d
        "#]]
        .assert_eq(&print(Some("shop"), "table"));
        expect_test::expect![[r#"
            token/QrStUvWxYz012345
        "#]]
        .assert_eq(&print(Some("billing"), "name"));

        let wide = print(Some("shop"), "wide");
        let expires = rfc3339(tokens()[0].expires_unix);
        assert!(
            wide.lines()
                .next()
                .unwrap()
                .ends_with("EXPIRES  EXPIRES AT"),
            "{wide}"
        );
        assert!(
            wide.lines()
                .nth(1)
                .unwrap()
                .ends_with(&format!("in 10d   {expires}")),
            "{wide}"
        );

        let json: serde_json::Value = serde_json::from_str(&print(Some("shop"), "json")).unwrap();
        let yaml: serde_json::Value = serde_saphyr::from_str(&print(Some("shop"), "yaml")).unwrap();
        assert_eq!(json, yaml);
        assert_eq!(json.as_array().unwrap().len(), 1);
        assert_eq!(json[0]["id"], "AbCdEfGhIjKlMnOp");
        assert_eq!(json[0]["expires"], expires.as_str());
        assert!(print(Some("nowhere"), "name").is_empty());
    }
}
