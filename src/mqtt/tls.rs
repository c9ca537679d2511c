//! The rustls client configuration of an `mqtts://` connection.
//!
//! Built here rather than by rumqttc: its default TLS configuration panics when
//! it cannot load system certificates, and we want each failure (unreadable CA
//! file, bad key) to be a config-time error that names the file.

use std::sync::Arc;

use anyhow::{bail, Context as _};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::config::Tls;

/// Builds the client configuration: the given CA or the system roots, an
/// optional client certificate, ALPN. Hostname verification is always on.
pub(super) fn client_config(tls: &Tls) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    match &tls.ca {
        Some(ca) => {
            for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("cannot read CA file {}", ca.display()))? {
                let cert = cert.with_context(|| format!("bad certificate in {}", ca.display()))?;
                roots.add(cert).with_context(|| format!("unusable CA certificate in {}", ca.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
        }
    }
    if roots.is_empty() {
        bail!("no trusted CA certificates (set `tls.ca` to a PEM file, or install the system CA bundle)");
    }
    let builder = ClientConfig::builder().with_root_certificates(roots);
    let mut config = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("cannot read client certificate {}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("bad certificate in {}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("cannot read private key {}", key.display()))?;
            builder.with_client_auth_cert(chain, key).context("the client certificate and key do not match")?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(config))
}
