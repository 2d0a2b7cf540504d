//! CA certificates that CA-signed X.509 devices chain to: registering (checked to be a CA
//! certificate), reading, listing and deleting them.

use ferrohub_iothub::ErrorCode;
use ferrohub_store::{CaCertificate, IfMatch};

use crate::error::HubError;
use crate::{timefmt, x509, Hub};

fn not_found(name: &str) -> HubError {
    // IoT Hub has no code of its own for a missing certificate.
    HubError::new(
        ErrorCode::InvalidOperation,
        format!("Certificate {name} cannot be found."),
    )
    .with_status(404)
}

fn store_err(name: &str) -> impl Fn(ferrohub_store::StoreError) -> HubError + '_ {
    move |e| HubError::from_store(e, not_found(name), not_found(name))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl Hub {
    /// Registers (or, under `If-Match`, replaces) a CA certificate given as PEM text.
    pub async fn put_certificate(
        &self,
        name: &str,
        pem: &str,
        if_match: IfMatch,
    ) -> Result<CaCertificate, HubError> {
        if !valid_name(name) {
            return Err(HubError::argument(
                "certificate names are 1-64 of A-Z a-z 0-9 - _ .",
            ));
        }
        let der = x509::pem_to_der(pem).map_err(HubError::argument)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| HubError::argument(format!("not an X.509 certificate: {e}")))?;
        if !parsed.is_ca() {
            return Err(HubError::argument(
                "the certificate is not a CA certificate",
            ));
        }
        let (_, sha256) = x509::thumbprints(&der);
        let cert = CaCertificate {
            name: name.to_string(),
            etag: String::new(),
            certificate: pem.to_string(),
            subject: parsed.subject().to_string(),
            thumbprint: sha256,
            created: timefmt::now_iso(),
        };
        let name = name.to_string();
        self.to_the_end(move |hub| async move {
            hub.store
                .put_certificate(cert, if_match)
                .await
                .map_err(store_err(&name))
        })
        .await
    }

    pub async fn certificate(&self, name: &str) -> Result<CaCertificate, HubError> {
        self.store
            .get_certificate(name)
            .await
            .map_err(store_err(name))?
            .ok_or_else(|| not_found(name))
    }

    pub async fn certificates(&self) -> Result<Vec<CaCertificate>, HubError> {
        self.store.list_certificates().await.map_err(store_err(""))
    }

    pub async fn delete_certificate(&self, name: &str, if_match: IfMatch) -> Result<(), HubError> {
        let name = name.to_string();
        self.to_the_end(move |hub| async move {
            hub.store
                .delete_certificate(&name, if_match)
                .await
                .map_err(store_err(&name))
        })
        .await
    }
}
