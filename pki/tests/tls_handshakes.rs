//! Real handshakes: a tonic gRPC server (the standard health service) on
//! 127.0.0.1 with `node_server_tls`, dialed by tonic clients holding various
//! certificates. Every case is bounded by `BOUND`; nothing leaves the loopback.

use std::net::SocketAddr;
use std::time::Duration;

use agentd_pki::{
    ClusterCa, ControlPlaneIdentity, NodeKey, control_plane_client_tls, node_server_tls,
};
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const DAY: Duration = Duration::from_secs(24 * 3600);
/// Upper bound on any one dial-and-call, refusals included.
const BOUND: Duration = Duration::from_secs(10);

/// A node's certificate and key, as PEM.
struct NodeCert {
    cert_pem: String,
    key_pem: String,
}

fn node_cert(ca: &ClusterCa, node_id: &str) -> NodeCert {
    let key = NodeKey::generate().unwrap();
    let cert_pem = ca
        .sign_node_csr(&key.csr_pem(node_id).unwrap(), node_id, DAY)
        .unwrap();
    NodeCert {
        cert_pem,
        key_pem: key.key_pem(),
    }
}

/// A certificate the CA's key signs with parameters `ClusterCa` would never use:
/// the means to test what the verifiers do with EKUs, names held constant.
fn odd_cert(ca: &ClusterCa, dns_name: &str, ekus: Vec<ExtendedKeyUsagePurpose>) -> NodeCert {
    let issuer =
        Issuer::from_ca_cert_pem(ca.cert_pem(), KeyPair::from_pem(&ca.key_pem()).unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![dns_name.to_owned()]).unwrap();
    params.extended_key_usages = ekus;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.is_ca = IsCa::ExplicitNoCa;
    let cert = params.signed_by(&key, &issuer).unwrap();
    NodeCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A running node server; stopped (and awaited) on drop of `stop`.
struct Served {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Served {
    async fn start(tls: ServerTlsConfig) -> Served {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let (stop, stopped) = oneshot::channel::<()>();
        let router = Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(health);
        let task = tokio::spawn(router.serve_with_incoming_shutdown(
            TcpListenerStream::new(listener),
            async {
                let _ = stopped.await;
            },
        ));
        Served { addr, stop, task }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(BOUND, self.task)
            .await
            .expect("server stops in time")
            .unwrap()
            .unwrap();
    }
}

/// Dials `addr` with `tls` and asks the health service; the error, if any, with its
/// whole source chain (where rustls's reason sits).
async fn check(addr: SocketAddr, tls: ClientTlsConfig) -> Result<ServingStatus, String> {
    let attempt = async {
        let endpoint = Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .map_err(|e| chain(&e))?
            .connect_timeout(BOUND)
            .timeout(BOUND);
        let channel = endpoint.connect().await.map_err(|e| chain(&e))?;
        let answer = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|status| chain(&status))?;
        Ok(answer.into_inner().status())
    };
    tokio::time::timeout(BOUND, attempt)
        .await
        .expect("dial and call finish within the bound")
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(" <- ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

struct Setup {
    ca: ClusterCa,
    cp: ControlPlaneIdentity,
}

fn setup() -> Setup {
    let ca = ClusterCa::generate().unwrap();
    let cp = ca.issue_control_plane(DAY).unwrap();
    Setup { ca, cp }
}

async fn serve_node(ca: &ClusterCa, cert: &NodeCert) -> Served {
    Served::start(node_server_tls(&cert.cert_pem, &cert.key_pem, ca.cert_pem()).unwrap()).await
}

#[tokio::test]
async fn control_plane_reaches_its_node() {
    let s = setup();
    let server = serve_node(&s.ca, &node_cert(&s.ca, "n1")).await;
    let tls = control_plane_client_tls(s.ca.cert_pem(), &s.cp, "n1").unwrap();
    assert_eq!(check(server.addr, tls).await, Ok(ServingStatus::Serving));
    server.stop().await;
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let s = setup();
    let server = serve_node(&s.ca, &node_cert(&s.ca, "n1")).await;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(s.ca.cert_pem()))
        .domain_name("n1.node.agentd");
    let err = check(server.addr, tls).await.unwrap_err();
    assert!(err.contains("CertificateRequired"), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn control_plane_of_another_ca_is_refused() {
    let s = setup();
    let other = ClusterCa::generate().unwrap();
    let foreign_cp = other.issue_control_plane(DAY).unwrap();
    let server = serve_node(&s.ca, &node_cert(&s.ca, "n1")).await;
    // It trusts our CA for the server, so only its own certificate is at fault.
    let tls = control_plane_client_tls(s.ca.cert_pem(), &foreign_cp, "n1").unwrap();
    let err = check(server.addr, tls).await.unwrap_err();
    assert!(err.contains("UnknownCA"), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn node_certificate_cannot_act_as_control_plane() {
    let s = setup();
    let n2 = node_cert(&s.ca, "n2");
    let server = serve_node(&s.ca, &node_cert(&s.ca, "n1")).await;
    let posing = ControlPlaneIdentity {
        cert_pem: n2.cert_pem,
        key_pem: n2.key_pem,
    };
    let tls = control_plane_client_tls(s.ca.cert_pem(), &posing, "n1").unwrap();
    let err = check(server.addr, tls).await.unwrap_err();
    // Same CA, valid certificate: only its EKU (serverAuth) disqualifies it. rustls
    // reports webpki's InvalidPurpose to the peer as an unsupported_certificate alert.
    assert!(err.contains("UnsupportedCertificate"), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn another_node_answering_is_refused() {
    let s = setup();
    // n2's certificate is valid and from our CA, but we dialed for n1.
    let server = serve_node(&s.ca, &node_cert(&s.ca, "n2")).await;
    let tls = control_plane_client_tls(s.ca.cert_pem(), &s.cp, "n1").unwrap();
    let err = check(server.addr, tls).await.unwrap_err();
    assert!(
        err.contains("not valid for name \"n1.node.agentd\""),
        "{err}"
    );
    // The same server, dialed as n2, answers: the refusal was the name alone.
    let tls = control_plane_client_tls(s.ca.cert_pem(), &s.cp, "n2").unwrap();
    assert_eq!(check(server.addr, tls).await, Ok(ServingStatus::Serving));
    server.stop().await;
}

#[tokio::test]
async fn server_of_another_ca_is_refused() {
    let s = setup();
    let other = ClusterCa::generate().unwrap();
    // A node certificate for the right name from the wrong CA; the server itself
    // trusts our CA for clients, so it would take our control plane.
    let server = serve_node(&s.ca, &node_cert(&other, "n1")).await;
    let tls = control_plane_client_tls(s.ca.cert_pem(), &s.cp, "n1").unwrap();
    let err = check(server.addr, tls).await.unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn control_plane_certificate_cannot_serve_as_node() {
    let s = setup();
    let other_cp = s.ca.issue_control_plane(DAY).unwrap();
    let server = Served::start(
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&other_cp.cert_pem, &other_cp.key_pem))
            .client_ca_root(Certificate::from_pem(s.ca.cert_pem())),
    )
    .await;
    // Dialed as a node: refused.
    let tls = control_plane_client_tls(s.ca.cert_pem(), &s.cp, "n1").unwrap();
    assert!(check(server.addr, tls).await.is_err());
    // Dialed by its own name, so the name cannot be what refuses it: still refused,
    // and for its purpose (clientAuth only).
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(s.ca.cert_pem()))
        .identity(Identity::from_pem(&s.cp.cert_pem, &s.cp.key_pem))
        .domain_name("control-plane.agentd");
    let err = check(server.addr, tls).await.unwrap_err();
    assert!(
        err.contains("does not allow extended key usage for server authentication"),
        "{err}"
    );
    server.stop().await;
}

#[tokio::test]
async fn eku_alone_decides_with_the_node_name_in_place() {
    // A CA-signed certificate named n1.node.agentd but clientAuth only: the control
    // plane refuses it as a server for n1, on its purpose.
    let s = setup();
    let client_only = odd_cert(
        &s.ca,
        "n1.node.agentd",
        vec![ExtendedKeyUsagePurpose::ClientAuth],
    );
    let server = serve_node(&s.ca, &client_only).await;
    let tls = control_plane_client_tls(s.ca.cert_pem(), &s.cp, "n1").unwrap();
    let err = check(server.addr, tls).await.unwrap_err();
    assert!(
        err.contains("does not allow extended key usage for server authentication"),
        "{err}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_certificate_without_eku_would_pass_both_ways() {
    // webpki requires serverAuth / clientAuth only *if* the certificate has an EKU
    // extension at all. Shown here so nobody drops the EKU from what the CA issues:
    // without one, a certificate is good for either role.
    let s = setup();
    let no_eku = odd_cert(&s.ca, "n1.node.agentd", Vec::new());
    let server = serve_node(&s.ca, &no_eku).await;
    let tls = control_plane_client_tls(s.ca.cert_pem(), &s.cp, "n1").unwrap();
    assert_eq!(check(server.addr, tls).await, Ok(ServingStatus::Serving));
    let as_client = ControlPlaneIdentity {
        cert_pem: no_eku.cert_pem.clone(),
        key_pem: no_eku.key_pem.clone(),
    };
    let tls = control_plane_client_tls(s.ca.cert_pem(), &as_client, "n1").unwrap();
    assert_eq!(check(server.addr, tls).await, Ok(ServingStatus::Serving));
    server.stop().await;
}
