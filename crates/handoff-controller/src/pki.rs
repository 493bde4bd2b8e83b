//! Each link's own certificate authority. A CA made for one DataLink signs its server's
//! certificate; the jobs trust that CA alone, so a link's clients cannot be pointed at another
//! link's server, or anything else, without a certificate error. The CA's key is dropped once the
//! server certificate is signed: nothing else can ever chain to it.

use std::time::{Duration, SystemTime};

pub use rcgen::Error;
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

/// A fresh CA, which signs server and client certificates while it lives; its key goes with it.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
}

impl Authority {
    /// A CA named after `label` (the link).
    pub fn new(label: &str) -> Result<Self, rcgen::Error> {
        let now = SystemTime::now();
        let not_before = timestamp(now.checked_sub(CLOCK_SKEW).unwrap_or(now))?;
        let not_after = timestamp(now + VALIDITY)?;
        let key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        // It signs end certificates only, never another CA.
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.distinguished_name
            .push(DnType::CommonName, format!("handoff CA: {label}"));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.not_before = not_before;
        ca.not_after = not_after;
        let ca_pem = ca.self_signed(&key)?.pem();
        Ok(Self {
            issuer: Issuer::new(ca, key),
            ca_pem,
            not_before,
            not_after,
        })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    fn sign(
        &self,
        common_name: String,
        names: Vec<String>,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<(String, String), rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = self.not_before;
        params.not_after = self.not_after;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A server certificate and key (PEM) for `names`: host names or IP addresses.
    pub fn server(&self, names: Vec<String>) -> Result<(String, String), rcgen::Error> {
        let first = names.first().cloned().unwrap_or_default();
        self.sign(first, names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate and key (PEM) for mutual TLS (`serve --tls-client-ca`).
    pub fn client(&self, name: &str) -> Result<(String, String), rcgen::Error> {
        self.sign(
            name.to_string(),
            vec![name.to_string()],
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }
}

/// A fresh CA named after `link`, and a server certificate for `dns_names` (host names or IP
/// addresses) signed by it; the CA's key is dropped here.
pub fn issue(link: &str, dns_names: Vec<String>) -> Result<LinkCertificates, rcgen::Error> {
    let authority = Authority::new(link)?;
    let (cert_pem, key_pem) = authority.server(dns_names)?;
    Ok(LinkCertificates {
        ca_pem: authority.ca_pem,
        cert_pem,
        key_pem,
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
