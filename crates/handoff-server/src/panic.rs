//! A bug costs one call, not the process: a panic while handling a call, or while producing its
//! response stream, becomes INTERNAL for that call, is logged and counted, and the server goes
//! on. Without this a panic ends hyper's task for the stream and the client sees a reset with no
//! reason. (Stack overflows and allocation failures abort regardless; the request limits keep
//! those out of reach.)

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use http_body::Frame;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use tower::Service;

use crate::metrics::Metrics;

/// Wraps a gRPC service so that panics in it answer INTERNAL.
#[derive(Clone)]
pub struct CatchPanic<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> CatchPanic<S> {
    pub fn new(inner: S, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }
}

impl<S: NamedService> NamedService for CatchPanic<S> {
    const NAME: &'static str = S::NAME;
}

fn describe(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

fn bug(metrics: &Metrics, path: &str, payload: &(dyn Any + Send)) -> Status {
    metrics.panics.inc();
    let what = describe(payload);
    tracing::error!(call = %path, panic = %what, "a call hit a server bug; answered INTERNAL");
    Status::internal(format!(
        "the server hit a bug while handling {path} and answered this call only; the server goes on. Please report it with the server's log"
    ))
}

impl<S> Service<http::Request<Body>> for CatchPanic<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // A Uri clone shares its bytes: no allocation per call for the rare panic message.
        let uri = request.uri().clone();
        let metrics = Arc::clone(&self.metrics);
        // A panic in `call` itself (before any future exists) is caught as well.
        let future = std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(request)));
        Box::pin(async move {
            let future = match future {
                Ok(future) => future,
                Err(payload) => return Ok(bug(&metrics, uri.path(), payload.as_ref()).into_http()),
            };
            match AssertUnwindSafe(future).catch_unwind().await {
                Ok(Ok(response)) => Ok(response.map(|body| {
                    Body::new(CatchBody {
                        inner: Some(body),
                        uri,
                        metrics,
                    })
                })),
                Ok(Err(e)) => Err(e),
                Err(payload) => Ok(bug(&metrics, uri.path(), payload.as_ref()).into_http()),
            }
        })
    }
}

/// A response body that ends with INTERNAL trailers if producing it panics.
struct CatchBody {
    inner: Option<Body>,
    uri: http::Uri,
    metrics: Arc<Metrics>,
}

impl http_body::Body for CatchBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(inner).poll_frame(cx))) {
            Ok(frame) => frame,
            Err(payload) => {
                // The inner body is in an unknown state: never poll it again.
                self.inner = None;
                let status = bug(&self.metrics, self.uri.path(), payload.as_ref());
                Poll::Ready(Some(Ok(Frame::trailers(crate::raw::trailers(&status)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.as_ref().map_or_else(
            || http_body::SizeHint::with_exact(0),
            http_body::Body::size_hint,
        )
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use futures::{StreamExt, stream};
    use http_body_util::{BodyExt, StreamBody};

    use http::HeaderMap;

    use super::*;

    fn request() -> http::Request<Body> {
        http::Request::builder()
            .uri("/arrow.flight.protocol.FlightService/DoAction")
            .body(Body::empty())
            .expect("request")
    }

    fn grpc_status(headers: &HeaderMap) -> Option<&str> {
        headers.get("grpc-status").and_then(|v| v.to_str().ok())
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_internal_and_the_service_goes_on() {
        let metrics = Arc::new(Metrics::default());
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        let inner = tower::service_fn(move |_: http::Request<Body>| {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                assert!(n > 0, "the first call hits a bug");
                Ok::<_, Infallible>(http::Response::new(Body::empty()))
            }
        });
        let mut service = CatchPanic::new(inner, Arc::clone(&metrics));
        let response = service.call(request()).await.expect("answered");
        assert_eq!(grpc_status(response.headers()), Some("13"));
        let message = response.headers()["grpc-message"].to_str().expect("ascii");
        assert!(message.contains("DoAction"), "{message}");
        assert_eq!(metrics.panics.get(), 1);
        let response = service.call(request()).await.expect("answered");
        assert_eq!(grpc_status(response.headers()), None, "the next call works");
    }

    #[tokio::test]
    async fn a_panic_mid_stream_ends_the_stream_with_internal() {
        let metrics = Arc::new(Metrics::default());
        let inner = tower::service_fn(|_: http::Request<Body>| async {
            let frames = stream::iter(0..3).map(|i| {
                assert!(i < 2, "the third message hits a bug");
                Ok::<_, Status>(Frame::data(Bytes::from_static(b"x")))
            });
            Ok::<_, Infallible>(http::Response::new(Body::new(StreamBody::new(frames))))
        });
        let mut service = CatchPanic::new(inner, Arc::clone(&metrics));
        let mut body = service.call(request()).await.expect("answered").into_body();
        let mut data = 0;
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("frame");
            if frame.is_data() {
                data += 1;
            } else {
                trailers = frame.into_trailers().ok();
            }
        }
        assert_eq!(data, 2);
        assert_eq!(grpc_status(&trailers.expect("trailers")), Some("13"));
        assert_eq!(metrics.panics.get(), 1);
    }
}
