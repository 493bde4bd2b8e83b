//! Every request message is reserved from the server's memory budget when its 5-byte gRPC
//! prefix arrives, before tonic buffers its body. A frame that could never fit is refused at
//! once with the numbers; under `wait` the sender stalls (HTTP/2 flow control holds it) until
//! memory is freed; under `spill` finished partitions move out first.
//!
//! The reservation is handed over, not doubled: a handler that decodes a message takes its share
//! from the request's [`IncomingCredit`] and gives it to the store, whose frame keeps it. The
//! message is counted from its prefix until the frame it became is freed, even while its writer
//! waits for memory.
//!
//! A connection that writes also holds its HTTP/2 receive window from the budget, from its first
//! DoPut message until it closes: HTTP/2 accepts that much data for a connection before any
//! handler reads it, and a writer stalled under `wait` leaves it there. Readers' connections
//! receive only small requests and hold nothing.
//!
//! Hand-written framing: tonic decodes only whole messages, and the length is all we need, so
//! the prefix is read in place from the body's chunks, without copying them.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::future::BoxFuture;
use handoff_store::{IncomingMemory, Reservation};
use http_body::Frame;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use tower::Service;

use crate::conn::ConnectionMemory;
use crate::error::status_of;

const DO_PUT_PATH: &str = "/arrow.flight.protocol.FlightService/DoPut";

/// Wraps a gRPC service so that its request bodies reserve their messages.
#[derive(Clone)]
pub struct ReserveIncoming<S> {
    inner: S,
    memory: Option<IncomingMemory>,
    window: u64,
}

impl<S> ReserveIncoming<S> {
    /// `memory`: `None` (no limit) passes bodies through untouched. `window`: the HTTP/2
    /// connection window, held by each connection that writes.
    pub fn new(inner: S, memory: Option<IncomingMemory>, window: u32) -> Self {
        Self {
            inner,
            memory,
            window: u64::from(window),
        }
    }
}

impl<S: NamedService> NamedService for ReserveIncoming<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for ReserveIncoming<S>
where
    S: Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        match &self.memory {
            Some(memory) => {
                let credit = IncomingCredit::default();
                request.extensions_mut().insert(credit.clone());
                let connection = (request.uri().path() == DO_PUT_PATH)
                    .then(|| {
                        crate::conn::connection_of(request.extensions()).map(|c| c.memory.clone())
                    })
                    .flatten()
                    .map(|c| (c, self.window));
                let body = ReservingBody::new(memory.clone(), credit, connection);
                self.inner
                    .call(request.map(|inner| Body::new(body.wrap(inner))))
            }
            None => self.inner.call(request),
        }
    }
}

/// What one request's messages hold reserved while they are on their way in, one reservation
/// per message in arrival order. A handler takes it from the request's extensions and
/// [takes](IncomingCredit::take_next) one as it decodes each message; what is left goes
/// with the request.
#[derive(Clone, Default)]
pub struct IncomingCredit(Arc<parking_lot::Mutex<VecDeque<Reservation>>>);

impl IncomingCredit {
    fn add(&self, reservation: Reservation) {
        self.0.lock().push_back(reservation);
    }

    /// The reservation of the oldest message not yet decoded, for the handler to hand on to
    /// what it keeps of the message (or to drop).
    pub fn take_next(&self) -> Option<Reservation> {
        self.0.lock().pop_front()
    }
}

/// Where the parser is in the gRPC framing: `[compressed: u8][length: u32 BE][message]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Prefix { have: [u8; 5], filled: usize },
    Message { left: u64 },
}

impl Default for Framing {
    fn default() -> Self {
        Framing::Prefix {
            have: [0; 5],
            filled: 0,
        }
    }
}

impl Framing {
    /// Walk one chunk; adds the declared lengths of the messages whose prefix completed in it.
    fn feed(&mut self, mut data: &[u8], declared: &mut Vec<u64>) {
        while !data.is_empty() {
            match self {
                Framing::Prefix { have, filled } => {
                    let take = (5 - *filled).min(data.len());
                    have[*filled..*filled + take].copy_from_slice(&data[..take]);
                    *filled += take;
                    data = &data[take..];
                    if *filled == 5 {
                        let length = u32::from_be_bytes([have[1], have[2], have[3], have[4]]);
                        declared.push(u64::from(length));
                        *self = if length == 0 {
                            Framing::default()
                        } else {
                            Framing::Message {
                                left: u64::from(length),
                            }
                        };
                    }
                }
                Framing::Message { left } => {
                    let take = (*left).min(data.len() as u64);
                    data = &data[take as usize..];
                    *left -= take;
                    if *left == 0 {
                        *self = Framing::default();
                    }
                }
            }
        }
    }
}

type Reserving = BoxFuture<'static, Result<Reservation, Status>>;

/// A request body that holds a reservation for the messages it is carrying.
struct ReservingBody {
    inner: Body,
    memory: IncomingMemory,
    /// A writing request's connection, and its window: reserved before the first message.
    connection: Option<(ConnectionMemory, u64)>,
    framing: Framing,
    /// The chunk that declared new messages, held back until their memory is reserved, with
    /// the messages' lengths.
    pending: Option<(Reserving, Frame<Bytes>, Vec<u64>)>,
    credit: IncomingCredit,
}

impl ReservingBody {
    fn new(
        memory: IncomingMemory,
        credit: IncomingCredit,
        connection: Option<(ConnectionMemory, u64)>,
    ) -> Self {
        Self {
            inner: Body::empty(),
            memory,
            connection,
            framing: Framing::default(),
            pending: None,
            credit,
        }
    }

    fn wrap(mut self, inner: Body) -> Self {
        self.inner = inner;
        self
    }
}

/// Reserve the connection's window (once per connection), then `declared` bytes of messages.
async fn reserve(
    memory: IncomingMemory,
    connection: Option<(ConnectionMemory, u64)>,
    declared: u64,
) -> Result<Reservation, Status> {
    if let Some((held, window)) = connection {
        held.get_or_reserve(memory.reserve(window))
            .await
            .map_err(|e| {
                let status = status_of(e);
                Status::new(
                    status.code(),
                    format!(
                        "a connection that writes holds its HTTP/2 window ({window} bytes) of the server's memory, and it is not free: {}",
                        status.message()
                    ),
                )
            })?;
    }
    memory.reserve(declared).await.map_err(status_of)
}

impl http_body::Body for ReservingBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        loop {
            if let Some((reserving, _, _)) = this.pending.as_mut() {
                let reserved = ready!(reserving.as_mut().poll(cx));
                let Some((_, frame, lengths)) = this.pending.take() else {
                    return Poll::Ready(None);
                };
                return Poll::Ready(Some(match reserved {
                    Ok(mut reservation) => {
                        for length in lengths {
                            this.credit.add(reservation.split(length));
                        }
                        Ok(frame)
                    }
                    Err(status) => Err(status),
                }));
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let mut lengths = Vec::new();
                    if let Some(data) = frame.data_ref() {
                        this.framing.feed(data, &mut lengths);
                    }
                    if lengths.is_empty() {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    let declared = lengths.iter().fold(0u64, |sum, l| sum.saturating_add(*l));
                    this.pending = Some((
                        Box::pin(reserve(
                            this.memory.clone(),
                            this.connection.clone(),
                            declared,
                        )),
                        frame,
                        lengths,
                    ));
                }
                other => return Poll::Ready(other),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: u32) -> Vec<u8> {
        let mut out = vec![0u8];
        out.extend_from_slice(&len.to_be_bytes());
        out.extend(std::iter::repeat_n(7u8, len as usize));
        out
    }

    #[test]
    fn lengths_are_read_across_any_chunking() {
        let stream: Vec<u8> = [message(10), message(0), message(300), message(1)].concat();
        for chunk in 1..stream.len() {
            let mut framing = Framing::default();
            let mut declared = Vec::new();
            for c in stream.chunks(chunk) {
                framing.feed(c, &mut declared);
            }
            assert_eq!(declared, [10, 0, 300, 1], "chunks of {chunk}");
            assert_eq!(framing, Framing::default(), "ends between messages");
        }
        // The largest length a prefix can declare is counted, not trusted to arrive.
        let mut framing = Framing::default();
        let mut declared = Vec::new();
        framing.feed(&[0, 0xff, 0xff, 0xff, 0xff], &mut declared);
        assert_eq!(declared, [u64::from(u32::MAX)]);
    }
}
