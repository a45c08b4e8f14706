//! Connecting to a host daemon's gRPC API over its Unix socket.
//!
//! tonic speaks HTTP/2 over any stream; a Unix socket needs a custom connector (the URI given to the endpoint
//! is a placeholder the connector ignores). Used by the CLI, the end-to-end tests and, later, other hosts'
//! tooling.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::host::MAX_IO;
use crate::proto::shale_client::ShaleClient;

/// Why the daemon could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach shale daemon at {}: is `shale serve` running? ({reason})", .socket.display())]
pub struct ConnectError {
    /// The socket tried.
    pub socket: PathBuf,
    /// What failed.
    pub reason: String,
}

/// Connect to the daemon listening on `socket`.
pub async fn connect(socket: &Path) -> Result<ShaleClient<Channel>, ConnectError> {
    let channel = channel(socket).await?;
    let limit = MAX_IO as usize + (1 << 20);
    Ok(ShaleClient::new(channel)
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit))
}

/// An HTTP/2 channel to the daemon on `socket`, for the other services it serves on the same socket (e.g.
/// `ShaleVm`).
pub async fn channel(socket: &Path) -> Result<Channel, ConnectError> {
    let err = |reason: String| ConnectError {
        socket: socket.to_path_buf(),
        reason,
    };
    // Fail fast with a clear reason (missing socket, refused) before handing over to the lazy HTTP/2 channel.
    UnixStream::connect(socket)
        .await
        .map_err(|e| err(short_io(&e)))?;
    let path = socket.to_path_buf();
    let channel = Endpoint::from_static("http://shale.sock")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|e| err(e.to_string()))?;
    Ok(channel)
}

fn short_io(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}
