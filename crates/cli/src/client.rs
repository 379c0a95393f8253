//! The admin client: reads the context file the control plane wrote and speaks mTLS with
//! the admin credential.

use anyhow::{Context, Result};
use bulkhead_api::channel::{self, CONTROL_ID_PATH};
use bulkhead_api::v1::admin_client::AdminClient;
use bulkhead_api::v1::credentials_client::CredentialsClient;
use bulkhead_control::AdminContext;
use bulkhead_identity::tls::{ExpectedServer, client_config};
use bulkhead_identity::{SpiffeId, Svid, TrustBundle};
use std::path::Path;
use tonic::transport::Channel;

pub async fn admin(context: &Path) -> Result<AdminClient<Channel>> {
    // `Get` answers with every applied resource, which in a large mesh can pass gRPC's usual
    // 4 MiB. (ListEdges comes in chunks of about 1 MiB, whatever the number of edges.)
    Ok(AdminClient::new(channel(context)?).max_decoding_message_size(MAX_ANSWER_BYTES))
}

/// The Credentials service (join tokens, revocations), with the admin credential.
pub async fn credentials(context: &Path) -> Result<CredentialsClient<Channel>> {
    Ok(CredentialsClient::new(channel(context)?))
}

/// A channel to the control plane the context file names, with the admin credential.
fn channel(context: &Path) -> Result<Channel> {
    let ctx = admin_context(
        context,
        " (start `bulkhead control` first, or pass --context with a context's name (`bulkhead config get-contexts`) or a control plane's DATA_DIR/admin.yaml)",
    )?;
    let read = |p: &Path| {
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
    };
    let svid = Svid::from_pem(&read(&ctx.cert_file)?, &read(&ctx.key_file)?)
        .context("admin credential is unusable")?;
    let bundle = TrustBundle::from_pem_for(&ctx.trust_domain, &read(&ctx.ca_file)?)
        .context("trust bundle")?;
    let control = SpiffeId::parse(&format!("spiffe://{}{CONTROL_ID_PATH}", ctx.trust_domain))?;
    let tls = client_config(
        Some(&svid),
        &bundle,
        ExpectedServer::Exact(control),
        &[b"h2"],
    )?;
    Ok(channel::connect(ctx.server, tls))
}

/// Reads the admin context file at `context`; when it cannot be read, the error names it
/// followed by `help` (what the operator should do).
pub(crate) fn admin_context(context: &Path, help: &str) -> Result<AdminContext> {
    let text = std::fs::read_to_string(context)
        .with_context(|| format!("cannot read admin context {}{help}", context.display()))?;
    serde_saphyr::from_str(&text)
        .with_context(|| format!("admin context {} is not valid", context.display()))
}

/// The largest answer the CLI accepts from the control plane.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// Turns a gRPC status into an error whose text is the server's message.
pub fn status(s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::Unavailable => anyhow::anyhow!(
            "control plane unreachable: {} (is `bulkhead control` running?)",
            s.message()
        ),
        // The transport's own limit, hit before the control plane could answer in its words.
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
            if s.message().contains("message length too large") =>
        {
            anyhow::anyhow!(
                "the message was larger than the control plane or this CLI accepts ({}): split what you send into smaller files",
                s.message()
            )
        }
        _ => anyhow::anyhow!("{}", s.message()),
    }
}
