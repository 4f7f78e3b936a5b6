//! The gateway of an `agentd sandbox run --network egress` sandbox: served
//! on a thread of its own (a current-thread tokio runtime) while the
//! command runs; its denials go to stderr, its counters too at the end.

use agentd_egress::{Denial, Gateway, Protocol};
use anyhow::anyhow;

/// The serving gateway; dropping it stops the thread, which removes the
/// link and the rules before this returns.
pub struct RunGateway {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn describe(d: &Denial) -> String {
    let what = match d.protocol {
        Protocol::Dns => format!("name {}", d.destination),
        Protocol::Tcp => format!("tcp {}:{}", d.destination, d.port),
        Protocol::Udp => format!("udp {}:{}", d.destination, d.port),
    };
    let name = if d.name.is_empty() { String::new() } else { format!(" (TLS name {})", d.name) };
    let missing = if d.missing_rule.is_empty() { String::new() } else { format!("; missing rule: {}", d.missing_rule) };
    let suppressed = if d.suppressed > 0 { format!(" (+{} not reported)", d.suppressed) } else { String::new() };
    format!("agentd sandbox: egress denied: {what}{name}: {}{missing}{suppressed}", d.reason)
}

pub fn serve(gateway: Gateway) -> anyhow::Result<RunGateway> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new().name("egress".into()).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(r) => r,
            Err(e) => {
                let _ = ready_tx.send(Err(e.to_string()));
                return;
            }
        };
        runtime.block_on(async move {
            match gateway.serve(|d| eprintln!("{}", describe(&d))) {
                Ok(serving) => {
                    let _ = ready_tx.send(Ok(()));
                    let _ = stopped.await;
                    let u = serving.usage();
                    if std::env::var_os("AGENTD_EGRESS_USAGE").is_some() {
                        eprintln!(
                            "agentd sandbox: egress usage: connections allowed {} denied {}, bytes out {} in {}, names allowed {} denied {}, datagrams denied {}",
                            u.connections_allowed, u.connections_denied, u.bytes_out, u.bytes_in, u.names_allowed, u.names_denied, u.datagrams_denied
                        );
                    }
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        });
    })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(RunGateway { stop: Some(stop), thread: Some(thread) }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(anyhow!("egress gateway: {e}"))
        }
        Err(_) => {
            let _ = thread.join();
            Err(anyhow!("egress gateway: its thread ended"))
        }
    }
}

impl Drop for RunGateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
