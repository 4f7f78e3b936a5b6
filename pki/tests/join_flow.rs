//! The whole join, as the node and the control plane will run it: token, proof,
//! signing, answer, checks, files in the state dir, then the control plane dialing the
//! node over TLS on 127.0.0.1.

use std::time::Duration;

use agentd_pki::{
    ClusterCa, JoinToken, NodeKey, check_issued, control_plane_client_tls, node_server_tls,
    read_private, write_private,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Endpoint, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const BOUND: Duration = Duration::from_secs(10);

#[tokio::test]
async fn node_joins_and_is_reachable() {
    // Control plane: a CA, a token for the operator to hand over, a store row.
    let ca = ClusterCa::generate().unwrap();
    let (token, stored) = JoinToken::generate(&ca.fingerprint()).unwrap();
    let token_text = token.to_string();

    // Node: parse the token, make a key and CSR, prove the token.
    let token = JoinToken::parse(&token_text).unwrap();
    let key = NodeKey::generate().unwrap();
    let csr = key.csr_pem("n1").unwrap();
    let proof = token.proof(csr.as_bytes());
    // What crosses the wire carries no secret.
    let secret = token_text.split('.').nth(2).unwrap();
    assert!(!format!("{}{csr}{proof}", token.id()).contains(secret));

    // Control plane: look the token up by id, check the proof, sign, answer.
    assert_eq!(stored.id, token.id());
    assert!(stored.verify_proof(csr.as_bytes(), &proof));
    let cert = ca
        .sign_node_csr(&csr, "n1", Duration::from_secs(30 * 24 * 3600))
        .unwrap();
    let mac = stored.answer_mac(ca.cert_pem(), &cert).unwrap();

    // Node: check the answer and the certificate, keep them.
    token.check_answer(ca.cert_pem(), &cert, &mac).unwrap();
    check_issued(&cert, ca.cert_pem(), "n1", &key).unwrap();
    let state = tempfile::tempdir().unwrap();
    write_private(&state.path().join("node.key"), key.key_pem().as_bytes()).unwrap();
    write_private(&state.path().join("node.crt"), cert.as_bytes()).unwrap();
    write_private(&state.path().join("ca.crt"), ca.cert_pem().as_bytes()).unwrap();

    // Node, after a restart: serve from the state dir.
    let tls = node_server_tls(
        &read_private(&state.path().join("node.crt")).unwrap(),
        &read_private(&state.path().join("node.key")).unwrap(),
        &read_private(&state.path().join("ca.crt")).unwrap(),
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(health)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            }),
    );

    // Control plane: dial the node by address, trusting it by name.
    let cp = ca.issue_control_plane(Duration::from_secs(3600)).unwrap();
    let client_tls = control_plane_client_tls(ca.cert_pem(), &cp, "n1").unwrap();
    let status = tokio::time::timeout(BOUND, async {
        let channel = Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(client_tls)
            .unwrap()
            .connect_timeout(BOUND)
            .connect()
            .await
            .unwrap();
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status()
    })
    .await
    .expect("the call finishes within the bound");
    assert_eq!(status, ServingStatus::Serving);

    stop.send(()).unwrap();
    tokio::time::timeout(BOUND, server)
        .await
        .expect("server stops in time")
        .unwrap()
        .unwrap();
}
