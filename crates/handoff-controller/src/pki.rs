//! Each link's own certificate authority. A CA made for one DataLink signs its server's
//! certificate; the jobs trust that CA alone, so a link's clients cannot be pointed at another
//! link's server, or anything else, without a certificate error. The CA's key is dropped once the
//! server certificate is signed: nothing else can ever chain to it.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Keys of the link's Secret that hold them (the names cert-manager uses).
pub const CA_CERT_KEY: &str = "ca.crt";
pub const TLS_CERT_KEY: &str = "tls.crt";
pub const TLS_KEY_KEY: &str = "tls.key";

/// Long enough for any training run the link serves; the certificates go with the DataLink.
const VALIDITY: Duration = Duration::from_secs(397 * 24 * 3600);
/// Nodes' clocks differ a little; a certificate is valid from a little before it was made.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);

/// A link's CA certificate and its server's certificate and key, in PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct LinkCertificates {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for LinkCertificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkCertificates(..)")
    }
}

fn timestamp(at: SystemTime) -> Result<time::OffsetDateTime, rcgen::Error> {
    let seconds = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| rcgen::Error::Time)?
        .as_secs();
    let seconds = i64::try_from(seconds).map_err(|_| rcgen::Error::Time)?;
    time::OffsetDateTime::from_unix_timestamp(seconds).map_err(|_| rcgen::Error::Time)
}

/// A fresh CA named after `link`, and a server certificate for `dns_names` signed by it.
pub fn issue(link: &str, dns_names: Vec<String>) -> Result<LinkCertificates, rcgen::Error> {
    let now = SystemTime::now();
    let not_before = timestamp(now.checked_sub(CLOCK_SKEW).unwrap_or(now))?;
    let not_after = timestamp(now + VALIDITY)?;

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, format!("handoff link CA: {link}"));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(dns_names)?;
    server
        .distinguished_name
        .push(DnType::CommonName, format!("handoff server: {link}"));
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.not_before = not_before;
    server.not_after = not_after;
    let server_cert = server.signed_by(&server_key, &issuer)?;
    Ok(LinkCertificates {
        ca_pem: ca_cert.pem(),
        cert_pem: server_cert.pem(),
        key_pem: server_key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_ca_signs_a_server_certificate_for_its_names() {
        let names = vec!["l-handoff.ns.svc".to_string(), "l-handoff".to_string()];
        let certs = issue("l", names).expect("issue");
        for pem in [&certs.ca_pem, &certs.cert_pem] {
            assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
        }
        assert!(certs.key_pem.contains("PRIVATE KEY"));
        // Two links never share a CA.
        let other = issue("l", vec!["l-handoff".into()]).expect("issue");
        assert_ne!(certs.ca_pem, other.ca_pem);
        assert_eq!(format!("{certs:?}"), "LinkCertificates(..)");
    }
}
