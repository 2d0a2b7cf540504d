//! X.509 device authentication over real TLS: self-signed thumbprints (SHA-1 and SHA-256) and
//! certificates chaining to a registered CA with CN = device id (`{deviceId}/{moduleId}` for a
//! module).

mod common;

use common::*;
use ferrohub_mqtt::ConnectReturnCode;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;

type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn self_signed(cn: &str) -> R<(Identity, Vec<u8>)> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, cn);
    let cert = p.self_signed(&key)?;
    let der = cert.der().to_vec();
    Ok((
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ),
        der,
    ))
}

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> R<Ca> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = p.self_signed(&key)?;
    Ok(Ca { cert, key })
}

fn leaf(ca: &Ca, cn: &str) -> R<Identity> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.signed_by(&key, &ca.cert, &ca.key)?;
    Ok((
        vec![cert.der().clone(), ca.cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    ))
}

fn sha1_hex(der: &[u8]) -> String {
    use sha1::Digest;
    hex::encode_upper(sha1::Sha1::digest(der))
}

fn sha256_hex(der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der))
}

async fn x509_connack(hub: &TestHub, client_id: &str, id: Identity) -> R<ConnectReturnCode> {
    let mut c = MqttClient::open(hub.mqtt_addr(), &hub.ca, Some(id)).await?;
    Ok(c.connect(connect_packet(client_id, None, true, 60))
        .await?
        .1)
}

#[tokio::test]
async fn self_signed_certificates_authenticate_by_thumbprint() -> TestResult {
    let hub = TestHub::start().await?;
    let (id_a, der_a) = self_signed("dev-x")?;
    let (id_b, der_b) = self_signed("dev-x")?;
    let (id_c, _) = self_signed("dev-x")?;
    // Primary by SHA-1, secondary by SHA-256 (lower case: compared case-insensitively).
    hub.api
        .put(
            "/devices/dev-x",
            &json!({"deviceId": "dev-x", "authentication": {"type": "selfSigned",
                "x509Thumbprint": {"primaryThumbprint": sha1_hex(&der_a), "secondaryThumbprint": sha256_hex(&der_b)}}}),
            None,
        )
        .await?;
    assert_eq!(
        x509_connack(&hub, "dev-x", id_a).await?,
        ConnectReturnCode::Accepted
    );
    assert_eq!(
        x509_connack(&hub, "dev-x", id_b).await?,
        ConnectReturnCode::Accepted
    );
    assert_eq!(
        x509_connack(&hub, "dev-x", id_c).await?,
        ConnectReturnCode::NotAuthorized,
        "unregistered certificate"
    );
    // No certificate and no password.
    let mut c = hub.tls().await?;
    assert_eq!(
        c.connect(connect_packet("dev-x", None, true, 60)).await?.1,
        ConnectReturnCode::NotAuthorized
    );
    // A SAS device cannot use a certificate instead of its keys.
    hub.create_device("dev-sas").await?;
    let (id_d, _) = self_signed("dev-sas")?;
    assert_eq!(
        x509_connack(&hub, "dev-sas", id_d).await?,
        ConnectReturnCode::NotAuthorized
    );
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn ca_signed_certificates_need_a_registered_ca_and_matching_cn() -> TestResult {
    let hub = TestHub::start().await?;
    let trusted = ca("Trusted Test CA")?;
    let rogue = ca("Rogue CA")?;
    for id in ["dev-ca", "dev-other"] {
        hub.api
            .put(
                &format!("/devices/{id}"),
                &json!({"deviceId": id, "authentication": {"type": "certificateAuthority"}}),
                None,
            )
            .await?;
    }
    // Before the CA is registered, nothing chains.
    assert_eq!(
        x509_connack(&hub, "dev-ca", leaf(&trusted, "dev-ca")?).await?,
        ConnectReturnCode::NotAuthorized
    );
    let c = hub
        .api
        .put(
            "/certificates/trusted",
            &json!({"properties": {"certificate": trusted.cert.pem()}}),
            None,
        )
        .await?;
    assert_eq!(c["name"], "trusted");
    assert_eq!(
        x509_connack(&hub, "dev-ca", leaf(&trusted, "dev-ca")?).await?,
        ConnectReturnCode::Accepted
    );
    assert_eq!(
        x509_connack(&hub, "dev-ca", leaf(&trusted, "dev-other")?).await?,
        ConnectReturnCode::NotAuthorized,
        "CN must be the device id"
    );
    assert_eq!(
        x509_connack(&hub, "dev-ca", leaf(&rogue, "dev-ca")?).await?,
        ConnectReturnCode::NotAuthorized,
        "unregistered CA"
    );
    // Removing the CA stops it again.
    hub.api.delete("/certificates/trusted", None).await?;
    assert_eq!(
        x509_connack(&hub, "dev-ca", leaf(&trusted, "dev-ca")?).await?,
        ConnectReturnCode::NotAuthorized
    );
    // A leaf is not accepted as a CA.
    let (id, _) = self_signed("x")?;
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        base64_lines(&id.0[0])
    );
    let err = hub
        .api
        .put(
            "/certificates/leaf",
            &json!({"properties": {"certificate": pem}}),
            None,
        )
        .await;
    assert!(err.is_err_and(|e| e.to_string().contains("400")));
    hub.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_ca_signed_module_certificate_names_device_and_module() -> TestResult {
    let hub = TestHub::start().await?;
    let trusted = ca("Trusted Test CA")?;
    hub.api
        .put(
            "/certificates/trusted",
            &json!({"properties": {"certificate": trusted.cert.pem()}}),
            None,
        )
        .await?;
    let ca_auth = json!({"type": "certificateAuthority"});
    hub.api
        .put(
            "/devices/cadev",
            &json!({"deviceId": "cadev", "authentication": ca_auth}),
            None,
        )
        .await?;
    hub.api
        .put(
            "/devices/cadev/modules/m1",
            &json!({"deviceId": "cadev", "moduleId": "m1", "authentication": ca_auth}),
            None,
        )
        .await?;
    // A bare module id would open `m1` of every device whose certificates the CA signs.
    assert_eq!(
        x509_connack(&hub, "cadev/m1", leaf(&trusted, "m1")?).await?,
        ConnectReturnCode::NotAuthorized,
        "CN must be deviceId/moduleId"
    );
    assert_eq!(
        x509_connack(&hub, "cadev/m1", leaf(&trusted, "cadev")?).await?,
        ConnectReturnCode::NotAuthorized,
        "the device's certificate does not open its module"
    );
    assert_eq!(
        x509_connack(&hub, "cadev/m1", leaf(&trusted, "cadev/m1")?).await?,
        ConnectReturnCode::Accepted
    );
    // The device rule is unchanged.
    assert_eq!(
        x509_connack(&hub, "cadev", leaf(&trusted, "cadev")?).await?,
        ConnectReturnCode::Accepted
    );
    assert_eq!(
        x509_connack(&hub, "cadev", leaf(&trusted, "cadev/m1")?).await?,
        ConnectReturnCode::NotAuthorized
    );
    hub.stop().await;
    Ok(())
}

fn base64_lines(der: &[u8]) -> String {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode(der);
    b.as_bytes()
        .chunks(64)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}
