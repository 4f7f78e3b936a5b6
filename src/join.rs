//! A node's membership of a fleet: joining once with a token, and the
//! identity it keeps afterwards in `<state-dir>/node/tls/` (its key and
//! certificate, mode 0600, the cluster CA, and `identity.json` naming its id,
//! the address it advertised and the control plane it joined), with which it
//! starts again without a token.
//!
//! The token's secret never travels: the node proves it holds the token by a
//! MAC of its CSR, and checks the answer's MAC and the CA's fingerprint
//! against the token, so it knows the control plane it joined even over
//! plain HTTP (see `agentd_pki::token`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentd_pki::{JoinToken, NodeKey};
use anyhow::{Context, anyhow, bail};
use serde::{Deserialize, Serialize};

/// How long a join request may take.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What a joined node keeps besides its key and certificate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Identity {
    pub node_id: String,
    pub advertise: String,
    pub control_plane: String,
}

/// A joined node's identity and TLS material.
pub struct Joined {
    pub identity: Identity,
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

fn dir(node_state: &Path) -> PathBuf {
    node_state.join("tls")
}

/// What an earlier join left, if any.
pub fn load(node_state: &Path) -> anyhow::Result<Option<Joined>> {
    let dir = dir(node_state);
    let identity_path = dir.join("identity.json");
    if !identity_path.exists() {
        return Ok(None);
    }
    let read = |name: &str| agentd_pki::read_private(&dir.join(name)).with_context(|| format!("joined node state in {}", dir.display()));
    let identity: Identity = serde_json::from_str(&read("identity.json")?).context("identity.json is not valid")?;
    Ok(Some(Joined { identity, key_pem: read("node.key")?, cert_pem: read("node.crt")?, ca_pem: read("ca.crt")? }))
}

/// What a node tells the control plane about itself when it joins.
pub struct Offer {
    pub node_id: String,
    pub advertise: String,
    pub labels: BTreeMap<String, String>,
    pub slots: u32,
    pub memory: u64,
    pub cpus: f64,
}

#[derive(Serialize)]
struct JoinRequest<'a> {
    token_id: &'a str,
    proof: String,
    csr_pem: &'a str,
    node_id: &'a str,
    advertise: &'a str,
    labels: &'a BTreeMap<String, String>,
    version: &'a str,
    capacity_slots: u32,
    capacity_memory: u64,
    capacity_cpus: f64,
}

#[derive(Deserialize)]
struct JoinAnswer {
    node_id: String,
    ca_pem: String,
    cert_pem: String,
    answer_mac: String,
}

/// Joins the fleet at `control_plane` with `token`, and keeps what it gets
/// in the state directory. Any refusal is an error naming why.
pub async fn join(node_state: &Path, control_plane: &str, token: &str, offer: &Offer) -> anyhow::Result<Joined> {
    let token = JoinToken::parse(token).map_err(|e| anyhow!("{e}"))?;
    let key = NodeKey::generate().map_err(|e| anyhow!("cannot make the node's key: {e}"))?;
    let csr_pem = key.csr_pem(&offer.node_id).map_err(|e| anyhow!("{e}"))?;
    let request = JoinRequest {
        token_id: token.id(),
        proof: token.proof(csr_pem.as_bytes()),
        csr_pem: &csr_pem,
        node_id: &offer.node_id,
        advertise: &offer.advertise,
        labels: &offer.labels,
        version: env!("CARGO_PKG_VERSION"),
        capacity_slots: offer.slots,
        capacity_memory: offer.memory,
        capacity_cpus: offer.cpus,
    };
    let url = format!("{}/v1/nodes:join", control_plane.trim_end_matches('/'));
    let client = reqwest::Client::builder().timeout(JOIN_TIMEOUT).build()?;
    let response = client.post(&url).json(&request).send().await.map_err(|e| anyhow!("cannot reach {url}: {e}"))?;
    let status = response.status();
    if !status.is_success() {
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        let detail = body["detail"].as_str().unwrap_or("no detail");
        let code = body["code"].as_str().unwrap_or("error");
        bail!("the control plane refused the join ({status}, {code}): {detail}");
    }
    let answer: JoinAnswer = response.json().await.map_err(|e| anyhow!("the control plane's answer is not a join answer: {e}"))?;
    // The answer must come from a holder of this token, carry the CA the
    // token names, and certify this node's own key under its id.
    token.check_answer(&answer.ca_pem, &answer.cert_pem, &answer.answer_mac).map_err(|e| anyhow!("the join answer cannot be trusted: {e}"))?;
    if answer.node_id != offer.node_id {
        bail!("the control plane answered for node {:?}, not {:?}", answer.node_id, offer.node_id);
    }
    agentd_pki::check_issued(&answer.cert_pem, &answer.ca_pem, &offer.node_id, &key).map_err(|e| anyhow!("the issued certificate is not this node's: {e}"))?;

    let identity = Identity { node_id: offer.node_id.clone(), advertise: offer.advertise.clone(), control_plane: control_plane.to_string() };
    let dir = dir(node_state);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: &str, bytes: &[u8]| agentd_pki::write_private(&dir.join(name), bytes).with_context(|| format!("cannot write {name}"));
    write("node.key", key.key_pem().as_bytes())?;
    write("node.crt", answer.cert_pem.as_bytes())?;
    write("ca.crt", answer.ca_pem.as_bytes())?;
    // Written last: its presence says the join is complete.
    write("identity.json", serde_json::to_string_pretty(&identity)?.as_bytes())?;
    Ok(Joined { identity, key_pem: key.key_pem(), cert_pem: answer.cert_pem, ca_pem: answer.ca_pem })
}
