//! Time limits of an HTTPS connection between requests: a watchdog that closes a connection
//! whose client sends no request head in time, or that stays idle after its last response.
//!
//! Why not hyper's `header_read_timeout`: hyper starts that timer whenever it waits for a head,
//! keep-alive waits included, so it would also cap idle connections at the header limit; and
//! hyper-util's auto builder first reads the bytes that tell HTTP/1.1 from HTTP/2 with no timer
//! at all, so a client that sends nothing after the handshake was never closed. HTTP/2 has no
//! head timer either. The watchdog sees every byte read ([`Watched`]) and every request
//! ([`Clock::begin`]) and covers all three cases; a request in flight is never cut, so long
//! method calls and `/events` streams are untouched (body reads have their own limit, in
//! `api::extract::BodyBytes`).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::HttpsTimeouts;

/// "Not yet" in the millisecond fields of [`Clock`].
const NONE: u64 = u64::MAX;

/// What the watchdog knows about one connection, shared with its IO and its requests.
pub struct Clock {
    start: Instant,
    /// Milliseconds from `start` to the first byte read since the last response, or [`NONE`].
    head_started: AtomicU64,
    /// Milliseconds from `start` to the end of the last response, or [`NONE`] before the first.
    quiet_since: AtomicU64,
    in_flight: AtomicUsize,
    /// Woken when the last request in flight ends.
    quiet: Notify,
}

impl Clock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            head_started: AtomicU64::new(NONE),
            quiet_since: AtomicU64::new(NONE),
            in_flight: AtomicUsize::new(0),
            quiet: Notify::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    fn saw_read(&self) {
        // Bytes read while a request runs are its body, not the next head.
        if self.in_flight.load(Ordering::Acquire) == 0 {
            let _ = self.head_started.compare_exchange(
                NONE,
                self.now_ms(),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    /// Marks a request in flight until the returned guard (held by its response body) drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Returns when the connection has been without a request for longer than it may be.
    pub async fn expired(&self, limits: HttpsTimeouts) {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(NONE / 2);
        loop {
            if self.in_flight.load(Ordering::Acquire) > 0 {
                self.quiet.notified().await;
                continue;
            }
            let head = self.head_started.load(Ordering::Acquire);
            let quiet = self.quiet_since.load(Ordering::Acquire);
            let deadline_ms = if head != NONE {
                head.saturating_add(ms(limits.header))
            } else if quiet == NONE {
                // The first request: its head is due within the header limit of the handshake.
                ms(limits.header)
            } else {
                quiet.saturating_add(ms(limits.idle))
            };
            let deadline = self.start + Duration::from_millis(deadline_ms);
            if Instant::now() >= deadline {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                _ = self.quiet.notified() => {}
            }
        }
    }
}

/// One request in flight; dropping it ends the request for the watchdog.
pub struct InFlight(Arc<Clock>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let clock = &self.0;
        // Stored before the count drops, so a watchdog that sees no request sees these too.
        clock.head_started.store(NONE, Ordering::Release);
        clock.quiet_since.store(clock.now_ms(), Ordering::Release);
        if clock.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            clock.quiet.notify_one();
        }
    }
}

/// A response body that keeps its request in flight until it has been sent or dropped, so a
/// streamed response (`/events`) counts as activity however quiet it is.
pub fn track(body: Body, guard: InFlight) -> Body {
    Body::new(Tracked {
        inner: body,
        _guard: guard,
    })
}

struct Tracked {
    inner: Body,
    _guard: InFlight,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The connection's IO, reporting every read to the [`Clock`].
pub struct Watched<T> {
    inner: T,
    clock: Arc<Clock>,
}

impl<T> Watched<T> {
    pub fn new(inner: T, clock: Arc<Clock>) -> Self {
        Self { inner, clock }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.saw_read();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
