//! Placement: which node a new container goes to, decided in the transaction
//! that writes the container row with the capacity it reserves, so that
//! control planes placing at once never oversubscribe a node.
//!
//! A node takes a container when it is alive, active (not cordoned,
//! draining or drained), carries every label of the selector (and is the
//! pinned node, if one is named), and its free capacity fits: a slot, and
//! the memory and CPUs the profile limits the sandbox to. Free capacity is
//! what the node reported minus what its live containers reserved, counted
//! from their rows (no counter to drift). On PostgreSQL the chosen node's
//! row is locked and its capacity counted again before the insert: a
//! concurrent placement on the same node waits for this one to commit and
//! then sees its reservation. SQLite has one writer at a time anyway.
//!
//! Strategies: `spread` (the default) takes the least loaded node that
//! fits, `binpack` the most loaded.

use std::collections::BTreeMap;

use serde::Serialize;

use super::nodes::{NodeRow, node_admin, node_state};
use super::outbox::{Tx, TxConn};
use super::{Store, StoreError};

/// Container states that hold their node's capacity.
const HOLDING: &str = "('provisioning', 'ready', 'hibernated', 'stopping')";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Strategy {
    #[default]
    Spread,
    Binpack,
}

impl std::str::FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "spread" => Ok(Strategy::Spread),
            "binpack" => Ok(Strategy::Binpack),
            other => Err(format!("unknown placement strategy {other:?} (known: spread, binpack)")),
        }
    }
}

/// What a new container asks of its node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Demand {
    /// Bytes of memory to reserve: the profile's limit, or 0.
    pub memory: i64,
    /// CPUs to reserve: the profile's limit, or 0.
    pub cpus: f64,
    /// The node it must go to, if pinned.
    pub node_id: Option<String>,
    /// Labels the node must carry, each with this value.
    pub selector: BTreeMap<String, String>,
}

/// Why a node was passed over.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Refusal {
    pub node_id: String,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// Nodes exist that could take it, but none can now.
    #[error("no node can take the container: {}", describe(.0))]
    NoCapacity(Vec<Refusal>),
    /// No registered node is the pinned one.
    #[error("no node {0} is registered")]
    UnknownNode(String),
    /// No registered node carries the selector's labels, whatever its state.
    #[error("no registered node matches node_selector {0}")]
    NoNodeMatches(String),
    /// The limits ask for more than any eligible node offers at all.
    #[error("{0}")]
    NeverFits(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn describe(refusals: &[Refusal]) -> String {
    if refusals.is_empty() {
        return "no node is registered".into();
    }
    refusals.iter().map(|r| format!("{}: {}", r.node_id, r.reason)).collect::<Vec<_>>().join("; ")
}

fn selector_text(selector: &BTreeMap<String, String>) -> String {
    serde_json::to_string(selector).expect("labels serialize")
}

/// What a node's live containers hold.
#[derive(Debug, Clone, Copy, Default, sqlx::FromRow)]
struct Held {
    containers: i64,
    memory: i64,
    cpus: f64,
}

impl Held {
    fn load(&self, node: &NodeRow) -> f64 {
        if node.capacity_slots > 0 { self.containers as f64 / node.capacity_slots as f64 } else { 1.0 }
    }
}

/// Why `node` cannot take `demand` now, if it cannot.
fn refuse(node: &NodeRow, held: Held, demand: &Demand) -> Option<String> {
    if node.state == node_state::LOST {
        return Some(format!("lost ({})", node.error.clone().unwrap_or_else(|| "no heartbeat".into())));
    }
    if node.admin != node_admin::ACTIVE {
        return Some(node.admin.clone());
    }
    let labels = node.labels();
    if let Some((k, v)) = demand.selector.iter().find(|(k, v)| labels.get(*k) != Some(*v)) {
        return Some(format!("label mismatch: wants {k}={v}, has {}", labels.get(k).map_or("none".to_string(), |x| format!("{k}={x}"))));
    }
    if held.containers >= node.capacity_slots {
        return Some(format!("full: {} of {} sandbox slots taken", held.containers, node.capacity_slots));
    }
    let free_memory = node.capacity_memory - held.memory;
    if demand.memory > free_memory {
        return Some(format!("not enough memory: {} bytes asked, {} free of {}", demand.memory, free_memory.max(0), node.capacity_memory));
    }
    let free_cpus = node.capacity_cpus - held.cpus;
    if demand.cpus > free_cpus + 1e-9 {
        return Some(format!("not enough CPUs: {} asked, {:.2} free of {}", demand.cpus, free_cpus.max(0.0), node.capacity_cpus));
    }
    None
}

impl Tx {
    async fn nodes(&mut self) -> Result<Vec<NodeRow>, StoreError> {
        let sql = "SELECT * FROM nodes ORDER BY id";
        Ok(with_tx!(self, |conn| sqlx::query_as(sql).fetch_all(conn).await)?)
    }

    async fn held(&mut self, node_id: &str) -> Result<Held, StoreError> {
        // Audited: HOLDING is a constant list of states.
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) AS containers, CAST(COALESCE(SUM(reserved_memory), 0) AS BIGINT) AS memory, \
             CAST(COALESCE(SUM(reserved_cpus), 0) AS DOUBLE PRECISION) AS cpus \
             FROM containers WHERE node_id = $1 AND state IN {HOLDING}"
        ));
        let sql_sqlite = sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) AS containers, COALESCE(SUM(reserved_memory), 0) AS memory, \
             CAST(COALESCE(SUM(reserved_cpus), 0) AS REAL) AS cpus \
             FROM containers WHERE node_id = $1 AND state IN {HOLDING}"
        ));
        Ok(match &mut self.conn {
            TxConn::Postgres(t) => sqlx::query_as(sql).bind(node_id).fetch_one(&mut **t).await?,
            TxConn::Sqlite(t) => sqlx::query_as(sql_sqlite).bind(node_id).fetch_one(&mut **t).await?,
        })
    }

    /// Locks the node's row until this transaction ends (PostgreSQL; SQLite
    /// holds its one writer anyway).
    async fn lock_node(&mut self, node_id: &str) -> Result<(), StoreError> {
        if let TxConn::Postgres(t) = &mut self.conn {
            sqlx::query("SELECT id FROM nodes WHERE id = $1 FOR UPDATE").bind(node_id).fetch_optional(&mut **t).await?;
        }
        Ok(())
    }

    /// The node `demand` goes to under `strategy`, its capacity counted as
    /// of this transaction; with `reserve`, its row is locked and counted
    /// again so that the insert that follows in this transaction cannot
    /// oversubscribe it.
    pub async fn choose_node(&mut self, demand: &Demand, strategy: Strategy, reserve: bool) -> Result<String, PlacementError> {
        let nodes = self.nodes().await?;
        if let Some(pinned) = &demand.node_id
            && !nodes.iter().any(|n| &n.id == pinned)
        {
            return Err(PlacementError::UnknownNode(pinned.clone()));
        }
        let candidates: Vec<NodeRow> = nodes.into_iter().filter(|n| demand.node_id.as_ref().is_none_or(|p| *p == n.id)).collect();
        if !demand.selector.is_empty() && !candidates.iter().any(|n| demand.selector.iter().all(|(k, v)| n.labels().get(k) == Some(v))) {
            return Err(PlacementError::NoNodeMatches(selector_text(&demand.selector)));
        }
        let eligible: Vec<&NodeRow> = candidates.iter().filter(|n| demand.selector.iter().all(|(k, v)| n.labels().get(k) == Some(v))).collect();
        if !eligible.is_empty() {
            let most_memory = eligible.iter().map(|n| n.capacity_memory).max().unwrap_or(0);
            let most_cpus = eligible.iter().map(|n| n.capacity_cpus).fold(0.0, f64::max);
            if demand.memory > most_memory {
                return Err(PlacementError::NeverFits(format!("memory limit {} bytes is more than any node offers (at most {most_memory})", demand.memory)));
            }
            if demand.cpus > most_cpus + 1e-9 {
                return Err(PlacementError::NeverFits(format!("cpus {} is more than any node offers (at most {most_cpus})", demand.cpus)));
            }
        }
        let mut refusals = Vec::new();
        let mut fitting: Vec<(NodeRow, Held)> = Vec::new();
        for node in candidates {
            let held = self.held(&node.id).await?;
            match refuse(&node, held, demand) {
                Some(reason) => refusals.push(Refusal { node_id: node.id.clone(), reason }),
                None => fitting.push((node, held)),
            }
        }
        // Least loaded first for spread, most loaded first for binpack; ties
        // by free memory, then id, so the choice is deterministic.
        fitting.sort_by(|(a, ha), (b, hb)| {
            let by_load = ha.load(a).total_cmp(&hb.load(b));
            let by_load = if strategy == Strategy::Binpack { by_load.reverse() } else { by_load };
            by_load.then((b.capacity_memory - hb.memory).cmp(&(a.capacity_memory - ha.memory))).then(a.id.cmp(&b.id))
        });
        for (node, _) in fitting {
            if !reserve {
                return Ok(node.id);
            }
            self.lock_node(&node.id).await?;
            // Counted again under the lock: a placement that committed
            // meanwhile is seen now.
            let held = self.held(&node.id).await?;
            match refuse(&node, held, demand) {
                None => return Ok(node.id),
                Some(reason) => refusals.push(Refusal { node_id: node.id.clone(), reason }),
            }
        }
        refusals.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Err(PlacementError::NoCapacity(refusals))
    }

    /// Records a new container, `provisioning`, on `node_id`, holding the
    /// capacity `demand` reserves.
    pub async fn insert_placed_container(&mut self, id: &str, node_id: &str, profile_json: &str, demand: &Demand) -> Result<(), StoreError> {
        self.insert_container(id, node_id, profile_json).await?;
        let sql = "UPDATE containers SET reserved_memory = $2, reserved_cpus = $3 WHERE id = $1";
        with_tx!(self, |conn| sqlx::query(sql).bind(id).bind(demand.memory).bind(demand.cpus).execute(conn).await.map(|_| ()))?;
        Ok(())
    }
}

impl Store {
    /// Where `demand` would go now, without reserving anything (the API
    /// asks that node to check the plan before it writes a row).
    pub async fn preview_placement(&self, demand: &Demand, strategy: Strategy) -> Result<String, PlacementError> {
        let mut tx = self.begin().await?;
        let chosen = tx.choose_node(demand, strategy, false).await;
        tx.rollback().await?;
        chosen
    }
}
