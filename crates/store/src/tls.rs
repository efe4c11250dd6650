//! TLS to PostgreSQL, with libpq's `sslmode` meanings
//! (postgresql.org/docs/current/libpq-ssl.html#LIBPQ-SSL-PROTECTION):
//!
//! | `sslmode` | TLS | server certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (default) | if the server offers it | not verified |
//! | `require` | always | not verified |
//! | `verify-ca` | always | signed by a trusted CA |
//! | `verify-full` | always | signed by a trusted CA and issued for the host |
//!
//! Trusted CAs: the PEM file named by `sslrootcert` in the URL, else the Mozilla
//! roots (webpki-roots). tokio-postgres knows `disable`, `prefer` and `require`
//! only, and no `sslrootcert`: both are read here and taken out of the URL it parses.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::StoreError;

/// How the server's certificate is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verify {
    Nothing,
    Ca,
    Full,
}

/// The URL tokio-postgres may parse, and the TLS connector for it.
pub(crate) fn configure(database_url: &str) -> Result<(String, MakeRustlsConnect), StoreError> {
    let bad = |why: String| StoreError::Config(why);
    // The query is edited as written (form encoding would turn `%20` into `+`,
    // which tokio-postgres does not read as a space).
    let (url, verify, root_cert) = match database_url.split_once('?') {
        Some((base, query)) if database_url.starts_with("postgres") => {
            let mut verify = Verify::Nothing;
            let mut root_cert = None;
            let mut kept = Vec::new();
            for pair in query.split('&') {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                let decoded = || {
                    url::form_urlencoded::parse(format!("v={value}").as_bytes())
                        .next()
                        .map(|(_, v)| v.into_owned())
                        .unwrap_or_default()
                };
                match (key, value) {
                    ("sslmode", "verify-ca") => {
                        verify = Verify::Ca;
                        kept.push("sslmode=require".to_owned());
                    }
                    ("sslmode", "verify-full") => {
                        verify = Verify::Full;
                        kept.push("sslmode=require".to_owned());
                    }
                    ("sslrootcert", _) => root_cert = Some(decoded()),
                    _ => kept.push(pair.to_owned()),
                }
            }
            let url = if kept.is_empty() {
                base.to_owned()
            } else {
                format!("{base}?{}", kept.join("&"))
            };
            (url, verify, root_cert)
        }
        // No query, or the key=value form: passed on as it is (no verify-* there).
        _ => (database_url.to_owned(), Verify::Nothing, None),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("TLS: {e}")))?;
    let config = if verify == Verify::Nothing {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NotVerified(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        match &root_cert {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|e| bad(format!("sslrootcert {path}: {e}")))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad(format!("sslrootcert {path}: {e}")))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(bad(format!("sslrootcert {path}: no certificate")));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let webpki =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| bad(format!("TLS: {e}")))?;
        let verifier: Arc<dyn ServerCertVerifier> = if verify == Verify::Ca {
            Arc::new(AnyName(webpki))
        } else {
            webpki
        };
        builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth()
    };
    Ok((url, MakeRustlsConnect::new(config)))
}

/// `prefer` and `require`: encrypted, the certificate not checked (as libpq).
/// Signatures are still checked, so the session is bound to the key presented.
#[derive(Debug)]
struct NotVerified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NotVerified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted CA; the name is not checked.
#[derive(Debug)]
struct AnyName(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_modes_become_require_and_the_root_certificate_leaves_the_url() {
        let (url, _) =
            configure("postgres://u@db.example:5432/md?sslmode=verify-full&options=-c%20a%3D1")
                .unwrap();
        assert!(url.contains("sslmode=require"), "{url}");
        assert!(url.contains("options="), "other parameters are kept: {url}");
        let snakeoil = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
        if std::path::Path::new(snakeoil).exists() {
            let (url, _) = configure(&format!(
                "postgres://u@db/md?sslmode=verify-ca&sslrootcert={snakeoil}"
            ))
            .unwrap();
            assert!(!url.contains("sslrootcert"), "{url}");
        }
        let (url, _) = configure("postgres://u@db/md").unwrap();
        assert_eq!(url, "postgres://u@db/md");
        assert!(
            configure("postgres://u@db/md?sslmode=verify-ca&sslrootcert=/nonexistent").is_err()
        );
    }
}
