//! Checks of the TLS client certificate and key before connecting: the NATS
//! client only says "could not add certificate or key", naming neither the
//! file nor the cause. The common causes get a sentence each.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// Whether `cert_file` holds a certificate the TLS library accepts and
/// `key_file` its private key; otherwise which file is wrong and why.
pub fn check_client_certificate(cert_file: &str, key_file: &str) -> Result<(), String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| unreadable("nats_tls_cert_file", cert_file, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("wal_listener.nats_tls_cert_file {cert_file:?} is not valid PEM: {e}"))?;
    let Some(cert) = certs.first() else {
        return Err(format!(
            "wal_listener.nats_tls_cert_file {cert_file:?} holds no certificate (no -----BEGIN CERTIFICATE----- block)"
        ));
    };
    match x509_version(cert) {
        Some(1) => {
            return Err(format!(
                "wal_listener.nats_tls_cert_file {cert_file:?} is an X.509 v1 certificate, which the TLS library \
                 refuses; `openssl x509 -req` makes v1 certificates unless given extensions: sign it again with \
                 `-extfile` naming e.g. basicConstraints=CA:FALSE and extendedKeyUsage=clientAuth (a v3 certificate)"
            ))
        }
        None => {
            return Err(format!(
                "wal_listener.nats_tls_cert_file {cert_file:?}: its first PEM block is not an X.509 certificate"
            ))
        }
        Some(_) => {}
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| match e {
        rustls::pki_types::pem::Error::Io(e) => unreadable("nats_tls_key_file", key_file, e),
        rustls::pki_types::pem::Error::NoItemsFound => format!(
            "wal_listener.nats_tls_key_file {key_file:?} holds no private key (no -----BEGIN PRIVATE KEY-----, \
             RSA PRIVATE KEY or EC PRIVATE KEY block)"
        ),
        other => format!("wal_listener.nats_tls_key_file {key_file:?} is not valid PEM: {other}"),
    })?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| {
        format!(
            "wal_listener.nats_tls_key_file {key_file:?} holds a key the TLS library cannot use ({e}): use an RSA \
             (2048 bits or more), ECDSA P-256/P-384 or Ed25519 key"
        )
    })?;
    match CertifiedKey::new(certs, signing_key).keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(()),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => Err(format!(
            "wal_listener.nats_tls_key_file {key_file:?} is not the key of the certificate in \
             wal_listener.nats_tls_cert_file {cert_file:?} (their public keys differ)"
        )),
        Err(e) => Err(format!("wal_listener.nats_tls_cert_file {cert_file:?} is not usable: {e}")),
    }
}

/// Checks that `ca_file` holds at least one PEM certificate.
pub fn check_ca_file(ca_file: &str) -> Result<(), String> {
    let count = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| unreadable("nats_tls_ca_file", ca_file, e))?
        .filter(Result::is_ok)
        .count();
    if count == 0 {
        return Err(format!(
            "wal_listener.nats_tls_ca_file {ca_file:?} holds no certificate (no -----BEGIN CERTIFICATE----- block)"
        ));
    }
    Ok(())
}

fn unreadable(setting: &str, path: &str, e: impl std::fmt::Display) -> String {
    format!("cannot read wal_listener.{setting} {path:?} (as the server's OS user): {e}")
}

/// The X.509 version of a DER certificate (1, 2 or 3); `None` when it is not
/// a certificate. v1 leaves out the optional `[0] EXPLICIT Version` field.
fn x509_version(der: &[u8]) -> Option<u8> {
    let (certificate, _) = der_element(der, 0x30)?;
    let (tbs, _) = der_element(certificate, 0x30)?;
    match tbs.first()? {
        0xA0 => {
            let (explicit, _) = der_element(tbs, 0xA0)?;
            let (version, _) = der_element(explicit, 0x02)?;
            match version {
                [v @ 0..=2] => Some(v + 1),
                _ => None,
            }
        }
        // The serial number comes first: no version field, so v1.
        0x02 => Some(1),
        _ => None,
    }
}

/// Splits off one DER element with tag `tag`: (its contents, the rest).
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (&length_byte, rest) = rest.split_first()?;
    let (length, rest) = if length_byte < 0x80 {
        (usize::from(length_byte), rest)
    } else {
        let octets = usize::from(length_byte & 0x7F);
        if octets == 0 || octets > 4 || rest.len() < octets {
            return None;
        }
        let length = rest[..octets].iter().fold(0usize, |n, &b| (n << 8) | usize::from(b));
        (length, &rest[octets..])
    };
    (rest.len() >= length).then(|| rest.split_at(length))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_version_field() {
        // SEQUENCE { SEQUENCE { [0] { INTEGER 2 }, INTEGER 1 } }: a v3 TBS start.
        let v3 = [0x30, 0x0A, 0x30, 0x08, 0xA0, 0x03, 0x02, 0x01, 0x02, 0x02, 0x01, 0x01];
        assert_eq!(x509_version(&v3), Some(3));
        // No [0] field: the serial number comes first.
        let v1 = [0x30, 0x05, 0x30, 0x03, 0x02, 0x01, 0x01];
        assert_eq!(x509_version(&v1), Some(1));
        // Long-form lengths.
        let long = [0x30, 0x81, 0x05, 0x30, 0x03, 0x02, 0x01, 0x01];
        assert_eq!(x509_version(&long), Some(1));
        for garbage in [&[][..], &[0x30], &[0x30, 0x05, 0x30], &[0x04, 0x00], &[0x30, 0x02, 0x30, 0x00]] {
            assert_eq!(x509_version(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn missing_files_and_empty_files_are_named() {
        let error = check_client_certificate("/nonexistent/cert.pem", "/nonexistent/key.pem").unwrap_err();
        assert!(
            error.contains("cannot read wal_listener.nats_tls_cert_file \"/nonexistent/cert.pem\""),
            "{error}"
        );
        let dir = std::env::temp_dir().join(format!("wl-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not pem\n").unwrap();
        let empty = empty.to_str().unwrap();
        assert!(check_client_certificate(empty, empty).unwrap_err().contains("holds no certificate"));
        assert!(check_ca_file(empty).unwrap_err().contains("holds no certificate"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
