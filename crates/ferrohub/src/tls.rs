//! TLS for both listeners: the development PKI created on first start, and the rustls server
//! configuration (TLS 1.2 and 1.3, optional client certificates for X.509 devices).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName as RustlsDn, ServerConfig, SignatureScheme};
use time::{Duration, OffsetDateTime};

/// Where the server's certificate comes from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Server certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// The CA devices must trust, when known (always, for the development PKI).
    pub ca: Option<PathBuf>,
}

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
const SERVER_CERT: &str = "server.pem";
const SERVER_KEY: &str = "server.key";

/// Creates (or reuses) the development CA and a server certificate for `names` under
/// `dir`. The server certificate is re-issued from the same CA when a name is missing from it
/// or it is about to expire, so devices keep trusting the same CA file.
pub fn ensure_dev_pki(dir: &Path, names: &[String]) -> anyhow::Result<TlsFiles> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (ca_cert_path, ca_key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    let (srv_cert_path, srv_key_path) = (dir.join(SERVER_CERT), dir.join(SERVER_KEY));

    let (ca_params, ca_key) = if ca_cert_path.exists() && ca_key_path.exists() {
        let pem = std::fs::read_to_string(&ca_cert_path)?;
        let key = KeyPair::from_pem(&std::fs::read_to_string(&ca_key_path)?)
            .context("reading the development CA key")?;
        let params = CertificateParams::from_ca_cert_pem(&pem)
            .context("reading the development CA certificate")?;
        (params, key)
    } else {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Ferrohub Development CA");
        dn.push(DnType::OrganizationName, "Ferrohub");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(3650);
        let cert = params.clone().self_signed(&key)?;
        write_private(&ca_key_path, &key.serialize_pem())?;
        std::fs::write(&ca_cert_path, cert.pem())?;
        (params, key)
    };

    if !server_cert_is_current(&srv_cert_path, &srv_key_path, names) {
        let ca_cert = ca_params.clone().self_signed(&ca_key)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_else(|| "localhost".into()),
        );
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        // 825 days: the longest validity every TLS client still accepts for a server leaf.
        params.not_after = now + Duration::days(825);
        let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
        write_private(&srv_key_path, &key.serialize_pem())?;
        std::fs::write(&srv_cert_path, cert.pem())?;
    }
    Ok(TlsFiles {
        cert: srv_cert_path,
        key: srv_key_path,
        ca: Some(ca_cert_path),
    })
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// True when the existing server certificate covers every name and has 30 days left.
fn server_cert_is_current(cert: &Path, key: &Path, names: &[String]) -> bool {
    if !key.exists() {
        return false;
    }
    let Ok(pem) = std::fs::read(cert) else {
        return false;
    };
    let Some(Ok(der)) = rustls_pemfile::certs(&mut pem.as_slice()).next() else {
        return false;
    };
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(&der) else {
        return false;
    };
    let remaining = parsed.validity().time_to_expiration();
    if remaining.is_none_or(|d| d.whole_days() < 30) {
        return false;
    }
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return false;
    };
    let present: Vec<String> = san
        .value
        .general_names
        .iter()
        .filter_map(|g| match g {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
            x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                4 => <[u8; 4]>::try_from(*ip)
                    .ok()
                    .map(|a| std::net::IpAddr::from(a).to_string()),
                16 => <[u8; 16]>::try_from(*ip)
                    .ok()
                    .map(|a| std::net::IpAddr::from(a).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    names
        .iter()
        .all(|n| present.iter().any(|p| p.eq_ignore_ascii_case(n)))
}

/// Loads a PEM certificate chain and key, and builds the server configuration.
pub fn server_config(files: &TlsFiles) -> anyhow::Result<Arc<ServerConfig>> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(&files.cert)
            .with_context(|| format!("opening certificate {}", files.cert.display()))?,
    ))
    .collect::<Result<_, _>>()
    .with_context(|| format!("reading certificate {}", files.cert.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("no certificate in {}", files.cert.display()));
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(&files.key)
            .with_context(|| format!("opening key {}", files.key.display()))?,
    ))
    .with_context(|| format!("reading key {}", files.key.display()))?
    .ok_or_else(|| anyhow!("no private key in {}", files.key.display()))?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(OptionalClientCert {
        algs: provider.signature_verification_algorithms,
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .context("server certificate and key do not match")?;
    // Devices reconnect often (token renewal, flaky links): resumption makes that cheap.
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(16 * 1024);
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(config))
}

/// Asks every client for a certificate but requires none. A certificate that is sent must be
/// backed by its private key (the handshake signature is verified); whether it is trusted is
/// decided at CONNECT against the registry, where the identity is known.
#[derive(Debug)]
struct OptionalClientCert {
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for OptionalClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[RustlsDn] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
