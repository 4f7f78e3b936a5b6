//! A gRPC client per node, made on first use from the address the store
//! keeps for it: `unix:<path>` for the node of `agentd up` (or one beside
//! `agentd server`), `<host>:<port>` for a node on another machine, reached
//! over mutual TLS. A node over TCP must show the certificate the cluster CA
//! issued to its id (its name, `<id>.node.agentd`, not the address, is what
//! the control plane checks), and is shown this control plane's own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentd_pki::ControlPlaneIdentity;
use agentd_proto::error::status;
use agentd_proto::trace::traced;
use tonic::Code;
use tonic::Status;
use tonic::transport::Endpoint;

use crate::store::nodes::NodeRow;
use crate::store::{Store, StoreError};

/// How long dialling a node over TCP may take before the call fails (and a
/// workflow step retries it).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A node's client: its calls carry the caller's trace
/// ([`agentd_proto::trace`]).
pub type NodeClient = agentd_proto::node::node_client::NodeClient<agentd_proto::trace::Traced>;

/// What this control plane shows nodes and trusts in them.
pub struct NodeTls {
    pub ca_pem: String,
    pub identity: ControlPlaneIdentity,
}

struct Cached {
    address: String,
    client: NodeClient,
}

/// The nodes this control plane talks to, by id. Cheap to clone.
#[derive(Clone)]
pub struct Nodes {
    store: Store,
    tls: Option<Arc<NodeTls>>,
    clients: Arc<Mutex<HashMap<String, Cached>>>,
}

fn unavailable(message: String) -> Status {
    status(Code::Unavailable, "node_unavailable", message)
}

fn store_unavailable(e: StoreError) -> Status {
    status(Code::Unavailable, "store_unavailable", e.to_string())
}

impl Nodes {
    /// `tls`: how to reach nodes over TCP; without it only unix-socket
    /// nodes can be reached.
    pub fn new(store: Store, tls: Option<NodeTls>) -> Self {
        Self { store, tls: tls.map(Arc::new), clients: Arc::default() }
    }

    /// The client of `node_id`. Fails (`Unavailable`, so steps retry) when
    /// the store does not know the node or cannot be read.
    pub async fn client(&self, node_id: &str) -> Result<NodeClient, Status> {
        if let Some(c) = self.clients.lock().unwrap().get(node_id) {
            return Ok(c.client.clone());
        }
        let row = self
            .store
            .get_node(node_id)
            .await
            .map_err(store_unavailable)?
            .ok_or_else(|| unavailable(format!("node {node_id} is not registered")))?;
        self.refresh(&row)
    }

    /// The node running `container_id`, and its client.
    pub async fn of_container(&self, container_id: &str) -> Result<(String, NodeClient), Status> {
        let c = self.store.get_container(container_id).await.map_err(|e| match e {
            StoreError::NotFound { .. } => status(Code::NotFound, "container_not_found", e.to_string()),
            e => store_unavailable(e),
        })?;
        let client = self.client(&c.node_id).await?;
        Ok((c.node_id, client))
    }

    /// The client for `row`'s address, made anew if the address changed
    /// (the node joined again from elsewhere).
    pub fn refresh(&self, row: &NodeRow) -> Result<NodeClient, Status> {
        let mut clients = self.clients.lock().unwrap();
        if let Some(c) = clients.get(&row.id)
            && c.address == row.address
        {
            return Ok(c.client.clone());
        }
        let client = self.dial(&row.id, &row.address)?;
        clients.insert(row.id.clone(), Cached { address: row.address.clone(), client: client.clone() });
        Ok(client)
    }

    /// Forgets a node's client (the node was removed).
    pub fn forget(&self, node_id: &str) {
        self.clients.lock().unwrap().remove(node_id);
    }

    fn dial(&self, node_id: &str, address: &str) -> Result<NodeClient, Status> {
        if let Some(path) = address.strip_prefix("unix:") {
            return Ok(NodeClient::new(traced(agentd_proto::unix::lazy_channel(std::path::Path::new(path)))));
        }
        if address.is_empty() {
            return Err(unavailable(format!("node {node_id} has no address")));
        }
        let Some(tls) = &self.tls else {
            return Err(unavailable(format!("node {node_id} is at {address}, and this control plane has no cluster certificate to reach it")));
        };
        let config = agentd_pki::control_plane_client_tls(&tls.ca_pem, &tls.identity, node_id)
            .map_err(|e| unavailable(format!("TLS for node {node_id}: {e}")))?;
        let endpoint = Endpoint::from_shared(format!("https://{address}"))
            .map_err(|e| unavailable(format!("node {node_id}'s address {address:?}: {e}")))?
            .tls_config(config)
            .map_err(|e| unavailable(format!("TLS for node {node_id}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_keepalive(Some(Duration::from_secs(10)))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        Ok(NodeClient::new(traced(endpoint.connect_lazy())))
    }
}

/// How long [`register_unix_node`] waits for a node that is still starting.
const REGISTER_WAIT: Duration = Duration::from_secs(15);

/// Records the node serving on the unix socket `socket` (the one of `agentd
/// up`, or one beside `agentd server`) under the id it reports, and returns
/// that id. Waits a while for a node that is still starting.
pub async fn register_unix_node(store: &Store, socket: &std::path::Path) -> Result<String, String> {
    let address = format!("unix:{}", socket.display());
    let deadline = tokio::time::Instant::now() + REGISTER_WAIT;
    let info = loop {
        let mut client = NodeClient::new(traced(agentd_proto::unix::lazy_channel(socket)));
        match client.get_node_info(agentd_proto::node::GetNodeInfoRequest {}).await {
            Ok(info) => break info.into_inner(),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(format!("node at {address} does not answer: {}", e.message())),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let capacity = info.capacity.unwrap_or_default();
    let registration = crate::store::nodes::NodeRegistration {
        id: info.node_id.clone(),
        address,
        labels: info.labels.into_iter().collect(),
        version: info.version,
        capacity: crate::store::nodes::Capacity {
            slots: i64::from(capacity.slots),
            memory: i64::try_from(capacity.memory_bytes).unwrap_or(i64::MAX),
            cpus: capacity.cpus,
        },
        cert_fingerprint: String::new(),
    };
    store.register_node(&registration).await.map_err(|e| e.to_string())?;
    Ok(info.node_id)
}
