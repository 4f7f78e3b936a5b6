//! A node joining the fleet: it sends its CSR with the proof that it holds a
//! join token (`agentd_pki::token`: the secret itself never travels), and
//! gets a certificate for its id signed by the cluster CA, the CA, and a MAC
//! by which it knows the answer comes from a holder of the same token. The
//! token is used up, the node recorded with its address, labels and
//! capacity.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::Store;
use crate::store::cluster::TokenRefusal;
use crate::store::nodes::{Capacity, NodeRegistration, node_state};

/// How long a node certificate lasts.
const NODE_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// What a joining node sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub token_id: String,
    /// HMAC of the CSR under the token's key (hex).
    pub proof: String,
    pub csr_pem: String,
    pub node_id: String,
    /// `host:port` where control planes reach the node's gRPC service.
    pub advertise: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub version: String,
    pub capacity_slots: u32,
    pub capacity_memory: u64,
    pub capacity_cpus: f64,
}

/// What the control plane answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinAnswer {
    pub node_id: String,
    pub ca_pem: String,
    pub cert_pem: String,
    /// HMAC of the CA and certificate under the token's key (hex).
    pub answer_mac: String,
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("{0}")]
    Token(TokenRefusal),
    #[error("the join token proof does not match: wrong token, or the request was altered")]
    BadProof,
    #[error("node id {0:?} is not valid: lower-case letters, digits and '-', at most 63, not ending in '-'")]
    BadNodeId(String),
    #[error("advertise address {0:?} is not host:port")]
    BadAddress(String),
    #[error("label {0:?} is not valid")]
    BadLabel(String),
    #[error("node {0} is registered and alive: stop it (or let it be lost) before another joins as {0}")]
    NodeIdInUse(String),
    #[error("the CSR is not valid: {0}")]
    BadCsr(String),
    #[error(transparent)]
    Ca(#[from] super::ca::CaError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

fn valid_address(address: &str) -> bool {
    let Some((host, port)) = address.rsplit_once(':') else { return false };
    !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) && !host.contains('/')
}

/// Checks a join and, if it holds, issues the node its certificate and
/// records it. Nothing is written unless every check passed.
pub async fn join(store: &Store, r: &JoinRequest) -> Result<JoinAnswer, JoinError> {
    if !agentd_plan::ids::valid_node_id(&r.node_id) {
        return Err(JoinError::BadNodeId(r.node_id.clone()));
    }
    if !valid_address(&r.advertise) {
        return Err(JoinError::BadAddress(r.advertise.clone()));
    }
    if let Some((k, v)) = r.labels.iter().find(|(k, v)| !agentd_plan::ids::valid_label(k, v)) {
        return Err(JoinError::BadLabel(format!("{k}={v}")));
    }
    let token = store.usable_join_token(&r.token_id).await?.map_err(JoinError::Token)?;
    if !agentd_pki::verify_join_proof(&token.secret_hash, r.csr_pem.as_bytes(), &r.proof) {
        return Err(JoinError::BadProof);
    }
    if let Some(existing) = store.get_node(&r.node_id).await?
        && existing.state == node_state::ALIVE
    {
        return Err(JoinError::NodeIdInUse(r.node_id.clone()));
    }
    let ca = super::ca::cluster_ca(store).await?;
    let cert_pem = ca.sign_node_csr(&r.csr_pem, &r.node_id, NODE_CERT_VALIDITY).map_err(|e| JoinError::BadCsr(e.to_string()))?;
    let answer_mac = agentd_pki::join_answer_mac(&token.secret_hash, ca.cert_pem(), &cert_pem).map_err(super::ca::CaError::from)?;
    // Single use: of two joins racing on one token, one gets it.
    if !store.use_join_token(&r.token_id, &r.node_id).await? {
        let again = store.usable_join_token(&r.token_id).await?.err().unwrap_or(TokenRefusal::Used(r.token_id.clone()));
        return Err(JoinError::Token(again));
    }
    let fingerprint = agentd_pki::ca_fingerprint(&cert_pem).unwrap_or_default();
    store
        .register_node(&NodeRegistration {
            id: r.node_id.clone(),
            address: r.advertise.clone(),
            labels: r.labels.clone(),
            version: r.version.clone(),
            capacity: Capacity {
                slots: i64::from(r.capacity_slots),
                memory: i64::try_from(r.capacity_memory).unwrap_or(i64::MAX),
                cpus: r.capacity_cpus,
            },
            cert_fingerprint: fingerprint,
        })
        .await?;
    tracing::info!(node_id = r.node_id, address = r.advertise, "node joined");
    Ok(JoinAnswer { node_id: r.node_id.clone(), ca_pem: ca.cert_pem().to_string(), cert_pem, answer_mac })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_host_and_port() {
        for good in ["10.0.0.1:7443", "node-1.example:443", "[::1]:7443"] {
            assert!(valid_address(good), "{good}");
        }
        for bad in ["10.0.0.1", ":7443", "host:0", "host:port", "unix:/x:1"] {
            assert!(!valid_address(bad), "{bad}");
        }
    }
}
