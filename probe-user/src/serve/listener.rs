//! The API's listener: HTTP/1.1 only, over TLS when configured, with limits a
//! client cannot stretch. HTTP/1.1 because it holds one request per
//! connection at a time, so `max_connections` bounds the requests in flight
//! (HTTP/2 multiplexes hundreds of streams on one connection, each a token
//! check or a buffered body), and because the API and the console are a
//! handful of people's tools: nothing needs HTTP/2's speed.
//!
//! Each connection has one deadline, `request_timeout` after it was
//! accepted, for its TLS handshake, its first request's headers and its
//! first request's body together. Later requests on a kept-alive connection
//! each get `request_timeout` from the moment the previous one was answered
//! to send their headers (so an idle connection is closed), and again for
//! their body; an answer the client does not read for as long is given up
//! with its connection. Bodies being read are counted in bytes against one budget
//! for all connections: past it, a body is refused (503) instead of
//! buffered.
use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{Router, body::Bytes, extract::ConnectInfo};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::warn;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::{Notify, OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};
use tokio_rustls::TlsAcceptor;

/// A header block larger than this is refused (431): a request names an
/// authority and carries a token, nothing more.
const MAX_HEADER_BYTES: usize = 64 << 10;

/// What the listener enforces.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub request_timeout: Duration,
    /// Bytes of request bodies held at once, over all connections.
    pub body_bytes_in_flight: usize,
}

/// Why a request's body was not read whole.
#[derive(Debug, thiserror::Error)]
pub enum BodyRefused {
    #[error("the request body did not arrive within the request timeout")]
    TooSlow,
    #[error("too many request bodies are arriving at once: try again shortly")]
    Busy,
}

/// Serves `app` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, app: Router, limits: Limits) {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let budget = Arc::new(Semaphore::new(limits.body_bytes_in_flight));
    loop {
        let (tcp, client) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors, most likely: wait instead of spinning.
                warn!("accepting an API connection: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over the limit: closed at once, no handshake, no task kept.
        let Ok(permit) = connections.clone().try_acquire_owned() else { continue };
        let (tls, app, budget) = (tls.clone(), app.clone(), budget.clone());
        tokio::spawn(async move {
            let _permit = permit;
            connection(tcp, client, tls, app, budget, limits).await;
        });
    }
}

async fn connection(
    tcp: TcpStream,
    client: SocketAddr,
    tls: Option<TlsAcceptor>,
    app: Router,
    budget: Arc<Semaphore>,
    limits: Limits,
) {
    let deadline = Instant::now() + limits.request_timeout;
    let tcp = Unread { stream: tcp, limit: limits.request_timeout, stalled: None };
    match tls {
        Some(tls) => {
            if let Ok(Ok(stream)) = tokio::time::timeout_at(deadline, tls.accept(tcp)).await {
                http(stream, client, deadline, app, budget, limits).await;
            }
        }
        None => http(tcp, client, deadline, app, budget, limits).await,
    }
}

/// Serves one connection's requests; the first must have arrived whole by
/// `deadline`.
async fn http<S>(stream: S, client: SocketAddr, deadline: Instant, app: Router, budget: Arc<Semaphore>, limits: Limits)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let first_headers = Arc::new(Notify::new());
    let requests = Arc::new(AtomicU64::new(0));
    let notify = first_headers.clone();
    let service = service_fn(move |request: hyper::Request<Incoming>| {
        let first = requests.fetch_add(1, Ordering::Relaxed) == 0;
        if first {
            notify.notify_one();
        }
        let body_deadline = if first { deadline } else { Instant::now() + limits.request_timeout };
        let held: Arc<Mutex<Option<OwnedSemaphorePermit>>> = Arc::default();
        let mut request = request.map(|inner| Bounded {
            inner,
            deadline: Box::pin(tokio::time::sleep_until(body_deadline)),
            budget: budget.clone(),
            held: held.clone(),
        });
        request.extensions_mut().insert(ConnectInfo(client));
        let mut app = app.clone();
        async move {
            let response = tower_service::Service::call(&mut app, request).await;
            // The body's bytes count until the request is answered.
            held.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
            response
        }
    });
    let mut builder = http1::Builder::new();
    // The header timeout runs from when the connection waits for a request:
    // at its start, and after each answer (so it is the idle timeout too).
    builder.timer(TokioTimer::new()).header_read_timeout(limits.request_timeout).max_buf_size(MAX_HEADER_BYTES);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = &mut connection => return,
        () = first_headers.notified() => {}
        // Dropping the connection closes it.
        () = tokio::time::sleep_until(deadline) => return,
    }
    let _ = connection.await;
}

/// A connection whose answers must be read: a write that cannot go on for
/// the request timeout (a client that pipelines requests and reads none of
/// the answers) fails, and the connection closes.
struct Unread<S> {
    stream: S,
    limit: Duration,
    /// Since when writes have been waiting.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> Unread<S> {
    /// `attempt`'s outcome, or an error once writes have waited `limit`.
    fn watch<T>(&mut self, cx: &mut Context<'_>, attempt: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if attempt.is_ready() {
            self.stalled = None;
            return attempt;
        }
        let limit = self.limit;
        let stalled = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => {
                Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the client reads no answers")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Unread<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Unread<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let attempt = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.watch(cx, attempt)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let attempt = Pin::new(&mut self.stream).poll_flush(cx);
        self.watch(cx, attempt)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let attempt = Pin::new(&mut self.stream).poll_shutdown(cx);
        self.watch(cx, attempt)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let attempt = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.watch(cx, attempt)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// A request body read within its deadline and the shared byte budget.
struct Bounded {
    inner: Incoming,
    deadline: Pin<Box<Sleep>>,
    budget: Arc<Semaphore>,
    /// The budget this request holds, given back when it is answered.
    held: Arc<Mutex<Option<OwnedSemaphorePermit>>>,
}

impl HttpBody for Bounded {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let taken = u32::try_from(data.len())
                        .ok()
                        .and_then(|bytes| this.budget.clone().try_acquire_many_owned(bytes).ok());
                    let Some(taken) = taken else { return Poll::Ready(Some(Err(BodyRefused::Busy.into()))) };
                    let mut held = this.held.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    match held.as_mut() {
                        Some(held) => held.merge(taken),
                        None => *held = Some(taken),
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(BodyRefused::TooSlow.into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why reading a body failed, if it was one of the listener's limits.
pub fn body_refusal<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a BodyRefused> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(refused) = error.downcast_ref::<BodyRefused>() {
            return Some(refused);
        }
        current = error.source();
    }
    None
}
