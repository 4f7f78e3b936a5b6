//! gRPC over unix sockets: the node reaches each supervisor this way, and in
//! `agentd up` the control plane reaches the node this way too.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

// tonic requires a URI; the connector below ignores it.
const PLACEHOLDER_URI: &str = "http://agentd.invalid";

fn endpoint() -> Endpoint {
    Endpoint::from_static(PLACEHOLDER_URI)
}

macro_rules! unix_connector {
    ($path:expr) => {{
        let path: PathBuf = $path.to_owned();
        tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        })
    }};
}

/// A channel that connects on first use and reconnects after failures, for
/// long-lived clients that must survive the peer restarting.
pub fn lazy_channel(path: &Path) -> Channel {
    endpoint().connect_with_connector_lazy(unix_connector!(path))
}

/// Connects now, so that a dead socket is reported at once.
pub async fn connect(path: &Path) -> Result<Channel, tonic::transport::Error> {
    endpoint().connect_with_connector(unix_connector!(path)).await
}
