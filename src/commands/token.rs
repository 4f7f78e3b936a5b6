//! `agentd token create|ls|revoke`: the API's bearer tokens, made against
//! the store directly (as `join-token`), for operators on a control plane's
//! host. The same exists over the API (`/v1/tokens`, admin scope).

use anyhow::{Context, anyhow};

use crate::cli::{StoreArgs, TokenCommand};

async fn open(store: &StoreArgs) -> anyhow::Result<agentd_controlplane::store::Store> {
    let location = match store.database_url.as_deref().filter(|u| !u.is_empty()) {
        Some(url) => url.to_string(),
        None => store.common.state_dir.join("agentd.db").display().to_string(),
    };
    agentd_controlplane::store::Store::open(&location).await.context("cannot open the store")
}

pub fn run(command: TokenCommand) -> anyhow::Result<()> {
    super::runtime()?.block_on(async {
        match command {
            TokenCommand::Create { store, scope, ttl, name } => {
                let scope: agentd_controlplane::auth::Scope = scope.parse().map_err(|e: String| anyhow!(e))?;
                let store = open(&store).await?;
                let ttl_ms = ttl.map(|t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX / 4));
                let (token, row) = agentd_controlplane::auth::create(&store, scope, &name, ttl_ms).await?;
                store.close().await;
                eprintln!("token {} with scope {}; shown once:", row.id, row.scope);
                println!("{token}");
            }
            TokenCommand::Ls { store } => {
                let store = open(&store).await?;
                let tokens = store.list_tokens().await?;
                store.close().await;
                println!("{:<18} {:<6} {:<14} {:<14} {:<8} NAME", "ID", "SCOPE", "CREATED", "EXPIRES", "REVOKED");
                let time = |ms: Option<i64>| ms.map_or("-".to_string(), |ms| (ms / 1000).to_string());
                for t in tokens {
                    let revoked = if t.revoked_at.is_some() { "yes" } else { "no" };
                    println!("{:<18} {:<6} {:<14} {:<14} {:<8} {}", t.id, t.scope, t.created_at / 1000, time(t.expires_at), revoked, t.name);
                }
            }
            TokenCommand::Revoke { store, id } => {
                let store = open(&store).await?;
                let found = store.revoke_token(&id).await?;
                store.close().await;
                anyhow::ensure!(found, "no token {id}");
                eprintln!("token {id} revoked");
            }
        }
        Ok(())
    })
}
