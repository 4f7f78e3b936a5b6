//! `agentd join-token create`: a single-use token for a node to join the
//! fleet with, made against the store directly (as `kubeadm token create`
//! does). The token is printed once, as the last line; the store keeps only
//! its hash.

use anyhow::Context;

use crate::cli::{JoinTokenArgs, JoinTokenCommand};

pub fn run(command: JoinTokenCommand) -> anyhow::Result<()> {
    match command {
        JoinTokenCommand::Create(args) => create(args),
    }
}

fn create(args: JoinTokenArgs) -> anyhow::Result<()> {
    super::runtime()?.block_on(async {
        let location = match args.database_url.as_deref().filter(|u| !u.is_empty()) {
            Some(url) => url.to_string(),
            None => args.common.state_dir.join("agentd.db").display().to_string(),
        };
        let store = agentd_controlplane::store::Store::open(&location).await.context("cannot open the store")?;
        let (token, row) = agentd_controlplane::fleet::ca::create_join_token(&store, args.ttl, &args.description)
            .await
            .context("cannot make a join token")?;
        store.close().await;
        eprintln!("join token {} valid for {:?}, single use; join a node with:", row.id, args.ttl);
        eprintln!("  agentd node --join http://CONTROL_PLANE:PORT --join-token TOKEN --advertise HOST:PORT --grpc-listen ADDR:PORT");
        println!("{token}");
        Ok(())
    })
}
