//! Deadlines: nobody holds a proxy's connections, streams or app connections by being slow.
//!
//! - An HTTP/1.1 connection the proxy serves has two clocks ([`Timed`], driven by
//!   [`Clock`]): once a request head's first byte has arrived, the whole head must follow
//!   within `--header-read-timeout-secs` (slowloris); between requests, a keep-alive
//!   connection may stay idle for `--keepalive-timeout-secs`. hyper's own header timer
//!   cannot tell the two apart (it starts as soon as the connection waits), so it is off.
//! - A request body forwarded to the app or an upstream ([`ReqBody`]) must keep arriving:
//!   no stall longer than `--body-idle-timeout-secs`, done within `--body-timeout-secs`.
//!   When it fails, the stream or connection carrying it is reset, and the handler answers
//!   408 (or 400 when the body itself was bad) — [`BodyState::failure`] says which.
//! - The response head must come within `--response-timeout-secs` of the request's end
//!   ([`response_head`]), or the caller gets 504 and the stream is dropped.
//!
//! This module must never decide what is allowed, and must cost nothing for a request
//! without a body beyond a clock read: the body's shared state and its timer are made only
//! for bodies, and the timer only once a body stalls.

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

// ---------------------------------------------------------------------------------------
// HTTP/1.1 server connections: head and keep-alive clocks.

const IDLE: u8 = 0;
const HEAD: u8 = 1;
const BUSY: u8 = 2;
const OFF: u8 = 3;

/// Where an HTTP/1.1 server connection is, as its clocks see it: waiting for a request
/// (idle), reading a head, busy with a request, or handed over to an upgrade (no clock).
/// Shared by the connection's reader ([`Timed`]) and its request handling.
#[derive(Clone)]
pub(crate) struct Clock(Arc<Phase>);

struct Phase {
    now: AtomicU8,
    /// Requests begun: tells one idle spell from the next.
    requests: AtomicU32,
}

impl Clock {
    pub(crate) fn new() -> Clock {
        Clock(Arc::new(Phase {
            now: AtomicU8::new(IDLE),
            requests: AtomicU32::new(0),
        }))
    }

    /// A request head is complete and being served: no head or keep-alive clock runs.
    pub(crate) fn busy(&self) {
        self.0.requests.fetch_add(1, Ordering::Relaxed);
        self.0.now.store(BUSY, Ordering::Relaxed);
    }

    /// The connection now carries an upgraded protocol: its own limits apply.
    pub(crate) fn off(&self) {
        self.0.now.store(OFF, Ordering::Relaxed);
    }

    /// Marks the connection idle when dropped — given to the response's body, which hyper
    /// drops once it has written it.
    pub(crate) fn idle_when_done(&self) -> IdleWhenDone {
        IdleWhenDone(self.0.clone())
    }

    fn get(&self) -> (u8, u32) {
        (
            self.0.now.load(Ordering::Relaxed),
            self.0.requests.load(Ordering::Relaxed),
        )
    }
}

/// See [`Clock::idle_when_done`].
pub(crate) struct IdleWhenDone(Arc<Phase>);

impl Drop for IdleWhenDone {
    fn drop(&mut self) {
        // Only a busy connection goes idle; an upgraded one stays off. hyper reads again
        // when a connection goes idle (its header timer, set as a backstop, asks it to), and
        // that read starts the keep-alive clock.
        let _ = self
            .0
            .now
            .compare_exchange(BUSY, IDLE, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// Why [`Timed`] closed a connection; found in the error hyper returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Expired {
    #[error("the request head did not arrive in time")]
    Head,
    #[error("the connection was idle between requests for too long")]
    KeepAlive,
}

/// An HTTP/1.1 server connection's transport with its head and keep-alive deadlines: a
/// read that would wait past the deadline of the current phase fails with [`Expired`].
pub(crate) struct Timed<I> {
    io: I,
    clock: Clock,
    /// The phase (and request count) the timer is set for.
    armed: Option<(u8, u32)>,
    head: Duration,
    keepalive: Duration,
    /// Made once per connection and reset in place.
    timer: Pin<Box<Sleep>>,
}

impl<I> Timed<I> {
    pub(crate) fn new(io: I, clock: Clock, head: Duration, keepalive: Duration) -> Timed<I> {
        Timed {
            io,
            clock,
            armed: None,
            head,
            keepalive,
            timer: Box::pin(tokio::time::sleep(keepalive)),
        }
    }

    fn arm(&mut self, at: (u8, u32)) {
        let after = if at.0 == HEAD {
            self.head
        } else {
            self.keepalive
        };
        self.timer.as_mut().reset(Instant::now() + after);
        self.armed = Some(at);
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Timed<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let (phase, requests) = this.clock.get();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                // The first byte of a new request: its head must now follow in time.
                if phase == IDLE
                    && buf.filled().len() > before
                    && this
                        .clock
                        .0
                        .now
                        .compare_exchange(IDLE, HEAD, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    this.arm((HEAD, requests));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if phase == IDLE || phase == HEAD {
                    if this.armed != Some((phase, requests)) {
                        this.arm((phase, requests));
                    }
                    if this.timer.as_mut().poll(cx).is_ready() {
                        let why = if phase == HEAD {
                            Expired::Head
                        } else {
                            Expired::KeepAlive
                        };
                        return Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            why,
                        )));
                    }
                }
                Poll::Pending
            }
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Timed<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------------------
// Request bodies.

/// How long a request body may take.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Deadlines {
    /// Longest stall between two pieces of a request body.
    pub body_idle: Duration,
    /// Longest a whole request body may take to arrive.
    pub body_total: Duration,
}

/// Why a request body was not forwarded whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BodyFailure {
    /// It stalled longer than the idle deadline.
    Idle,
    /// It took longer than the total deadline.
    Total,
    /// The caller sent a body that is not valid HTTP (bad chunked encoding, more bytes
    /// than it declared). The caller's fault, not the upstream's.
    Malformed,
    /// The caller went away mid-body (closed, or reset its stream): nobody is left to
    /// answer, and nothing was refused.
    Abandoned,
}

const RUNNING: u8 = 0;
const FAILED_IDLE: u8 = 1;
const FAILED_TOTAL: u8 = 2;
const FAILED_MALFORMED: u8 = 3;
const FAILED_ABANDONED: u8 = 4;

/// What the handler can learn about a body it sent on: whether and why it failed, and when
/// it ended (for the response deadline).
#[derive(Clone)]
pub(crate) struct BodyState(Arc<Watch>);

struct Watch {
    failure: AtomicU8,
    /// When the body ended, in milliseconds after `since`; `u64::MAX` while it runs.
    ended_ms: AtomicU64,
    since: Instant,
}

impl BodyState {
    pub(crate) fn failure(&self) -> Option<BodyFailure> {
        match self.0.failure.load(Ordering::Relaxed) {
            FAILED_IDLE => Some(BodyFailure::Idle),
            FAILED_TOTAL => Some(BodyFailure::Total),
            FAILED_MALFORMED => Some(BodyFailure::Malformed),
            FAILED_ABANDONED => Some(BodyFailure::Abandoned),
            _ => None,
        }
    }

    fn fail(&self, why: u8) {
        let _ = self
            .0
            .failure
            .compare_exchange(RUNNING, why, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn end(&self) {
        let ms = self.0.since.elapsed().as_millis() as u64;
        let _ =
            self.0
                .ended_ms
                .compare_exchange(u64::MAX, ms, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// When the body ended, if it has.
    fn ended_at(&self) -> Option<Instant> {
        match self.0.ended_ms.load(Ordering::Relaxed) {
            u64::MAX => None,
            ms => Some(self.0.since + Duration::from_millis(ms)),
        }
    }
}

/// The error a body gives its reader (hyper, which then resets the stream or closes the
/// connection it was writing to) when a deadline passes.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("the request body stalled for longer than {0:?}")]
    Idle(Duration),
    #[error("the request body took longer than {0:?}")]
    Total(Duration),
    #[error("the request body could not be read from the caller: {0}")]
    Read(hyper::Error),
}

/// A request body on its way to the app or an upstream, under its deadlines.
pub(crate) struct ReqBody {
    /// `None`: no body at all (tests).
    inner: Option<Incoming>,
    watch: Option<Watched>,
}

struct Watched {
    state: BodyState,
    idle: Duration,
    deadline: Instant,
    /// Armed when the body stalls; made at the first stall only.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the timer is set for the current stall.
    stalled: bool,
}

impl ReqBody {
    /// Puts a request's body under the deadlines, as [`ReqBody::new`] does.
    pub(crate) fn of_request(
        req: http::Request<Incoming>,
        d: &Deadlines,
    ) -> (http::Request<ReqBody>, Option<BodyState>) {
        let (parts, body) = req.into_parts();
        let (body, watched) = ReqBody::new(body, d);
        (http::Request::from_parts(parts, body), watched)
    }

    /// Puts a body under the deadlines. A body already complete (a GET, or HTTP/2 HEADERS
    /// with END_STREAM) needs no watching and costs nothing; the returned state is `None`.
    pub(crate) fn new(inner: Incoming, d: &Deadlines) -> (ReqBody, Option<BodyState>) {
        if inner.is_end_stream() {
            let body = ReqBody {
                inner: Some(inner),
                watch: None,
            };
            return (body, None);
        }
        let now = Instant::now();
        let state = BodyState(Arc::new(Watch {
            failure: AtomicU8::new(RUNNING),
            ended_ms: AtomicU64::new(u64::MAX),
            since: now,
        }));
        let watch = Watched {
            state: state.clone(),
            idle: d.body_idle,
            deadline: now + d.body_total,
            timer: None,
            stalled: false,
        };
        (
            ReqBody {
                inner: Some(inner),
                watch: Some(watch),
            },
            Some(state),
        )
    }

    /// An empty body, for tests of the forwarding plumbing.
    #[cfg(test)]
    pub(crate) fn empty() -> ReqBody {
        ReqBody {
            inner: None,
            watch: None,
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut *inner).poll_frame(cx);
        let at_end = inner.is_end_stream();
        let Some(w) = this.watch.as_mut() else {
            return polled.map_err(BodyError::Read);
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                w.stalled = false;
                if Instant::now() >= w.deadline {
                    w.state.fail(FAILED_TOTAL);
                    return Poll::Ready(Some(Err(BodyError::Total(w.deadline - w.state.0.since))));
                }
                if at_end {
                    w.state.end();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                w.state.fail(if is_malformed(&e) {
                    FAILED_MALFORMED
                } else {
                    FAILED_ABANDONED
                });
                Poll::Ready(Some(Err(BodyError::Read(e))))
            }
            Poll::Ready(None) => {
                w.state.end();
                Poll::Ready(None)
            }
            Poll::Pending => {
                let now = Instant::now();
                if !w.stalled {
                    let at = (now + w.idle).min(w.deadline);
                    match w.timer.as_mut() {
                        Some(t) => t.as_mut().reset(at),
                        None => w.timer = Some(Box::pin(tokio::time::sleep_until(at))),
                    }
                    w.stalled = true;
                }
                let fired = w
                    .timer
                    .as_mut()
                    .is_some_and(|t| t.as_mut().poll(cx).is_ready());
                if !fired {
                    return Poll::Pending;
                }
                if now >= w.deadline || Instant::now() >= w.deadline {
                    w.state.fail(FAILED_TOTAL);
                    Poll::Ready(Some(Err(BodyError::Total(w.deadline - w.state.0.since))))
                } else {
                    w.state.fail(FAILED_IDLE);
                    Poll::Ready(Some(Err(BodyError::Idle(w.idle))))
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Incoming::size_hint)
    }
}

/// Whether reading a body failed because the caller sent invalid bytes (hyper's decoder
/// says `InvalidData`/`InvalidInput`), rather than because it went away.
fn is_malformed(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
            );
        }
        source = s.source();
    }
    false
}

// ---------------------------------------------------------------------------------------
// Response heads.

/// No response head in time.
#[derive(Debug)]
pub(crate) struct ResponseTimeout;

/// Waits for `send` (a request's response head) for at most `timeout` after the request
/// ended: at once for a request without a body, else from the moment its body ended. While
/// a body is still arriving the body's own deadlines apply instead.
pub(crate) async fn response_head<F, T>(
    send: F,
    body: Option<&BodyState>,
    timeout: Duration,
) -> Result<T, ResponseTimeout>
where
    F: Future<Output = T>,
{
    let send = std::pin::pin!(send);
    let Some(body) = body else {
        return tokio::time::timeout(timeout, send)
            .await
            .map_err(|_| ResponseTimeout);
    };
    let mut send = send;
    let timer = tokio::time::sleep(timeout);
    let mut timer = std::pin::pin!(timer);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = send.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        loop {
            ready!(timer.as_mut().poll(cx));
            // The timer fired: it counts only from the body's end.
            match body.ended_at() {
                Some(ended) if Instant::now() >= ended + timeout => {
                    return Poll::Ready(Err(ResponseTimeout));
                }
                Some(ended) => timer.as_mut().reset(ended + timeout),
                None => timer.as_mut().reset(Instant::now() + timeout),
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn the_head_clock_starts_at_the_first_byte_not_while_idle() {
        let (client, server) = tokio::io::duplex(1024);
        let clock = Clock::new();
        let mut timed = Timed::new(
            server,
            clock.clone(),
            Duration::from_secs(10),
            Duration::from_secs(300),
        );
        let (client_read, mut client_write) = tokio::io::split(client);
        let mut buf = [0u8; 64];
        // Idle for a minute: far past the head timeout, within keep-alive.
        let read = tokio::time::timeout(Duration::from_secs(60), timed.read(&mut buf)).await;
        assert!(
            read.is_err(),
            "an idle connection must not be cut by the head timeout"
        );
        // A head starts and stalls: cut 10 s after its first byte.
        client_write.write_all(b"GET / HT").await.unwrap();
        assert_eq!(timed.read(&mut buf).await.unwrap(), 8);
        let started = Instant::now();
        let err = timed.read(&mut buf).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        let why = err.get_ref().unwrap().downcast_ref::<Expired>();
        assert_eq!(why, Some(&Expired::Head));
        drop(client_read);
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_idles_out_and_busy_or_upgraded_never_does() {
        let (_client, server) = tokio::io::duplex(1024);
        let clock = Clock::new();
        let mut timed = Timed::new(
            server,
            clock.clone(),
            Duration::from_secs(10),
            Duration::from_secs(300),
        );
        let mut buf = [0u8; 8];
        clock.busy();
        let guard = clock.idle_when_done();
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), timed.read(&mut buf))
                .await
                .is_err(),
            "no clock while a request is served"
        );
        drop(guard);
        let started = Instant::now();
        let err = timed.read(&mut buf).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(300));
        let why = err.get_ref().unwrap().downcast_ref::<Expired>();
        assert_eq!(why, Some(&Expired::KeepAlive));
        // An upgraded connection stays off, even when its 101's body is dropped.
        clock.busy();
        let guard = clock.idle_when_done();
        clock.off();
        drop(guard);
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), timed.read(&mut buf))
                .await
                .is_err()
        );
    }

    /// A real HTTP/1.1 body that never finishes: the server side of a connection whose
    /// client declared 100 bytes and sends them as `chunks`, one every `gap`.
    async fn trickled_body(chunks: usize, gap: Duration) -> Incoming {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = std::sync::Mutex::new(Some(tx));
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                if let Some(tx) = tx.lock().unwrap().take() {
                    let _ = tx.send(req.into_body());
                }
                async {
                    // Never answers: the test reads the body.
                    std::future::pending::<()>().await;
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<
                        Bytes,
                    >::new(
                    )))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(server), svc)
                .await;
        });
        tokio::spawn(async move {
            let mut client = client;
            client
                .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
                .await
                .unwrap();
            for _ in 0..chunks {
                client.write_all(b"x").await.unwrap();
                tokio::time::sleep(gap).await;
            }
            let mut rest = Vec::new();
            let _ = client.read_to_end(&mut rest).await;
        });
        rx.await.unwrap()
    }

    async fn drain(mut body: ReqBody) -> Result<usize, BodyError> {
        use http_body_util::BodyExt;
        let mut n = 0;
        while let Some(frame) = body.frame().await {
            n += frame?.into_data().map_or(0, |d| d.len());
        }
        Ok(n)
    }

    const D: Deadlines = Deadlines {
        body_idle: Duration::from_secs(5),
        body_total: Duration::from_secs(30),
    };

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_fails_at_its_idle_deadline() {
        let (body, state) = ReqBody::new(trickled_body(3, Duration::from_secs(1)).await, &D);
        let state = state.unwrap();
        let started = Instant::now();
        let err = drain(body).await.unwrap_err();
        assert!(matches!(err, BodyError::Idle(_)), "{err}");
        // Three bytes a second apart, then 5 s of silence.
        assert!(
            started.elapsed() >= Duration::from_secs(7),
            "{:?}",
            started.elapsed()
        );
        assert!(
            started.elapsed() <= Duration::from_secs(8),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(state.failure(), Some(BodyFailure::Idle));
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_body_fails_at_its_total_deadline() {
        // A byte every 4 s never trips the 5 s idle deadline, but 100 bytes take 400 s.
        let (body, state) = ReqBody::new(trickled_body(100, Duration::from_secs(4)).await, &D);
        let started = Instant::now();
        let err = drain(body).await.unwrap_err();
        assert!(matches!(err, BodyError::Total(_)), "{err}");
        assert!(
            started.elapsed() <= Duration::from_secs(31),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(state.unwrap().failure(), Some(BodyFailure::Total));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_in_time_passes_whole_and_ends() {
        let (body, state) = ReqBody::new(trickled_body(100, Duration::from_millis(100)).await, &D);
        assert_eq!(drain(body).await.unwrap(), 100);
        let state = state.unwrap();
        assert_eq!(state.failure(), None);
        assert!(state.ended_at().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn the_response_deadline_counts_from_the_end_of_the_body() {
        let never = std::future::pending::<()>;
        // Without a body: from now.
        let started = Instant::now();
        assert!(
            response_head(never(), None, Duration::from_secs(60))
                .await
                .is_err()
        );
        assert_eq!(started.elapsed(), Duration::from_secs(60));
        // With a body that ends 100 s in (within its own deadlines): 60 s after that.
        let (body, state) = ReqBody::new(
            trickled_body(100, Duration::from_secs(1)).await,
            &Deadlines {
                body_total: Duration::from_secs(500),
                ..D
            },
        );
        tokio::spawn(drain(body));
        let started = Instant::now();
        assert!(
            response_head(never(), state.as_ref(), Duration::from_secs(60))
                .await
                .is_err()
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(159) && waited <= Duration::from_secs(161),
            "{waited:?}"
        );
        // An answer in time is passed on.
        assert_eq!(
            response_head(async { 7 }, None, Duration::from_secs(1))
                .await
                .unwrap(),
            7
        );
    }
}

#[cfg(test)]
mod served {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// hyper serving over [`Timed`], its service marking requests as the proxy's do.
    async fn serve(io: tokio::io::DuplexStream) {
        let clock = Clock::new();
        let conn_clock = clock.clone();
        let svc = hyper::service::service_fn(move |_req: http::Request<Incoming>| {
            let clock = conn_clock.clone();
            async move {
                clock.busy();
                let mut resp = http::Response::new(crate::http::Body::own(Bytes::from("ok")));
                resp.body_mut().set_idle_when_done(clock.idle_when_done());
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        let io = Timed::new(io, clock, Duration::from_secs(1), Duration::from_secs(3));
        let _ = crate::http::server(&crate::config::Limits::default())
            .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
            .await;
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_outlives_the_head_timeout_under_hyper() {
        let (mut client, server) = tokio::io::duplex(4096);
        let served = tokio::spawn(serve(server));
        let mut buf = vec![0u8; 4096];
        for _ in 0..2 {
            client
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let n = client.read(&mut buf).await.unwrap();
            assert!(
                buf[..n].starts_with(b"HTTP/1.1 200"),
                "{:?}",
                String::from_utf8_lossy(&buf[..n])
            );
            // Longer than the head timeout, shorter than keep-alive.
            tokio::time::sleep(Duration::from_millis(2500)).await;
        }
        let started = Instant::now();
        assert_eq!(
            client.read(&mut buf).await.unwrap(),
            0,
            "closed after keep-alive"
        );
        let waited = started.elapsed();
        assert_eq!(waited, Duration::from_millis(500), "3 s after the response");
        served.await.unwrap();
    }
}
