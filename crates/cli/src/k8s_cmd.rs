//! `bulkhead k8s …` and the Kubernetes flags of `bulkhead control` (docs/kubernetes.md).

use anyhow::{Context, Result, bail};
use bulkhead_kubernetes::inject::InjectConfig;
use bulkhead_kubernetes::webhook::{self, WebhookConfig, WebhookOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(clap::Subcommand, Debug)]
pub enum K8sCommand {
    /// Print the bulkhead.dev/v1alpha1 CustomResourceDefinitions (generated from the policy
    /// types; the same as deploy/kubernetes/base/crds.yaml): `bulkhead k8s crds | kubectl
    /// apply -f -`.
    Crds,
    /// Print the MutatingWebhookConfiguration of the injection webhook, its caBundle the
    /// mesh's current trust bundle (the admin context's CA file, or --ca-bundle):
    /// `bulkhead k8s webhook-config | kubectl apply -f -`. Print it again after a CA change.
    WebhookConfig {
        /// The trust bundle (PEM) to put in caBundle; default: the CA file the admin context
        /// (--context) names, which the control plane keeps current.
        #[arg(long, value_name = "FILE", conflicts_with = "no_ca_bundle")]
        ca_bundle: Option<PathBuf>,
        /// Leave caBundle out (the install manifest's form, completed at install).
        #[arg(long)]
        no_ca_bundle: bool,
        /// The webhook Service's namespace.
        #[arg(long, default_value = webhook::DEFAULT_NAMESPACE)]
        namespace: String,
        /// The webhook Service's name.
        #[arg(long, default_value = webhook::DEFAULT_SERVICE)]
        service: String,
        /// The webhook Service's port.
        #[arg(long, default_value_t = 443)]
        port: u16,
        /// Fail (a pod that asked to be meshed is not created while the webhook is away) or
        /// Ignore (it is created without its sidecar).
        #[arg(long, default_value = "Fail", value_parser = ["Fail", "Ignore"])]
        failure_policy: String,
        /// How long the API server waits for the webhook (1 to 30 seconds).
        #[arg(long, default_value_t = 10)]
        timeout_seconds: u32,
    },
}

/// `bulkhead control`'s sidecar-injection webhook.
#[derive(clap::Args, Debug)]
pub struct ControlWebhook {
    /// Serve the sidecar-injection webhook (HTTPS, POST /inject, AdmissionReview v1) on this
    /// address, e.g. 0.0.0.0:8443; off when not given. Its certificate comes from the mesh's
    /// CA and is re-issued at half-life and at every CA change.
    #[arg(long, value_name = "ADDR")]
    webhook_listen: Option<SocketAddr>,
    /// A DNS name the API server reaches the webhook by (its Service's), put in the
    /// webhook's certificate. Repeatable.
    #[arg(
        long = "webhook-host",
        value_name = "NAME",
        default_value = webhook::DEFAULT_HOST,
        requires = "webhook_listen"
    )]
    webhook_hosts: Vec<String>,
    /// The image injected pods run the sidecar from (both binaries).
    #[arg(long, value_name = "IMAGE", requires = "webhook_listen",
        default_value = concat!("ghcr.io/bulkhead/bulkhead:", env!("CARGO_PKG_VERSION")))]
    inject_image: String,
    /// The control plane's address as injected sidecars dial it (its Service's cluster IP
    /// and gRPC port). Required with --webhook-listen.
    #[arg(long, value_name = "IP:PORT", requires = "webhook_listen")]
    inject_control: Option<SocketAddr>,
}

impl ControlWebhook {
    /// Starts the webhook if asked; returns its address.
    pub async fn start(self, issuer: bulkhead_control::Issuer) -> Result<Option<SocketAddr>> {
        let Some(listen) = self.webhook_listen else {
            return Ok(None);
        };
        let Some(control) = self.inject_control else {
            bail!(
                "--webhook-listen needs --inject-control IP:PORT: the control plane's address as injected sidecars dial it (its Service's cluster IP and gRPC port)"
            );
        };
        let inject = InjectConfig::new(&self.inject_image, control, &issuer.bundle_pem());
        let hook = webhook::spawn(
            issuer,
            WebhookOptions {
                listen,
                hosts: self.webhook_hosts,
                inject,
            },
        )
        .await?;
        Ok(Some(hook.addr))
    }
}

/// `bulkhead control`'s Kubernetes controller.
#[derive(clap::Args, Debug)]
pub struct ControlController {
    /// Run as a Kubernetes controller: watch Namespaces, Pods, Services, ServiceAccounts and
    /// the bulkhead.dev CRs, and commit the Workloads and Services derived from them and the
    /// CRs that compile as revisions by author `kubernetes`; each CR gets an Accepted status
    /// condition; the injection webhook's caBundle is kept the mesh's bundle. The API server
    /// is found in-cluster unless --kubeconfig is given.
    #[arg(long)]
    kubernetes: bool,
    /// A kubeconfig file (its current context) to reach the API server by, instead of the
    /// in-cluster service account.
    #[arg(long, value_name = "PATH", requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// How long the cluster must be quiet after a change before a revision is committed, so
    /// that a rollout makes one revision, not one per pod event (milliseconds).
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 500,
        requires = "kubernetes"
    )]
    kubernetes_debounce_ms: u64,
    /// The MutatingWebhookConfiguration whose caBundle is kept current.
    #[arg(long, value_name = "NAME", default_value = bulkhead_kubernetes::access::WEBHOOK_CONFIGURATION_NAME, requires = "kubernetes")]
    webhook_configuration: String,
}

impl ControlController {
    /// The controller, if asked for, with its client built: a kubeconfig or in-cluster
    /// configuration that cannot be loaded stops `bulkhead control` before it listens.
    pub async fn prepare(self) -> Result<Option<PreparedController>> {
        use bulkhead_kubernetes::controller::{self, ControllerOptions};
        if !self.kubernetes {
            return Ok(None);
        }
        let client = controller::client(self.kubeconfig.as_deref())
            .await
            .context("--kubernetes")?;
        Ok(Some(PreparedController {
            client,
            options: ControllerOptions {
                debounce: std::time::Duration::from_millis(self.kubernetes_debounce_ms),
                webhook_configuration: self.webhook_configuration,
                ..ControllerOptions::default()
            },
        }))
    }
}

/// A controller ready to start on a running control plane.
pub struct PreparedController {
    client: bulkhead_kubernetes::controller::Client,
    options: bulkhead_kubernetes::controller::ControllerOptions,
}

impl PreparedController {
    pub fn start(self, running: &bulkhead_control::RunningControl) {
        bulkhead_kubernetes::controller::spawn(
            self.client,
            running.resources.clone(),
            running.issuer.clone(),
            self.options,
        );
    }
}

/// `bulkhead control`'s joins by Kubernetes service-account token.
#[derive(clap::Args, Debug)]
pub struct ControlAttest {
    /// Accept joins by a pod's projected service-account token (audience `bulkhead`, what
    /// injected sidecars present with --service-account-token-file), checked with a
    /// TokenReview: the SVID is for exactly spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/ACCOUNT,
    /// bound to the Workload that declares it. The API server is found in-cluster
    /// (KUBERNETES_SERVICE_HOST/PORT and the pod's service-account ca.crt and token) unless
    /// --kubernetes-api is given.
    #[arg(long)]
    kubernetes_attest: bool,
    /// The API server to send TokenReviews to, `https://HOST[:PORT]`, instead of the in-cluster
    /// one.
    #[arg(long, value_name = "URL", requires = "kubernetes_attest")]
    kubernetes_api: Option<String>,
    /// The CA certificate(s) (PEM) the API server's certificate must chain to; default: the
    /// pod's service-account ca.crt.
    #[arg(long, value_name = "FILE", requires = "kubernetes_attest")]
    kubernetes_ca: Option<PathBuf>,
    /// The control plane's own bearer token for the API server, re-read at every
    /// TokenReview (the kubelet rotates it); default: the pod's service-account token.
    #[arg(long, value_name = "FILE", requires = "kubernetes_attest")]
    kubernetes_token_file: Option<PathBuf>,
}

impl ControlAttest {
    /// The attestor `bulkhead control` hands the control plane, if asked for one.
    pub fn attestor(self) -> Result<Option<Arc<dyn bulkhead_control::Attestor>>> {
        use bulkhead_kubernetes::attest::{InCluster, SERVICE_ACCOUNT_DIR, TokenReviewer};
        use bulkhead_kubernetes::inject::TOKEN_AUDIENCE;
        if !self.kubernetes_attest {
            return Ok(None);
        }
        let dir = Path::new(SERVICE_ACCOUNT_DIR);
        let cluster = match &self.kubernetes_api {
            Some(url) => InCluster::explicit(
                url,
                &self.kubernetes_ca.unwrap_or_else(|| dir.join("ca.crt")),
                &self
                    .kubernetes_token_file
                    .unwrap_or_else(|| dir.join("token")),
            ),
            None => InCluster::load(|k| std::env::var(k).ok(), dir).and_then(|mut c| {
                if let Some(ca) = &self.kubernetes_ca {
                    c.ca_pem = std::fs::read_to_string(ca).map_err(|source| {
                        bulkhead_kubernetes::attest::ReviewError::File {
                            path: ca.clone(),
                            source,
                        }
                    })?;
                }
                if let Some(token) = self.kubernetes_token_file {
                    c.token_file = token;
                }
                Ok(c)
            }),
        }
        .context("--kubernetes-attest")?;
        let reviewer =
            TokenReviewer::new(cluster, TOKEN_AUDIENCE).context("--kubernetes-attest")?;
        Ok(Some(Arc::new(reviewer)))
    }
}

/// `bulkhead k8s crds`: the CRDs, exactly as `deploy/kubernetes/base/crds.yaml` holds them.
pub fn crds(out: &mut dyn Write) -> Result<()> {
    let yaml = bulkhead_kubernetes::crd::crds_yaml()
        .map_err(|e| anyhow::anyhow!("could not print the CRDs as YAML: {e}"))?;
    out.write_all(yaml.as_bytes())?;
    Ok(())
}

pub fn run(context: &Path, command: K8sCommand, out: &mut dyn Write) -> Result<()> {
    match command {
        K8sCommand::Crds => crds(out)?,
        K8sCommand::WebhookConfig {
            ca_bundle,
            no_ca_bundle,
            namespace,
            service,
            port,
            failure_policy,
            timeout_seconds,
        } => {
            let ca_bundle_pem = match (no_ca_bundle, ca_bundle) {
                (true, _) => None,
                (false, Some(file)) => Some(read(&file)?),
                (false, None) => Some(read(&context_ca_file(context)?)?),
            };
            let config = WebhookConfig {
                service_namespace: namespace,
                service_name: service,
                service_port: port,
                failure_policy,
                timeout_seconds,
                ca_bundle_pem,
                ..WebhookConfig::default()
            };
            let yaml = webhook::configuration_yaml(&config).map_err(|e| anyhow::anyhow!(e))?;
            out.write_all(yaml.as_bytes())?;
        }
    }
    Ok(())
}

fn read(file: &Path) -> Result<String> {
    std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))
}

/// The trust bundle file the admin context names.
fn context_ca_file(context: &Path) -> Result<PathBuf> {
    let ctx = crate::client::admin_context(
        context,
        " to find the trust bundle (pass --context DATA_DIR/admin.yaml or --ca-bundle FILE)",
    )?;
    Ok(ctx.ca_file)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `bulkhead k8s crds` prints is the committed install manifest, with every kind.
    #[test]
    fn k8s_crds_prints_the_committed_manifests() {
        let mut out = Vec::new();
        crds(&mut out).unwrap();
        let out = String::from_utf8(out).unwrap();
        let committed = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/kubernetes/base/crds.yaml"
        ))
        .unwrap();
        assert_eq!(out, committed);
        for name in [
            "authorizationpolicies.bulkhead.dev",
            "workloads.bulkhead.dev",
            "services.bulkhead.dev",
            "defaultpostures.bulkhead.dev",
        ] {
            assert!(out.contains(&format!("name: {name}")), "{name} missing");
        }
        assert!(out.contains("openAPIV3Schema"));
        assert!(out.contains("additionalPrinterColumns"));
        assert!(out.contains("status: {}"));
    }
}
