use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::error::{PkiError, Result};
use crate::fsutil::write_file_durable;
use crate::tls::parse_single_cert;

/// File name of the CA certificate inside the directory given to [`Ca::save`] / [`Ca::load`].
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// Validity of a freshly generated CA certificate (10 years).
pub const CA_VALIDITY_DAYS: u32 = 3650;
/// Validity of certificates issued by [`Ca::issue_server_cert`] (5 years).
pub const SERVER_CERT_VALIDITY_DAYS: u32 = 1825;

/// Tolerated clock skew: certificates become valid this long before "now".
const BACKDATE: Duration = Duration::hours(1);
/// Upper bound for `validity_days` in [`Ca::sign_csr`] (10 years).
const MAX_VALIDITY_DAYS: u32 = 3650;
/// RFC 5280 upper bound for a common name.
const MAX_CN_LEN: usize = 64;

/// The vault's certificate authority: a self-signed CA certificate and its key.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    key: KeyPair,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive, and never a leading zero byte (keeps the DER encoding canonical length).
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::days(i64::from(days));
}

fn names_to_sans(names: &[String]) -> Result<Vec<SanType>> {
    names
        .iter()
        .map(|n| {
            let n = n.trim();
            if n.is_empty() {
                return Err(PkiError::InvalidArgument(
                    "empty subject alternative name".into(),
                ));
            }
            // Accept "[::1]" as well as "::1".
            let bare = n
                .strip_prefix('[')
                .and_then(|s| s.strip_suffix(']'))
                .unwrap_or(n);
            match bare.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => {
                    let dns = n.to_string().try_into().map_err(|e| {
                        PkiError::InvalidArgument(format!("invalid DNS name {n:?}: {e}"))
                    })?;
                    Ok(SanType::DnsName(dns))
                }
            }
        })
        .collect()
}

fn san_to_string(san: &SanType) -> Option<String> {
    match san {
        SanType::DnsName(d) => Some(d.as_str().to_string()),
        SanType::IpAddress(ip) => Some(ip.to_string()),
        _ => None,
    }
}

fn validate_identity(identity: &str) -> Result<()> {
    if identity.is_empty() || identity.len() > MAX_CN_LEN {
        return Err(PkiError::InvalidArgument(format!(
            "identity must be 1..={MAX_CN_LEN} bytes, got {}",
            identity.len()
        )));
    }
    if identity.chars().any(|c| c.is_control()) {
        return Err(PkiError::InvalidArgument(
            "identity contains control characters".into(),
        ));
    }
    Ok(())
}

fn parse_csr(csr_pem: &str) -> Result<CertificateSigningRequestParams> {
    if !csr_pem.contains("-----BEGIN CERTIFICATE REQUEST-----") {
        return Err(PkiError::InvalidCsr(
            "no PEM block \"CERTIFICATE REQUEST\" found".into(),
        ));
    }
    CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| PkiError::InvalidCsr(e.to_string()))
}

/// The subject alternative names (DNS names and IP addresses, as strings) a
/// CSR asks for. Lets the vault vet them before calling [`Ca::sign_csr`]
/// (e.g. refuse an agent asking for the vault's own host name).
pub fn csr_subject_alt_names(csr_pem: &str) -> Result<Vec<String>> {
    let csr = parse_csr(csr_pem)?;
    csr.params
        .subject_alt_names
        .iter()
        .map(|s| {
            san_to_string(s).ok_or_else(|| {
                PkiError::InvalidCsr(format!("unsupported subject alternative name {s:?}"))
            })
        })
        .collect()
}

/// Agent side of enrolment: generate a fresh ECDSA P-256 key pair locally and a
/// CSR for it carrying `subject_alt_names` (DNS names or IP literals).
///
/// Returns `(csr_pem, key_pem)`; the key never leaves the agent. The CSR's
/// subject CN is a placeholder: the vault chooses the identity when signing.
pub fn generate_csr(subject_alt_names: &[String]) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = names_to_sans(subject_alt_names)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "siterec-agent-enrolment");
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

impl Ca {
    /// Generate a new CA (ECDSA P-256, 10 years validity, path length 0).
    pub fn generate(common_name: &str) -> Result<Ca> {
        validate_identity(common_name)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "siterec");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        validity(&mut params, CA_VALIDITY_DAYS);
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            key,
        })
    }

    /// Load a CA from PEM text. Checks that the certificate is a CA
    /// certificate and that the key matches it.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| PkiError::InvalidPem(format!("CA private key: {e}")))?;
        let der = parse_single_cert(cert_pem)?;
        let (_, x509) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| PkiError::InvalidPem(format!("CA certificate: {e}")))?;
        if !x509.is_ca() {
            return Err(PkiError::InvalidPem(
                "certificate is not a CA certificate (basicConstraints CA=false)".into(),
            ));
        }
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(PkiError::InvalidPem(
                "CA private key does not match the CA certificate".into(),
            ));
        }
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            key,
        })
    }

    /// The CA certificate (PEM). This is what agents and clients trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key (PEM, PKCS#8). Keep secret.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Write `dir/ca.crt` (0644) and `dir/ca.key` (0600) durably
    /// (temp file + fsync + rename + directory fsync). Creates `dir` if needed.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| PkiError::io("creating directory", dir, e))?;
        // Key first: a crash in between leaves a key without certificate,
        // which `load` reports, rather than a certificate whose key is lost.
        write_file_durable(&dir.join(CA_KEY_FILE), self.key_pem.as_bytes(), 0o600)?;
        write_file_durable(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes(), 0o644)?;
        Ok(())
    }

    /// Load `dir/ca.crt` and `dir/ca.key` (see [`Ca::from_pem`]).
    pub fn load(dir: &Path) -> Result<Ca> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert = std::fs::read_to_string(&cert_path)
            .map_err(|e| PkiError::io("reading", &cert_path, e))?;
        let key = std::fs::read_to_string(&key_path)
            .map_err(|e| PkiError::io("reading", &key_path, e))?;
        Ca::from_pem(&cert, &key)
    }

    /// Whether `dir` already holds a CA certificate (used to decide between
    /// [`Ca::load`] and [`Ca::generate`] + [`Ca::save`]).
    pub fn exists(dir: &Path) -> bool {
        dir.join(CA_CERT_FILE).exists()
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>> {
        Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)
            .map_err(|e| PkiError::InvalidPem(format!("CA certificate: {e}")))
    }

    /// Issue a certificate + fresh key for the vault's own TLS listener.
    /// `names` are DNS names or IP literals (IPs become IP SANs); the first
    /// name is also the subject CN. EKU serverAuth + clientAuth.
    /// Returns `(cert_pem, key_pem)`. Valid [`SERVER_CERT_VALIDITY_DAYS`].
    pub fn issue_server_cert(&self, names: &[String]) -> Result<(String, String)> {
        self.issue_server_cert_with_validity(names, SERVER_CERT_VALIDITY_DAYS)
    }

    /// [`Ca::issue_server_cert`] with an explicit validity.
    pub fn issue_server_cert_with_validity(
        &self,
        names: &[String],
        validity_days: u32,
    ) -> Result<(String, String)> {
        let first = names.first().ok_or_else(|| {
            PkiError::InvalidArgument("a server certificate needs at least one name".into())
        })?;
        check_validity_days(validity_days)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = names_to_sans(names)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, first.trim());
        params.distinguished_name = dn;
        leaf_params(&mut params, validity_days);
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Vault side of enrolment: sign an agent's CSR.
    ///
    /// The subject is replaced by `CN = identity` (whatever the CSR asked for
    /// is ignored), the CSR's DNS/IP subject alternative names are kept, EKU is
    /// serverAuth + clientAuth, not a CA. Malformed CSRs, CSRs with a bad
    /// signature, and SAN types other than DNS/IP give [`PkiError::InvalidCsr`].
    pub fn sign_csr(&self, csr_pem: &str, identity: &str, validity_days: u32) -> Result<String> {
        validate_identity(identity)?;
        check_validity_days(validity_days)?;
        let csr = parse_csr(csr_pem)?;
        for san in &csr.params.subject_alt_names {
            if san_to_string(san).is_none() {
                return Err(PkiError::InvalidCsr(format!(
                    "unsupported subject alternative name {san:?} (only DNS names and IP addresses)"
                )));
            }
        }
        let mut params = CertificateParams::default();
        params.subject_alt_names = csr.params.subject_alt_names.clone();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity);
        params.distinguished_name = dn;
        leaf_params(&mut params, validity_days);
        let cert = params.signed_by(&csr.public_key, &self.issuer()?)?;
        Ok(cert.pem())
    }
}

fn check_validity_days(days: u32) -> Result<()> {
    if days == 0 || days > MAX_VALIDITY_DAYS {
        return Err(PkiError::InvalidArgument(format!(
            "validity_days must be 1..={MAX_VALIDITY_DAYS}, got {days}"
        )));
    }
    Ok(())
}

fn leaf_params(params: &mut CertificateParams, validity_days: u32) {
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    validity(params, validity_days);
}
