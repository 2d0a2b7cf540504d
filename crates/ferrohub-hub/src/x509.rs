//! X.509 checks for device and module certificates: thumbprints, chains to registered CAs,
//! subject CN, validity end.

use ferrohub_store::CaCertificate;
use rustls::pki_types::{CertificateDer, UnixTime};
use sha1::Digest as _;

/// SHA-1 and SHA-256 thumbprints of a DER certificate, upper-case hex, as IoT Hub shows them.
pub fn thumbprints(der: &[u8]) -> (String, String) {
    (
        hex::encode_upper(sha1::Sha1::digest(der)),
        hex::encode_upper(sha2::Sha256::digest(der)),
    )
}

/// Whether `expected` (SHA-1 or SHA-256 hex, any case, colons allowed) is `der`'s thumbprint.
pub fn thumbprint_matches(der: &[u8], expected: &str) -> bool {
    let want: String = expected
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect::<String>()
        .to_ascii_uppercase();
    if want.is_empty() {
        return false;
    }
    let (s1, s256) = thumbprints(der);
    want == s1 || want == s256
}

/// The subject common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// When a DER certificate stops being valid (its notAfter, Unix seconds).
pub fn not_after(der: &[u8]) -> Option<u64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    u64::try_from(cert.validity().not_after.timestamp()).ok()
}

/// Parses the first certificate of a PEM text.
pub fn pem_to_der(pem: &str) -> Result<CertificateDer<'static>, String> {
    let mut reader = std::io::BufReader::new(pem.as_bytes());
    let first = rustls_pemfile::certs(&mut reader).next();
    match first {
        Some(Ok(der)) => Ok(der),
        Some(Err(e)) => Err(format!("invalid PEM: {e}")),
        None => Err("no certificate in PEM".into()),
    }
}

/// Checks that `chain` (leaf first) chains to one of `cas` for client auth, and that the leaf's
/// CN is `expected_cn`.
pub fn verify_ca_signed(
    chain: &[CertificateDer<'static>],
    cas: &[CaCertificate],
    expected_cn: &str,
) -> Result<(), String> {
    let leaf = chain.first().ok_or("no client certificate")?;
    let cn = common_name(leaf).ok_or("client certificate has no subject CN")?;
    if cn != expected_cn {
        return Err(format!(
            "certificate CN {cn:?} is not the identity {expected_cn:?}"
        ));
    }
    let ca_ders: Vec<CertificateDer<'static>> = cas
        .iter()
        .filter_map(|c| pem_to_der(&c.certificate).ok())
        .collect();
    let anchors: Vec<_> = ca_ders
        .iter()
        .filter_map(|d| webpki::anchor_from_trusted_cert(d).ok())
        .collect();
    if anchors.is_empty() {
        return Err("no CA certificate is registered".into());
    }
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("bad certificate: {e}"))?;
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &chain[1..],
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| format!("certificate does not chain to a registered CA: {e}"))
}
