//! What the activator asks of its TCP sockets: keepalive probes and a user timeout, so a peer
//! that vanished without a FIN (a pod's node gone, a client's network dropped) is noticed in about
//! a minute rather than hours; and a send timeout on client connections, so a client that stops
//! reading cannot hold a pod's slot for as long as it likes.
//!
//! Listeners bind as upstream's do: `[::]` takes both address families.
//!
//! Owns socket options and the timing of writes; knows nothing of HTTP.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use std::net::SocketAddr;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

/// Idle time before the first keepalive probe, then the gap between probes and how many may go
/// unanswered: a silent dead peer is dropped after about 30 + 3 × 10 s.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 3;
/// How long sent data may go unacknowledged before the kernel gives up on the peer.
const USER_TIMEOUT: Duration = Duration::from_secs(60);

/// Connections waiting to be accepted, as tokio's and Go's listeners ask of the kernel.
const LISTEN_BACKLOG: i32 = 1024;

/// A listener on `addr`. The unspecified IPv6 address (`[::]`) takes IPv4 clients too, as Go's
/// `:port` does for upstream on a dual-stack node; where the kernel has no IPv6 at all, `[::]`
/// falls back to `0.0.0.0` with a log line, so one default serves IPv4-only, IPv6-only and
/// dual-stack clusters.
pub(crate) fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let dual_stack = matches!(addr, SocketAddr::V6(v6) if v6.ip().is_unspecified());
    match bind(addr, dual_stack) {
        Err(e) if dual_stack && e.raw_os_error() == Some(nix::libc::EAFNOSUPPORT) => {
            let v4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, addr.port()));
            tracing::info!(%addr, fallback = %v4, "this node has no IPv6; listening on IPv4 only");
            bind(v4, false)
        }
        bound => bound,
    }
}

fn bind(addr: SocketAddr, dual_stack: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if dual_stack {
        socket.set_only_v6(false)?;
    }
    // As tokio's `TcpListener::bind`: a restarted activator rebinds while old connections linger.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// A peer's address as a person reads it: an IPv4 client of a dual-stack listener arrives as
/// `::ffff:a.b.c.d`, which `X-Forwarded-For`, logs and pods should see as `a.b.c.d`.
pub(crate) fn canonical(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

/// Sets keepalive and the user timeout on a connected socket. Failures are logged, not fatal:
/// the connection still works, it only notices a vanished peer later.
pub(crate) fn keep_alive(stream: &TcpStream) {
    let socket = SockRef::from(stream);
    let keepalive =
        TcpKeepalive::new().with_time(KEEPALIVE_IDLE).with_interval(KEEPALIVE_INTERVAL).with_retries(KEEPALIVE_PROBES);
    if let Err(e) = socket.set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "cannot set TCP keepalive");
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = socket.set_tcp_user_timeout(Some(USER_TIMEOUT)) {
        tracing::debug!(error = %e, "cannot set TCP_USER_TIMEOUT");
    }
}

/// A client connection whose writes fail with `TimedOut` once the peer has accepted no byte for
/// `limit` (nginx's `send_timeout`). Reads are untouched: waiting for a client to speak is bounded
/// by the HTTP layer.
pub(crate) struct SendTimeout<T> {
    inner: T,
    limit: Duration,
    /// Armed while a write is blocked; kept between stalls so a slow client costs one timer.
    stalled: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl<T> SendTimeout<T> {
    pub(crate) fn new(inner: T, limit: Duration) -> Self {
        SendTimeout { inner, limit, stalled: None, armed: false }
    }

    /// A write made progress (or failed on its own): the clock stops.
    fn progressed<R>(&mut self, result: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if result.is_ready() {
            self.armed = false;
        }
        result
    }

    /// A write is blocked: start the clock if it is not running, and fail once it runs out.
    fn blocked<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let deadline = Instant::now() + self.limit;
        let timer = match &mut self.stalled {
            Some(timer) => {
                if !self.armed {
                    timer.as_mut().reset(deadline);
                }
                timer
            }
            None => self.stalled.insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.armed = true;
        ready!(timer.as_mut().poll(cx));
        self.armed = false;
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client accepted no data within the send timeout")))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SendTimeout<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SendTimeout<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.blocked(cx),
            done => self.progressed(done),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.blocked(cx),
            done => self.progressed(done),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.blocked(cx),
            done => self.progressed(done),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connected pair over loopback: the server's side, then the client's.
    pub(crate) async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (server, client)
    }

    /// Upstream listens on `:8012`, which Go binds as both families; `[::]` does the same here.
    #[tokio::test]
    async fn the_unspecified_ipv6_address_takes_both_families() {
        let listener = listen("[::]:0".parse().unwrap()).unwrap();
        let port = listener.local_addr().unwrap().port();
        for client in ["127.0.0.1", "::1"] {
            let ip: std::net::IpAddr = client.parse().unwrap();
            let _stream = TcpStream::connect((ip, port)).await.unwrap();
            let (_, peer) = listener.accept().await.unwrap();
            assert_eq!(canonical(peer).ip(), ip, "{client} is seen as itself");
        }
    }

    #[tokio::test]
    async fn keepalive_and_user_timeout_are_set() {
        let (server, _client) = pair().await;
        keep_alive(&server);
        let socket = SockRef::from(&server);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        #[cfg(target_os = "linux")]
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
    }

    #[tokio::test]
    async fn a_peer_that_stops_reading_fails_the_write_after_the_limit() {
        let (server, _client) = pair().await;
        let mut guarded = SendTimeout::new(server, Duration::from_millis(200));
        let chunk = vec![7u8; 64 * 1024];
        let started = std::time::Instant::now();
        let error = loop {
            if let Err(e) = guarded.write_all(&chunk).await {
                break e;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "the write never stalled");
        };
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);

        // A reader that keeps up, however slowly within the limit, never trips it.
        let (server, client) = pair().await;
        let mut guarded = SendTimeout::new(server, Duration::from_millis(300));
        let reader = tokio::spawn(async move {
            let mut client = client;
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0;
            while total < 8 << 20 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                total += client.read(&mut buf).await.unwrap();
            }
        });
        for _ in 0..128 {
            guarded.write_all(&chunk).await.expect("a reading peer is never timed out");
        }
        reader.await.unwrap();
    }
}
