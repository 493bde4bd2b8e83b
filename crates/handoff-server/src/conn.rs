//! Connection hygiene: a cap on open connections per port, so that idle or slow clients cannot
//! use up the process's file descriptors (a few hundred idle connections could). A connection
//! past the cap is closed at once and logged; the ones already open are untouched.
//!
//! And timeouts: a connection that sends nothing within [`ConnTimeouts::first_byte`] of being
//! accepted is closed, on both ports. On the HTTP port (health and metrics: short requests) a
//! connection is also closed after [`ConnTimeouts::idle`] without a byte, or at
//! [`ConnTimeouts::lifetime`], which bounds a client that trickles its headers. On the gRPC port
//! HTTP/2 keepalive pings close peers that stop answering, and a connection that makes no call
//! for [`ConnTimeouts::no_calls`] is closed even if it answers them (clients reconnect on their
//! next call).

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
    timeouts: ConnTimeouts,
    /// When the connection is closed unless a byte arrives first; `None` once nothing applies.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The end of its lifetime, if it has one.
    ends: Option<tokio::time::Instant>,
    /// Calls in flight on it, counted by [`CountCalls`].
    calls: Arc<Calls>,
    /// When to look again whether it went `no_calls` without a call.
    quiet: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// How long a connection may stay silent, and live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnTimeouts {
    /// From accept to the first byte received.
    pub first_byte: Duration,
    /// Between bytes received, after the first; `None`: no limit.
    pub idle: Option<Duration>,
    /// From accept to close, whatever the traffic; `None`: no limit.
    pub lifetime: Option<Duration>,
    /// Without a call in flight (pings and other frames do not count), from accept or from the
    /// end of the last call; `None`: no limit.
    pub no_calls: Option<Duration>,
}

impl ConnTimeouts {
    /// The gRPC port: a client must begin within 10 s; after that, keepalive pings judge it.
    pub const GRPC: ConnTimeouts = ConnTimeouts {
        first_byte: Duration::from_secs(10),
        idle: None,
        lifetime: None,
        // Long past any pause of a Spark task or a training loop between calls.
        no_calls: Some(Duration::from_secs(15 * 60)),
    };
    /// The HTTP port: probes and scrapes are a request or two; a minute without a byte, or ten
    /// minutes in all, and the connection goes (clients reconnect).
    pub const HTTP: ConnTimeouts = ConnTimeouts {
        first_byte: Duration::from_secs(10),
        idle: Some(Duration::from_secs(60)),
        lifetime: Some(Duration::from_secs(600)),
        no_calls: None,
    };
}

impl<IO> Counted<IO> {
    fn new(io: IO, permit: OwnedSemaphorePermit, timeouts: ConnTimeouts) -> Self {
        let now = tokio::time::Instant::now();
        let ends = timeouts.lifetime.map(|l| now + l);
        let first = now + timeouts.first_byte;
        Self {
            io,
            _permit: permit,
            memory: ConnectionMemory::default(),
            timeouts,
            deadline: Some(Box::pin(tokio::time::sleep_until(
                ends.map_or(first, |e| e.min(first)),
            ))),
            ends,
            calls: Arc::new(Calls::new(now)),
            quiet: None,
        }
    }

    /// Whether the connection has gone `no_calls` without a call; arms the timer that asks
    /// again.
    fn quiet_too_long(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(limit) = self.timeouts.no_calls else {
            return false;
        };
        loop {
            let now = tokio::time::Instant::now();
            let due = self
                .calls
                .quiet_since()
                .map_or(now + limit, |since| since + limit);
            if due <= now {
                return true;
            }
            let sleep = self
                .quiet
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            if sleep.deadline() != due {
                sleep.as_mut().reset(due);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
        }
    }

    /// Bytes arrived: the next deadline is the idle limit or the lifetime, if either applies.
    fn received(&mut self) {
        let idle = self
            .timeouts
            .idle
            .map(|idle| tokio::time::Instant::now() + idle);
        let next = match (idle, self.ends) {
            (Some(i), Some(e)) => Some(i.min(e)),
            (one, other) => one.or(other),
        };
        match (next, self.deadline.as_mut()) {
            (None, _) => self.deadline = None,
            (Some(at), Some(sleep)) => sleep.as_mut().reset(at),
            (Some(at), None) => self.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }
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
        let this = &mut *self;
        // A lifetime ends even for a client that never stops sending.
        if this
            .ends
            .is_some_and(|ends| tokio::time::Instant::now() >= ends)
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the connection outlived its lifetime",
            )));
        }
        if this.quiet_too_long(cx) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the connection made no call for too long",
            )));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.received();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready());
                if !expired {
                    return Poll::Pending;
                }
                this.deadline = None;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the connection was silent past its timeout, or outlived its lifetime",
                )))
            }
            other => other,
        }
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

/// What a request knows of its connection.
#[derive(Clone)]
pub struct ConnectionInfo {
    pub memory: ConnectionMemory,
    calls: Arc<Calls>,
}

/// The connection a request came on, from tonic's ConnectInfo: plain, or under TLS wrapped in
/// its `TlsConnectInfo`.
pub fn connection_of(extensions: &http::Extensions) -> Option<&ConnectionInfo> {
    extensions.get::<ConnectionInfo>().or_else(|| {
        extensions
            .get::<tonic::transport::server::TlsConnectInfo<ConnectionInfo>>()
            .map(|tls| tls.get_ref())
    })
}

/// tonic puts this in every request's extensions; the peer's address is not used.
impl<IO: Connected> Connected for Counted<IO> {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        ConnectionInfo {
            memory: self.memory.clone(),
            calls: Arc::clone(&self.calls),
        }
    }
}

/// Calls in flight on one connection, and since when it has had none.
struct Calls(Mutex<CallState>);

struct CallState {
    active: u64,
    /// `None` while a call is in flight.
    quiet_since: Option<tokio::time::Instant>,
}

impl Calls {
    fn new(now: tokio::time::Instant) -> Self {
        Self(Mutex::new(CallState {
            active: 0,
            quiet_since: Some(now),
        }))
    }

    /// `None` while a call is in flight.
    fn quiet_since(&self) -> Option<tokio::time::Instant> {
        self.0.lock().quiet_since
    }

    fn begin(self: &Arc<Self>) -> CallGuard {
        let mut state = self.0.lock();
        state.active += 1;
        state.quiet_since = None;
        CallGuard(Arc::clone(self))
    }
}

/// One call in flight, until its response has been sent (or dropped).
struct CallGuard(Arc<Calls>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        let mut state = self.0.0.lock();
        state.active -= 1;
        if state.active == 0 {
            state.quiet_since = Some(tokio::time::Instant::now());
        }
    }
}

/// Counts each call on its connection from its request until its response body ends, for
/// [`ConnTimeouts::no_calls`].
#[derive(Clone)]
pub struct CountCalls<S> {
    inner: S,
}

impl<S> CountCalls<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for CountCalls<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for CountCalls<S>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
        >,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let guard = connection_of(request.extensions()).map(|c| c.calls.begin());
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            Ok(match guard {
                Some(guard) => response.map(|body| {
                    tonic::body::Body::new(CountedBody {
                        inner: body,
                        _guard: guard,
                    })
                }),
                None => response,
            })
        })
    }
}

/// A response body that holds its call's place until it is done.
struct CountedBody {
    inner: tonic::body::Body,
    _guard: CallGuard,
}

impl http_body::Body for CountedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Counts open connections against a cap, and says so (at most every 10 s) when it refuses.
#[derive(Clone)]
pub struct ConnectionCap {
    port: &'static str,
    limit: usize,
    timeouts: ConnTimeouts,
    permits: Arc<Semaphore>,
    refused: Arc<AtomicU64>,
    last_warning: Arc<Mutex<Option<Instant>>>,
}

impl ConnectionCap {
    pub fn new(port: &'static str, limit: usize, timeouts: ConnTimeouts) -> Self {
        Self {
            port,
            limit,
            timeouts,
            permits: Arc::new(Semaphore::new(limit)),
            refused: Arc::new(AtomicU64::new(0)),
            last_warning: Arc::new(Mutex::new(None)),
        }
    }

    /// The connection, counted, or `None` (and it is dropped, which closes it) at the cap.
    pub fn admit<IO>(&self, io: IO) -> Option<Counted<IO>> {
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => Some(Counted::new(io, permit, self.timeouts)),
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

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SHORT: ConnTimeouts = ConnTimeouts {
        first_byte: Duration::from_millis(100),
        idle: Some(Duration::from_millis(300)),
        lifetime: Some(Duration::from_millis(1000)),
        no_calls: None,
    };

    #[tokio::test(start_paused = true)]
    async fn bytes_without_calls_do_not_keep_a_connection_open() {
        let timeouts = ConnTimeouts {
            no_calls: Some(Duration::from_millis(500)),
            ..ConnTimeouts::GRPC
        };
        let cap = ConnectionCap::new("test", 4, timeouts);
        let (mut client, server) = tokio::io::duplex(64);
        let mut conn = cap.admit(server).expect("admitted");
        let calls = Arc::clone(&conn.calls);
        let mut buf = [0u8; 8];
        let start = tokio::time::Instant::now();
        // Pings every 100 ms, no call: closed 500 ms after accept.
        let err = loop {
            client.write_all(b"p").await.expect("write");
            match conn.read(&mut buf).await {
                Ok(n) => assert_eq!(n, 1),
                Err(e) => break e,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(
            start.elapsed() >= Duration::from_millis(500),
            "{:?}",
            start.elapsed()
        );

        // A call in flight keeps it open however long; its end starts the count again.
        let (mut client, server) = tokio::io::duplex(64);
        let mut conn = cap.admit(server).expect("admitted");
        let call = Arc::clone(&conn.calls).begin();
        drop(calls);
        client.write_all(b"x").await.expect("write");
        assert_eq!(conn.read(&mut buf).await.expect("read"), 1);
        let open = tokio::time::timeout(Duration::from_secs(3600), conn.read(&mut buf)).await;
        assert!(open.is_err(), "closed during a call: {open:?}");
        drop(call);
        let ended = tokio::time::Instant::now();
        let err = conn
            .read(&mut buf)
            .await
            .expect_err("closed after the call");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(ended.elapsed(), Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_after_its_first_byte_timeout() {
        let cap = ConnectionCap::new("test", 4, SHORT);
        let (_client, server) = tokio::io::duplex(64);
        let mut conn = cap.admit(server).expect("admitted");
        let mut buf = [0u8; 8];
        let err = conn.read(&mut buf).await.expect_err("timed out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_keep_a_connection_open_until_idle_or_its_lifetime() {
        let cap = ConnectionCap::new("test", 4, SHORT);
        let (mut client, server) = tokio::io::duplex(64);
        let mut conn = cap.admit(server).expect("admitted");
        let mut buf = [0u8; 8];
        // A byte every 200 ms: never idle for 300 ms, but the lifetime (1 s) still ends it.
        let start = tokio::time::Instant::now();
        let err = loop {
            client.write_all(b"x").await.expect("write");
            match conn.read(&mut buf).await {
                Ok(n) => assert_eq!(n, 1),
                Err(e) => break e,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let lived = start.elapsed();
        assert!(
            lived >= Duration::from_millis(1000) && lived < Duration::from_millis(1300),
            "{lived:?}"
        );

        // Silent for longer than `idle` after a byte: closed.
        let (mut client, server) = tokio::io::duplex(64);
        let mut conn = cap.admit(server).expect("admitted");
        client.write_all(b"x").await.expect("write");
        assert_eq!(conn.read(&mut buf).await.expect("read"), 1);
        let start = tokio::time::Instant::now();
        let err = conn.read(&mut buf).await.expect_err("idle");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn the_grpc_port_has_no_idle_limit_once_a_client_began() {
        // Silence alone does not close it; calls are what `no_calls` counts (below).
        let timeouts = ConnTimeouts {
            no_calls: None,
            ..ConnTimeouts::GRPC
        };
        let cap = ConnectionCap::new("test", 4, timeouts);
        let (mut client, server) = tokio::io::duplex(64);
        let mut conn = cap.admit(server).expect("admitted");
        let mut buf = [0u8; 8];
        client.write_all(b"x").await.expect("write");
        assert_eq!(conn.read(&mut buf).await.expect("read"), 1);
        let read = tokio::time::timeout(Duration::from_secs(3600), conn.read(&mut buf)).await;
        assert!(
            read.is_err(),
            "still open after an hour of silence: {read:?}"
        );
    }

    #[tokio::test]
    async fn the_cap_admits_up_to_its_limit_and_frees_on_close() {
        let cap = ConnectionCap::new("test", 2, ConnTimeouts::GRPC);
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
