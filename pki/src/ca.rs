//! The cluster CA: the one key that makes a node a node and a control plane a control
//! plane.
//!
//! Roles live in the extended key usage of what it issues: a node certificate is
//! `serverAuth` only, a control-plane certificate `clientAuth` only. rustls's webpki
//! verifiers demand `serverAuth` of a server's certificate and `clientAuth` of a
//! client's whenever the extension is present (and it always is on ours), so a node
//! certificate cannot dial another node as a control plane, and a control-plane
//! certificate cannot pose as a node. The name `<node_id>.node.agentd` binds a node
//! certificate to its node: the control plane dials expecting that name.

use std::time::Duration;

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::names::{CONTROL_PLANE_DNS_NAME, InvalidNodeId, check_node_id, node_dns_name};
use crate::pem::{self, PemError};
use crate::random::{self, RandomError};
use crate::tls::ControlPlaneIdentity;

/// The CA's subject common name.
pub const CA_COMMON_NAME: &str = "agentd cluster CA";

/// The CA certificate's lifetime: long enough that nobody rotates it by accident;
/// rotating it means re-joining every node.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Certificates start this long before they are issued, so a node whose clock runs a
/// little behind the control plane's does not refuse a certificate born "in the future".
const CLOCK_SKEW: time::Duration = time::Duration::minutes(5);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    InvalidNodeId(#[from] InvalidNodeId),
    #[error("malformed certificate signing request: {0}")]
    MalformedCsr(rcgen::Error),
    #[error("CA certificate: {0}")]
    CaCertPem(PemError),
    #[error("CA certificate could not be parsed: {0}")]
    CaCertParse(String),
    #[error("the certificate given as the CA's is not a CA certificate (no CA basic constraint)")]
    NotACa,
    #[error("CA private key could not be loaded: {0}")]
    CaKey(rcgen::Error),
    #[error("the CA private key does not belong to the CA certificate")]
    CaKeyMismatch,
    #[error("validity of {0:?} is out of range")]
    Validity(Duration),
    #[error("generating a key pair: {0}")]
    KeyGeneration(rcgen::Error),
    #[error("building or signing a certificate: {0}")]
    Sign(rcgen::Error),
    #[error(transparent)]
    Random(#[from] RandomError),
}

/// The cluster's certificate authority: its certificate and signing key.
///
/// A value of this type always holds a CA certificate and the key that matches it
/// (checked by [`ClusterCa::from_pem`]).
pub struct ClusterCa {
    /// The CA certificate as PEM, handed to nodes (they trust it as their client root).
    cert_pem: String,
    /// Its DER, which the fingerprint in join tokens is taken over.
    cert_der: Vec<u8>,
    /// rcgen's signing view of the CA: subject name, key identifier method, key.
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for ClusterCa {
    // The key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// A new CA: ECDSA P-256, CN "agentd cluster CA", valid for ten years, allowed to
    /// sign end-entity certificates (path length 0) and CRLs, nothing else.
    pub fn generate() -> Result<Self, CaError> {
        let key = new_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(CA_COMMON_NAME);
        // A random cluster id makes each CA's subject its own. Verifiers find a
        // certificate's issuer by subject name: with one name for every cluster, a
        // certificate from another cluster fails as "BadSignature" instead of the
        // plainer "UnknownIssuer".
        let cluster_id = hex::encode(random::bytes::<8>()?);
        params.distinguished_name.push(
            DnType::OrganizationalUnitName,
            format!("cluster {cluster_id}"),
        );
        // Path length 0: whatever this CA signs is a leaf, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut params, CA_VALIDITY)?;
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key).map_err(CaError::Sign)?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA saved with [`cert_pem`](Self::cert_pem) and [`key_pem`](Self::key_pem).
    /// Refuses a certificate that is not a CA and a key that is not the certificate's.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let der = pem::cert_der(cert_pem).map_err(CaError::CaCertPem)?;
        let key = KeyPair::from_pem(key_pem).map_err(CaError::CaKey)?;
        {
            let (_, x509) = x509_parser::parse_x509_certificate(&der)
                .map_err(|e| CaError::CaCertParse(e.to_string()))?;
            if !x509.is_ca() {
                return Err(CaError::NotACa);
            }
            if x509.public_key().raw != key.subject_public_key_info().as_slice() {
                return Err(CaError::CaKeyMismatch);
            }
        }
        let issuer =
            Issuer::from_ca_cert_der(&der, key).map_err(|e| CaError::CaCertParse(e.to_string()))?;
        Ok(Self {
            // Re-encoded from the DER, so extra sections in the input file (a second
            // certificate, comments) do not travel on to nodes.
            cert_pem: pem_encode_cert(&der),
            cert_der: der.to_vec(),
            issuer,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PKCS#8 PEM. Whoever holds it can mint nodes and control
    /// planes: store it like a root password.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Lowercase hex SHA-256 of the CA certificate's DER, as pinned by join tokens.
    pub fn fingerprint(&self) -> String {
        pem::sha256_hex(&self.cert_der)
    }

    /// Signs a node's certificate signing request for `node_id`.
    ///
    /// Only the CSR's public key (and its proof of possession, the CSR signature) is
    /// used: its subject, SANs and requested extensions are ignored. The certificate
    /// says what the control plane decided: CN = node id, SAN DNS `<node_id>.node.agentd`,
    /// EKU serverAuth only, key usage digitalSignature, not a CA. Returns the PEM.
    pub fn sign_node_csr(
        &self,
        csr_pem: &str,
        node_id: &str,
        validity: Duration,
    ) -> Result<String, CaError> {
        check_node_id(node_id)?;
        // Parsing also checks the CSR's signature, i.e. that the node holds the key.
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::MalformedCsr)?;
        let params = leaf_params(
            node_id,
            &node_dns_name(node_id),
            ExtendedKeyUsagePurpose::ServerAuth,
            validity,
        )?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(CaError::Sign)?;
        Ok(cert.pem())
    }

    /// A fresh key and certificate for one control-plane process: SAN DNS
    /// `control-plane.agentd`, EKU clientAuth only. Each process gets its own, so one
    /// can be let expire without touching the others.
    pub fn issue_control_plane(&self, validity: Duration) -> Result<ControlPlaneIdentity, CaError> {
        let key = new_key()?;
        let params = leaf_params(
            "agentd control plane",
            CONTROL_PLANE_DNS_NAME,
            ExtendedKeyUsagePurpose::ClientAuth,
            validity,
        )?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(CaError::Sign)?;
        Ok(ControlPlaneIdentity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The fingerprint of a CA certificate given as PEM (what [`ClusterCa::fingerprint`]
/// returns for the CA that holds the key): how a node checks the CA it was handed.
pub fn ca_fingerprint(ca_pem: &str) -> Result<String, PemError> {
    Ok(pem::sha256_hex(&pem::cert_der(ca_pem)?))
}

/// An end-entity certificate for one role: `eku` is the only purpose it carries.
fn leaf_params(
    common: &str,
    dns_name: &str,
    eku: ExtendedKeyUsagePurpose,
    validity: Duration,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(common);
    let san = Ia5String::try_from(dns_name).map_err(CaError::Sign)?;
    params.subject_alt_names = vec![SanType::DnsName(san)];
    params.extended_key_usages = vec![eku];
    // ECDSA keys only sign in TLS 1.2/1.3 (ECDHE); keyEncipherment would mean nothing.
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Written out (CA:FALSE) rather than left implicit.
    params.is_ca = IsCa::ExplicitNoCa;
    // Lets verifiers pick the right CA certificate during a CA rotation.
    params.use_authority_key_identifier_extension = true;
    // rcgen would otherwise derive the serial from the public key, so two certificates
    // for one key (a renewal) would share a serial, which RFC 5280 forbids.
    params.serial_number = Some(random_serial()?);
    set_validity(&mut params, validity)?;
    Ok(params)
}

fn set_validity(params: &mut CertificateParams, validity: Duration) -> Result<(), CaError> {
    let now = OffsetDateTime::now_utc();
    let not_after = time::Duration::try_from(validity)
        .ok()
        .and_then(|d| now.checked_add(d))
        .ok_or(CaError::Validity(validity))?;
    params.not_before = now - CLOCK_SKEW;
    params.not_after = not_after;
    Ok(())
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn new_key() -> Result<KeyPair, CaError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CaError::KeyGeneration)
}

/// 128 random bits, top bit clear so the DER integer stays positive at 16 bytes.
fn random_serial() -> Result<SerialNumber, RandomError> {
    let mut bytes = random::bytes::<16>()?;
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

fn pem_encode_cert(der: &[u8]) -> String {
    // rcgen's certificate type only comes from signing; build the PEM the same way it
    // does (base64, 64-column lines) for a certificate we loaded.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csr::NodeKey;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn parse(pem_text: &str) -> Vec<u8> {
        pem::cert_der(pem_text).unwrap().to_vec()
    }

    #[test]
    fn generated_ca_is_a_ca_and_round_trips() {
        let ca = ClusterCa::generate().unwrap();
        let der = parse(ca.cert_pem());
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(x509.is_ca());
        assert_eq!(
            x509.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            CA_COMMON_NAME
        );
        let ku = x509.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
        let years = (x509.validity().not_after.timestamp()
            - x509.validity().not_before.timestamp())
            / (365 * 24 * 3600);
        assert_eq!(years, 10);

        let again = ClusterCa::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(again.fingerprint(), ca.fingerprint());
        assert_eq!(ca_fingerprint(ca.cert_pem()).unwrap(), ca.fingerprint());
        assert_eq!(ca.fingerprint().len(), 64);
        assert!(
            ca.fingerprint()
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
    }

    #[test]
    fn from_pem_refuses_a_foreign_key_and_a_leaf() {
        let ca = ClusterCa::generate().unwrap();
        let other = ClusterCa::generate().unwrap();
        assert!(matches!(
            ClusterCa::from_pem(ca.cert_pem(), &other.key_pem()),
            Err(CaError::CaKeyMismatch)
        ));
        let cp = ca.issue_control_plane(DAY).unwrap();
        assert!(matches!(
            ClusterCa::from_pem(&cp.cert_pem, &cp.key_pem),
            Err(CaError::NotACa)
        ));
        assert!(matches!(
            ClusterCa::from_pem("not pem", &ca.key_pem()),
            Err(CaError::CaCertPem(_))
        ));
    }

    #[test]
    fn node_certificate_is_what_the_ca_decided() {
        let ca = ClusterCa::generate().unwrap();
        let key = NodeKey::generate().unwrap();
        // A CSR that asks for much more than a node may have.
        let mut asked = CertificateParams::new(vec![
            "control-plane.agentd".to_owned(),
            "n9.node.agentd".to_owned(),
            "10.0.0.1".to_owned(),
        ])
        .unwrap();
        asked.distinguished_name = common_name("n9");
        asked.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        asked.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = asked
            .serialize_request(key.key_pair())
            .unwrap()
            .pem()
            .unwrap();

        let cert_pem = ca.sign_node_csr(&csr, "n1", DAY).unwrap();
        let der = parse(&cert_pem);
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!x509.is_ca());
        let bc = x509
            .basic_constraints()
            .unwrap()
            .expect("CA:FALSE written out");
        assert!(!bc.value.ca);
        assert_eq!(
            x509.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "n1"
        );
        let san = x509.subject_alternative_name().unwrap().unwrap().value;
        let names: Vec<String> = san.general_names.iter().map(|n| n.to_string()).collect();
        assert_eq!(names, ["DNSName(n1.node.agentd)"]);
        let eku = x509.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth && !eku.any && eku.other.is_empty());
        let ku = x509.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        assert_eq!(
            x509.public_key().raw,
            key.key_pair().subject_public_key_info()
        );
        // Validity: roughly one day, starting a little in the past.
        let v = x509.validity();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        assert!(v.not_before.timestamp() <= now - 60);
        assert!((v.not_after.timestamp() - now - DAY.as_secs() as i64).abs() < 60);
    }

    #[test]
    fn serials_differ_for_one_key() {
        let ca = ClusterCa::generate().unwrap();
        let key = NodeKey::generate().unwrap();
        let csr = key.csr_pem("n1").unwrap();
        let a = parse(&ca.sign_node_csr(&csr, "n1", DAY).unwrap());
        let b = parse(&ca.sign_node_csr(&csr, "n1", DAY).unwrap());
        let serial = |der: &[u8]| {
            x509_parser::parse_x509_certificate(der)
                .unwrap()
                .1
                .raw_serial()
                .to_vec()
        };
        assert_ne!(serial(&a), serial(&b));
    }

    #[test]
    fn control_plane_certificate() {
        let ca = ClusterCa::generate().unwrap();
        let cp = ca.issue_control_plane(DAY).unwrap();
        let der = parse(&cp.cert_pem);
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = x509.subject_alternative_name().unwrap().unwrap().value;
        let names: Vec<String> = san.general_names.iter().map(|n| n.to_string()).collect();
        assert_eq!(names, ["DNSName(control-plane.agentd)"]);
        let eku = x509.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth && !eku.any && eku.other.is_empty());
        assert!(!x509.is_ca());
        let key = KeyPair::from_pem(&cp.key_pem).unwrap();
        assert_eq!(x509.public_key().raw, key.subject_public_key_info());
        assert!(!format!("{cp:?}").contains("PRIVATE"));
    }

    #[test]
    fn malformed_csr_and_bad_node_id_are_refused_clearly() {
        let ca = ClusterCa::generate().unwrap();
        let err = ca.sign_node_csr("garbage", "n1", DAY).unwrap_err();
        assert!(matches!(err, CaError::MalformedCsr(_)));
        assert!(
            err.to_string()
                .starts_with("malformed certificate signing request: "),
            "{err}"
        );
        // A CSR whose signature does not match its key: flip a byte in the signature.
        let key = NodeKey::generate().unwrap();
        let csr = key.csr_pem("n1").unwrap();
        let mut der = pem_section(&csr);
        let last = der.len() - 1;
        der[last] ^= 1;
        let tampered = pem_wrap("CERTIFICATE REQUEST", &der);
        let err = ca.sign_node_csr(&tampered, "n1", DAY).unwrap_err();
        assert!(matches!(err, CaError::MalformedCsr(_)), "{err}");

        let err = ca.sign_node_csr(&csr, "N1", DAY).unwrap_err();
        assert!(matches!(err, CaError::InvalidNodeId(_)));
        assert!(err.to_string().contains("invalid node id \"N1\""), "{err}");
        assert!(matches!(
            ca.sign_node_csr(&csr, "n1", Duration::MAX),
            Err(CaError::Validity(_))
        ));
    }

    fn pem_section(text: &str) -> Vec<u8> {
        use base64::Engine as _;
        let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    }

    fn pem_wrap(label: &str, der: &[u8]) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        format!("-----BEGIN {label}-----\n{b64}\n-----END {label}-----\n")
    }
}
