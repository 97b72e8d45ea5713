//! A fault-injecting TCP proxy: forwards a node's database connections, or, cut off, stops
//! forwarding in both directions **without closing anything** — as a network partition looks to
//! both ends. Healing lets the held bytes through again.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// One listening proxy in front of one upstream address.
pub struct FaultProxy {
    address: SocketAddr,
    forwarding: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy port");
        let address = listener.local_addr().expect("proxy address");
        let (forwarding, open) = watch::channel(true);
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let open = open.clone();
                connections.spawn(relay(client, upstream, open));
                while connections.try_join_next().is_some() {}
            }
        });
        FaultProxy {
            address,
            forwarding,
            task,
        }
    }

    #[must_use]
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Stops forwarding: connections stay open, bytes wait, new connections hang.
    pub fn cut(&self) {
        self.forwarding.send_replace(false);
    }

    /// Forwards again, held bytes first.
    pub fn heal(&self) {
        self.forwarding.send_replace(true);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Dropping the accept task drops its connections' JoinSet: every relay is aborted.
        self.task.abort();
    }
}

async fn relay(client: TcpStream, upstream: SocketAddr, mut open: watch::Receiver<bool>) {
    if open.wait_for(|open| *open).await.is_err() {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pump(client_read, server_write, open.clone()),
        pump(server_read, client_write, open)
    );
}

/// Copies one direction while the proxy forwards; a closed side closes the other.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut open: watch::Receiver<bool>) {
    let mut buffer = vec![0_u8; 64 * 1024];
    loop {
        if open.wait_for(|open| *open).await.is_err() {
            break;
        }
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        // Read before the cut, held until the heal.
        if open.wait_for(|open| *open).await.is_err() {
            break;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
