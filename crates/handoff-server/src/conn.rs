//! Connection hygiene: a cap on open connections per port, so that idle or slow clients cannot
//! use up the process's file descriptors (a few hundred idle connections could). A connection
//! past the cap is closed at once and logged; the ones already open are untouched.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::Connected;

/// One accepted connection; its permit returns to the cap when it closes.
pub struct Counted<IO> {
    io: IO,
    _permit: OwnedSemaphorePermit,
    memory: ConnectionMemory,
}

/// What one connection holds of the memory budget: once it writes, its HTTP/2 receive window,
/// which the HTTP/2 layer fills with data before any handler reads it (see `inflight`). Its
/// requests see it in their extensions; it is released when the connection and they are gone.
#[derive(Clone, Default)]
pub struct ConnectionMemory(Arc<tokio::sync::OnceCell<handoff_store::Reservation>>);

impl ConnectionMemory {
    /// The reservation, made by `reserve` on the first call; later calls share it.
    pub async fn get_or_reserve<F>(&self, reserve: F) -> Result<(), handoff_store::StoreError>
    where
        F: std::future::Future<
                Output = Result<handoff_store::Reservation, handoff_store::StoreError>,
            >,
    {
        self.0.get_or_try_init(|| reserve).await.map(|_| ())
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// tonic puts this in every request's extensions; the peer's address is not used.
impl<IO: Connected> Connected for Counted<IO> {
    type ConnectInfo = ConnectionMemory;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.memory.clone()
    }
}

/// Counts open connections against a cap, and says so (at most every 10 s) when it refuses.
#[derive(Clone)]
pub struct ConnectionCap {
    port: &'static str,
    limit: usize,
    permits: Arc<Semaphore>,
    refused: Arc<AtomicU64>,
    last_warning: Arc<Mutex<Option<Instant>>>,
}

impl ConnectionCap {
    pub fn new(port: &'static str, limit: usize) -> Self {
        Self {
            port,
            limit,
            permits: Arc::new(Semaphore::new(limit)),
            refused: Arc::new(AtomicU64::new(0)),
            last_warning: Arc::new(Mutex::new(None)),
        }
    }

    /// The connection, counted, or `None` (and it is dropped, which closes it) at the cap.
    pub fn admit<IO>(&self, io: IO) -> Option<Counted<IO>> {
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => Some(Counted {
                io,
                _permit: permit,
                memory: ConnectionMemory::default(),
            }),
            Err(_) => {
                let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
                let mut last = self.last_warning.lock();
                if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                    *last = Some(Instant::now());
                    tracing::warn!(
                        port = self.port,
                        limit = self.limit,
                        refused,
                        "connection limit reached; closing new connections until some close (raise --max-connections if these clients are expected)"
                    );
                }
                None
            }
        }
    }

    /// Connections refused at the cap so far.
    #[cfg(test)]
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Every connection of `incoming`, counted; those past the cap are closed.
    pub fn limit<S, IO>(
        &self,
        incoming: S,
    ) -> impl Stream<Item = io::Result<Counted<IO>>> + use<S, IO>
    where
        S: Stream<Item = io::Result<IO>>,
    {
        let cap = self.clone();
        incoming.filter_map(move |accepted| {
            let admitted = match accepted {
                Ok(io) => cap.admit(io).map(Ok),
                Err(e) => Some(Err(e)),
            };
            futures::future::ready(admitted)
        })
    }
}

/// The HTTP port's listener, counted by the same rule.
pub struct CappedListener {
    inner: tokio::net::TcpListener,
    cap: ConnectionCap,
}

impl CappedListener {
    pub fn new(inner: tokio::net::TcpListener, cap: ConnectionCap) -> Self {
        Self { inner, cap }
    }
}

impl axum::serve::Listener for CappedListener {
    type Io = Counted<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    if let Some(counted) = self.cap.admit(stream) {
                        return (counted, addr);
                    }
                }
                // As axum's own listener does: errors of one accept (EMFILE, a reset) are
                // passing; pause briefly so a full fd table does not spin the loop.
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_admits_up_to_its_limit_and_frees_on_close() {
        let cap = ConnectionCap::new("test", 2);
        let a = cap.admit(()).expect("first");
        let _b = cap.admit(()).expect("second");
        assert!(cap.admit(()).is_none(), "third is past the cap");
        assert_eq!(cap.refused(), 1);
        drop(a);
        assert!(
            cap.admit(()).is_some(),
            "a closed connection frees its place"
        );
    }
}
