//! The cluster CA in the store, the identity each control plane process
//! shows nodes, and join tokens.

use std::time::Duration;

use agentd_pki::{ClusterCa, JoinToken};

use super::NodeTls;
use crate::store::cluster::{CaRow, CaStoreError, JoinTokenRow};
use crate::store::{Store, StoreError};

/// How long a control plane's own certificate lasts; a new one is issued at
/// each start.
const CONTROL_PLANE_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Store(#[from] CaStoreError),
    #[error("the cluster CA in the store is unusable: {0}")]
    Unusable(agentd_pki::CaError),
    #[error("cannot make a join token: {0}")]
    Token(#[from] agentd_pki::TokenError),
}

impl From<StoreError> for CaError {
    fn from(e: StoreError) -> Self {
        CaError::Store(e.into())
    }
}

/// The cluster CA, made and stored on first use.
pub async fn cluster_ca(store: &Store) -> Result<ClusterCa, CaError> {
    let row = store
        .cluster_ca_or(|| {
            let ca = ClusterCa::generate().map_err(|e| e.to_string())?;
            Ok(CaRow { cert_pem: ca.cert_pem().to_string(), key_pem: ca.key_pem() })
        })
        .await?;
    ClusterCa::from_pem(&row.cert_pem, &row.key_pem).map_err(CaError::Unusable)
}

/// What this control plane process shows nodes (a fresh client certificate
/// from the cluster CA) and trusts in them (the CA).
pub async fn node_tls(store: &Store) -> Result<NodeTls, CaError> {
    let ca = cluster_ca(store).await?;
    let identity = ca.issue_control_plane(CONTROL_PLANE_VALIDITY).map_err(CaError::Unusable)?;
    Ok(NodeTls { ca_pem: ca.cert_pem().to_string(), identity })
}

/// A new single-use join token valid for `ttl`: its text (shown once, never
/// stored) and its row.
pub async fn create_join_token(store: &Store, ttl: Duration, description: &str) -> Result<(String, JoinTokenRow), CaError> {
    let ca = cluster_ca(store).await?;
    let (token, stored) = JoinToken::generate(&ca.fingerprint())?;
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 4);
    let row = store.insert_join_token(&stored.id, &stored.secret_hash, description, ttl_ms).await?;
    Ok((token.to_string(), row))
}
