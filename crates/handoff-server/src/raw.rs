//! DoGet below tonic's codec. tonic encodes every response message into a fresh buffer, copying
//! each body; here stored bodies go to the socket as they are, behind a few bytes of framing.
//! Every other method goes to the regular tonic service.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use arrow_flight::FlightData;
use arrow_flight::flight_service_server::FlightServiceServer;
use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use http_body_util::{BodyExt, Limited};
use prost::Message;
use tonic::body::Body;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::{Code, Status};
use tower::Service;

use crate::encode::grpc_frame;
use crate::service::HandoffService;

const DO_GET_PATH: &str = "/arrow.flight.protocol.FlightService/DoGet";
/// Tickets are small; anything larger than this is not one of ours.
const MAX_TICKET_REQUEST: usize = 1 << 20;

/// Routes DoGet to the zero-copy path and everything else to tonic.
#[derive(Clone)]
pub struct FlightRouter {
    grpc: FlightServiceServer<HandoffService>,
    service: HandoffService,
    zero_copy_get: bool,
}

impl FlightRouter {
    pub fn new(
        grpc: FlightServiceServer<HandoffService>,
        service: HandoffService,
        zero_copy_get: bool,
    ) -> Self {
        Self {
            grpc,
            service,
            zero_copy_get,
        }
    }
}

impl NamedService for FlightRouter {
    const NAME: &'static str = "arrow.flight.protocol.FlightService";
}

impl Service<http::Request<Body>> for FlightRouter {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if self.zero_copy_get && request.uri().path() == DO_GET_PATH {
            let service = self.service.clone();
            Box::pin(async move { Ok(do_get(service, request).await) })
        } else {
            let mut grpc = self.grpc.clone();
            Box::pin(async move { grpc.call(request).await })
        }
    }
}

async fn do_get(service: HandoffService, request: http::Request<Body>) -> http::Response<Body> {
    let (parts, body) = request.into_parts();
    let result = async {
        let bytes = Limited::new(body, MAX_TICKET_REQUEST)
            .collect()
            .await
            .map_err(|_| {
                Status::invalid_argument(
                    "DoGet request is too large or broken; a ticket is a few bytes",
                )
            })?
            .to_bytes();
        if bytes.len() < 5 {
            return Err(Status::invalid_argument("DoGet request carries no message"));
        }
        if bytes[0] != 0 {
            return Err(Status::unimplemented(
                "compressed DoGet requests are not supported; disable request compression",
            ));
        }
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        let payload = bytes
            .get(5..5 + len)
            .ok_or_else(|| Status::invalid_argument("DoGet request is truncated"))?;
        let ticket = arrow_flight::Ticket::decode(payload)
            .map_err(|e| Status::invalid_argument(format!("DoGet request is not a Ticket: {e}")))?;
        let metadata = MetadataMap::from_headers(parts.headers);
        service.ticket_stream(&metadata, &ticket.ticket)
    }
    .await;
    service.metrics.rpc(
        "do_get",
        result.as_ref().map_or_else(|s| s.code(), |_| Code::Ok),
    );
    match result {
        Err(status) => status.into_http(),
        Ok(stream) => {
            let mut response = http::Response::new(Body::new(FlightBody {
                inner: stream,
                pending: None,
                done: false,
            }));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            response
        }
    }
}

/// The response body: one prefix frame and one untouched body frame per message, then trailers.
struct FlightBody {
    inner: BoxStream<'static, Result<FlightData, Status>>,
    pending: Option<Bytes>,
    done: bool,
}

/// The trailers that end a gRPC response with `status`.
pub(crate) fn trailers(status: &Status) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if status.add_header(&mut headers).is_err() {
        headers.insert("grpc-status", HeaderValue::from_static("13"));
    }
    headers
}

impl http_body::Body for FlightBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(body) = self.pending.take() {
            return Poll::Ready(Some(Ok(Frame::data(body))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(data))) => {
                let (prefix, body) = grpc_frame(&data);
                if !body.is_empty() {
                    self.pending = Some(body);
                }
                Poll::Ready(Some(Ok(Frame::data(prefix))))
            }
            Poll::Ready(Some(Err(status))) => {
                self.done = true;
                Poll::Ready(Some(Ok(Frame::trailers(trailers(&status)))))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(Some(Ok(Frame::trailers(trailers(&Status::new(
                    Code::Ok,
                    "",
                ))))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending.is_none()
    }
}
