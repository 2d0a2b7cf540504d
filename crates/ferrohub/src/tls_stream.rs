//! A server-side TLS stream over rustls' unbuffered API whose buffers are ours, so an idle
//! connection holds none of them (the buffered `ServerConnection` keeps a 4 KiB receive buffer
//! for the connection's whole life).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One socket read. It goes to a stack buffer first so a connection waiting for data holds no
/// heap buffer; 4 KiB is what rustls' own reads use.
const READ_CHUNK: usize = 4096;

/// The most ciphertext kept while a message is incomplete: handshake messages may span records
/// up to 64 KiB (rustls' own limit), application records are at most about 16.6 KiB.
const MAX_INCOMING: usize = 0xffff + 2 * READ_CHUNK;

/// Plaintext encrypted per `poll_write` call; a caller's larger buffer is taken in steps so
/// one write cannot make the pending ciphertext grow without bound.
const MAX_ENCRYPT: usize = 64 * 1024;

/// Ciphertext pending past which `poll_write` first waits for the socket to take it.
const WRITE_HIGH_WATER: usize = 64 * 1024;

/// Room for the record headers, tags and padding of one record (TLS 1.2 AES-GCM needs 29
/// bytes, TLS 1.3 22); only a first guess, rustls reports the exact size when it is short.
const RECORD_OVERHEAD: usize = 64;
const MAX_FRAGMENT: usize = 16 * 1024;

/// Why a TLS stream could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsStreamError {
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

/// What the caller asked `process` to write once the connection is writable.
enum WriteOp<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

/// How far `process` got.
#[derive(Debug, PartialEq, Eq)]
enum Progress {
    /// Everything received is processed; more needs the socket.
    NeedData,
    /// The handshake is done (or far enough to send) and the write, if any, is queued.
    Writable,
    /// Both sides sent close_notify.
    Closed,
}

/// A TLS server stream: `AsyncRead` + `AsyncWrite` over an accepted socket.
pub struct UnbufferedTlsStream<IO> {
    io: IO,
    conn: UnbufferedServerConnection,
    /// Ciphertext received and not yet consumed by rustls; released when it empties.
    incoming: Vec<u8>,
    /// Ciphertext to send, from `out_pos`; released once sent.
    outgoing: Vec<u8>,
    out_pos: usize,
    /// Decrypted data the reader has not taken yet (from `plain_pos`); released once taken.
    plain: Vec<u8>,
    plain_pos: usize,
    /// The peer sent close_notify, or closed its socket between records.
    read_closed: bool,
    close_sent: bool,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> UnbufferedTlsStream<IO> {
    /// Runs the server handshake on `io`. The caller bounds it in time.
    pub async fn accept(config: Arc<ServerConfig>, io: IO) -> Result<Self, TlsStreamError> {
        let mut s = Self {
            io,
            conn: UnbufferedServerConnection::new(config)?,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            out_pos: 0,
            plain: Vec::new(),
            plain_pos: 0,
            read_closed: false,
            close_sent: false,
        };
        loop {
            if let Err(e) = s.process(None, WriteOp::Nothing) {
                // The alert rustls queued tells the client why; it gets one try to be sent.
                let _ = std::future::poll_fn(|cx| s.poll_write_out(cx)).await;
                return Err(e.into());
            }
            if !s.conn.is_handshaking() {
                // What is left (TLS 1.3 session tickets) needs no answer: the client may not
                // read it before it sends, so waiting for it could stall; the first read or
                // write sends it.
                let sent = std::future::poll_fn(|cx| match s.poll_write_out(cx) {
                    Poll::Pending => Poll::Ready(Ok(())),
                    done => done,
                });
                sent.await?;
                return Ok(s);
            }
            std::future::poll_fn(|cx| s.poll_write_out(cx)).await?;
            if std::future::poll_fn(|cx| s.poll_read_tls(cx)).await? == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
        }
    }

    /// The certificates the client presented, leaf first.
    pub fn peer_certificates(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    /// Bytes of buffer capacity this stream holds (not rustls' own state).
    #[cfg(test)]
    fn buffered_capacity(&self) -> usize {
        self.incoming.capacity() + self.outgoing.capacity() + self.plain.capacity()
    }

    /// Feeds rustls what has been received, until it needs more data or is ready to write;
    /// plaintext goes to `read` while it has room, then to `plain`; TLS records rustls wants
    /// sent go to `outgoing`, followed by `write`'s.
    fn process(
        &mut self,
        mut read: Option<&mut ReadBuf<'_>>,
        mut write: WriteOp<'_>,
    ) -> io::Result<Progress> {
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            let progress = match state {
                Err(e) => {
                    discard_front(&mut self.incoming, discard);
                    // Anything queued after the error is the alert explaining it.
                    self.encode_pending_alerts();
                    return Err(tls_error(e));
                }
                Ok(ConnectionState::ReadTraffic(mut records)) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(tls_error)?;
                        discard += record.discard;
                        let mut payload = record.payload;
                        if let Some(buf) = read.as_deref_mut() {
                            let n = payload.len().min(buf.remaining());
                            buf.put_slice(&payload[..n]);
                            payload = &payload[n..];
                        }
                        self.plain.extend_from_slice(payload);
                    }
                    None
                }
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    encode_with(&mut self.outgoing, 0, |out| {
                        encode.encode(out).map_err(|e| match e {
                            EncodeError::InsufficientSize(s) => Some(s),
                            EncodeError::AlreadyEncoded => None,
                        })
                    })?;
                    None
                }
                // The records stay in `outgoing`, which is sent in order before anything
                // encoded later; rustls only needs to know they are on their way.
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    None
                }
                Ok(ConnectionState::BlockedHandshake) => Some(Progress::NeedData),
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    match std::mem::replace(&mut write, WriteOp::Nothing) {
                        WriteOp::Nothing => {}
                        WriteOp::Data(data) => {
                            let guess =
                                data.len() + (data.len() / MAX_FRAGMENT + 1) * RECORD_OVERHEAD;
                            encode_with(&mut self.outgoing, guess, |out| {
                                traffic.encrypt(data, out).map_err(encrypt_short)
                            })?;
                        }
                        WriteOp::CloseNotify => {
                            encode_with(&mut self.outgoing, RECORD_OVERHEAD, |out| {
                                traffic.queue_close_notify(out).map_err(encrypt_short)
                            })?;
                        }
                    }
                    Some(Progress::Writable)
                }
                Ok(ConnectionState::PeerClosed) => {
                    self.read_closed = true;
                    None
                }
                Ok(ConnectionState::Closed) => {
                    self.read_closed = true;
                    Some(Progress::Closed)
                }
                Ok(ConnectionState::ReadEarlyData(_)) => {
                    // Early data is not enabled in the server config, so rustls never offers it.
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "TLS early data is not accepted",
                    ));
                }
                Ok(other) => {
                    return Err(io::Error::other(format!(
                        "unexpected TLS connection state {other:?}"
                    )));
                }
            };
            discard_front(&mut self.incoming, discard);
            if let Some(progress) = progress {
                if let WriteOp::Data(_) | WriteOp::CloseNotify = write {
                    if progress != Progress::Writable {
                        return Err(io::Error::new(
                            io::ErrorKind::NotConnected,
                            "TLS connection cannot send (handshake not done or closed)",
                        ));
                    }
                }
                return Ok(progress);
            }
        }
    }

    /// After an error rustls queues its alert; encoding it is best effort.
    fn encode_pending_alerts(&mut self) {
        for _ in 0..4 {
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
            match state {
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    let r = encode_with(&mut self.outgoing, 0, |out| {
                        encode.encode(out).map_err(|e| match e {
                            EncodeError::InsufficientSize(s) => Some(s),
                            EncodeError::AlreadyEncoded => None,
                        })
                    });
                    if r.is_err() {
                        return;
                    }
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
                _ => return,
            }
        }
    }

    /// Reads what the socket has into `incoming`; 0 is end of stream.
    fn poll_read_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.incoming.len() >= MAX_INCOMING {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS message too large",
            )));
        }
        let mut chunk = [0u8; READ_CHUNK];
        let mut buf = ReadBuf::new(&mut chunk);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        self.incoming.extend_from_slice(buf.filled());
        Poll::Ready(Ok(buf.filled().len()))
    }

    /// Sends everything in `outgoing`, then gives its memory back.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        self.outgoing = Vec::new();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }

    fn pending_out(&self) -> usize {
        self.outgoing.len() - self.out_pos
    }

    /// Moves buffered plaintext to `buf`; true if any was there.
    fn take_plain(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.plain_pos >= self.plain.len() {
            return false;
        }
        let n = (self.plain.len() - self.plain_pos).min(buf.remaining());
        buf.put_slice(&self.plain[self.plain_pos..self.plain_pos + n]);
        self.plain_pos += n;
        if self.plain_pos == self.plain.len() {
            self.plain = Vec::new();
            self.plain_pos = 0;
        }
        true
    }
}

/// Encodes into `out` past its current end with `f`, growing it to the size rustls asks for.
/// `f` returns `Err(None)` when there is nothing to encode after all.
fn encode_with(
    out: &mut Vec<u8>,
    guess: usize,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, Option<InsufficientSizeError>>,
) -> io::Result<()> {
    let start = out.len();
    out.resize(start + guess, 0);
    loop {
        match f(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(Some(short)) if short.required_size > out.len() - start => {
                out.resize(start + short.required_size, 0);
            }
            Err(_) => {
                out.truncate(start);
                return Err(io::Error::other("TLS record could not be encoded"));
            }
        }
    }
}

fn encrypt_short(e: EncryptError) -> Option<InsufficientSizeError> {
    match e {
        EncryptError::InsufficientSize(s) => Some(s),
        _ => None,
    }
}

fn discard_front(buf: &mut Vec<u8>, n: usize) {
    if n == 0 {
        return;
    }
    if n >= buf.len() {
        // Released, not cleared: an idle connection should hold no receive buffer.
        *buf = Vec::new();
    } else {
        buf.drain(..n);
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for UnbufferedTlsStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.take_plain(buf) || this.read_closed || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            this.process(Some(&mut *buf), WriteOp::Nothing)?;
            // Handshake-level replies (key updates, tickets, alerts) go out with no write to
            // carry them; if the socket is full they wait for the next write or flush.
            if this.pending_out() > 0 {
                if let Poll::Ready(Err(e)) = this.poll_write_out(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            if buf.filled().len() > before || this.read_closed {
                return Poll::Ready(Ok(()));
            }
            if ready!(this.poll_read_tls(cx))? == 0 {
                if !this.incoming.is_empty() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed the connection inside a TLS record",
                    )));
                }
                this.read_closed = true;
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for UnbufferedTlsStream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pending_out() >= WRITE_HIGH_WATER {
            ready!(this.poll_write_out(cx))?;
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = data.len().min(MAX_ENCRYPT);
        this.process(None, WriteOp::Data(&data[..n]))?;
        // Sent now if the socket takes it; otherwise flush or the next write waits for it.
        if let Poll::Ready(Err(e)) = this.poll_write_out(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            this.close_sent = true;
            this.process(None, WriteOp::CloseNotify)?;
        }
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::time::Duration;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{ClientConfig, SupportedProtocolVersion};
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_rustls::client::TlsStream as ClientTls;
    use tokio_rustls::TlsConnector;

    use super::*;

    type R<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

    /// Every wait on the other side of a test connection is bounded.
    async fn within<T>(f: impl Future<Output = T>) -> R<T> {
        Ok(tokio::time::timeout(Duration::from_secs(10), f).await?)
    }

    struct Pki {
        _dir: tempfile::TempDir,
        server: Arc<ServerConfig>,
        ca: std::path::PathBuf,
    }

    /// The server configuration the listeners use, over the development PKI.
    fn pki() -> R<Pki> {
        let dir = tempfile::tempdir()?;
        let files = crate::tls::ensure_dev_pki(dir.path(), &["localhost".to_string()])?;
        let server = crate::tls::server_config(&files).map_err(|e| e.to_string())?;
        let ca = files.ca.ok_or("the development PKI has a CA")?;
        Ok(Pki {
            _dir: dir,
            server,
            ca,
        })
    }

    fn client_config(
        pki: &Pki,
        versions: &[&'static SupportedProtocolVersion],
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> R<Arc<ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(&pki.ca)?;
        for c in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(c?)?;
        }
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(versions)?
                .with_root_certificates(roots);
        Ok(Arc::new(match identity {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
            None => builder.with_no_client_auth(),
        }))
    }

    /// A server stream and a tokio-rustls client over an in-memory pipe that carries at most
    /// `pipe` bytes per write, so small pipes split records across reads.
    async fn pair_with(
        pki: &Pki,
        client: Arc<ClientConfig>,
        pipe: usize,
    ) -> R<(UnbufferedTlsStream<DuplexStream>, ClientTls<DuplexStream>)> {
        let (a, b) = duplex(pipe);
        let server = UnbufferedTlsStream::accept(pki.server.clone(), a);
        let client = TlsConnector::from(client).connect(ServerName::try_from("localhost")?, b);
        let (server, client) = within(async { tokio::join!(server, client) }).await?;
        Ok((server?, client?))
    }

    async fn pair(
        pki: &Pki,
        versions: &[&'static SupportedProtocolVersion],
        pipe: usize,
    ) -> R<(UnbufferedTlsStream<DuplexStream>, ClientTls<DuplexStream>)> {
        pair_with(pki, client_config(pki, versions, None)?, pipe).await
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8).collect()
    }

    /// Reads once without waiting: `None` if the stream would block.
    fn read_now<S: AsyncRead + Unpin>(s: &mut S, buf: &mut [u8]) -> Option<io::Result<usize>> {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut rb = ReadBuf::new(buf);
        match Pin::new(s).poll_read(&mut cx, &mut rb) {
            Poll::Ready(Ok(())) => Some(Ok(rb.filled().len())),
            Poll::Ready(Err(e)) => Some(Err(e)),
            Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn data_flows_both_ways_over_tls13_and_tls12() -> R {
        let pki = pki()?;
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let (mut server, mut client) = pair(&pki, &[version], 64 * 1024).await?;
            assert_eq!(client.get_ref().1.protocol_version(), Some(version.version));
            client.write_all(b"hello").await?;
            client.flush().await?;
            let mut got = [0u8; 5];
            within(server.read_exact(&mut got)).await??;
            assert_eq!(&got, b"hello");
            server.write_all(b"world!").await?;
            server.flush().await?;
            let mut got = [0u8; 6];
            within(client.read_exact(&mut got)).await??;
            assert_eq!(&got, b"world!");
        }
        Ok(())
    }

    #[tokio::test]
    async fn records_split_across_many_reads_arrive_whole() -> R {
        let pki = pki()?;
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            // 1,000 bytes per write: the server's flight and every 16 KiB record arrive in
            // pieces. (Much smaller pipes stall tokio-rustls' client handshake itself, with
            // tokio-rustls' server too.)
            let (mut server, mut client) = pair(&pki, &[version], 1000).await?;
            let up = pattern(40_000);
            let down = pattern(33_333);
            let (a, b) = within(async {
                tokio::join!(
                    async {
                        client.write_all(&up).await?;
                        client.flush().await?;
                        let mut got = vec![0u8; down.len()];
                        client.read_exact(&mut got).await?;
                        Ok::<_, io::Error>(got)
                    },
                    async {
                        let mut got = vec![0u8; up.len()];
                        server.read_exact(&mut got).await?;
                        server.write_all(&down).await?;
                        server.flush().await?;
                        Ok::<_, io::Error>(got)
                    }
                )
            })
            .await?;
            assert!(a? == down, "server -> client data differs");
            assert!(b? == up, "client -> server data differs");
        }
        Ok(())
    }

    #[tokio::test]
    async fn large_writes_go_through_in_both_directions_at_once() -> R {
        let pki = pki()?;
        let (server, client) = pair(&pki, &[&rustls::version::TLS13], 16 * 1024).await?;
        let big = pattern(3 * 1024 * 1024 + 17);
        let (mut sr, mut sw) = tokio::io::split(server);
        let (mut cr, mut cw) = tokio::io::split(client);
        let (w1, w2, r1, r2) = within(async {
            tokio::join!(
                async {
                    sw.write_all(&big).await?;
                    sw.flush().await
                },
                async {
                    cw.write_all(&big).await?;
                    cw.flush().await
                },
                async {
                    let mut got = vec![0u8; big.len()];
                    sr.read_exact(&mut got).await.map(|_| got)
                },
                async {
                    let mut got = vec![0u8; big.len()];
                    cr.read_exact(&mut got).await.map(|_| got)
                }
            )
        })
        .await?;
        w1?;
        w2?;
        assert!(r1? == big, "client -> server data differs");
        assert!(r2? == big, "server -> client data differs");
        Ok(())
    }

    #[tokio::test]
    async fn a_partial_record_waits_for_its_rest_and_idle_holds_no_buffers() -> R {
        let pki = pki()?;
        let (mut server, client) = pair(&pki, &[&rustls::version::TLS13], 64 * 1024).await?;
        let mut buf = [0u8; 64];
        // Whatever the handshake left is consumed; then nothing is held while idle.
        assert!(read_now(&mut server, &mut buf).is_none());
        assert_eq!(server.buffered_capacity(), 0);

        let (mut io, mut conn) = client.into_inner();
        io::Write::write_all(&mut conn.writer(), b"split record")?;
        let mut record = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut record)?;
        }
        let (head, tail) = record.split_at(record.len() / 2);
        io.write_all(head).await?;
        assert!(
            read_now(&mut server, &mut buf).is_none(),
            "half a record is no data"
        );
        assert!(!server.incoming.is_empty(), "the half record is kept");
        io.write_all(tail).await?;
        let n = within(server.read(&mut buf)).await??;
        assert_eq!(&buf[..n], b"split record");
        assert!(read_now(&mut server, &mut buf).is_none());
        assert_eq!(server.buffered_capacity(), 0, "idle again: no buffers");
        Ok(())
    }

    #[tokio::test]
    async fn a_peer_closing_mid_record_is_an_error_not_an_end_of_stream() -> R {
        let pki = pki()?;
        let (mut server, client) = pair(&pki, &[&rustls::version::TLS13], 64 * 1024).await?;
        let (mut io, mut conn) = client.into_inner();
        io::Write::write_all(&mut conn.writer(), b"never complete")?;
        let mut record = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut record)?;
        }
        io.write_all(&record[..record.len() - 3]).await?;
        io.shutdown().await?;
        drop(io);
        let mut buf = [0u8; 64];
        let err = within(server.read(&mut buf))
            .await?
            .expect_err("a truncated record must not read as data or a clean end");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        Ok(())
    }

    #[tokio::test]
    async fn close_notify_is_sent_and_understood() -> R {
        let pki = pki()?;
        // The server closes: the client sees a clean end (tokio-rustls reports a close without
        // close_notify as an error).
        let (mut server, mut client) = pair(&pki, &[&rustls::version::TLS13], 64 * 1024).await?;
        server.write_all(b"bye").await?;
        within(server.shutdown()).await??;
        let mut got = Vec::new();
        within(client.read_to_end(&mut got)).await??;
        assert_eq!(got, b"bye");

        // The client closes: the server reads its last data, then the end.
        let (mut server, mut client) = pair(&pki, &[&rustls::version::TLS12], 64 * 1024).await?;
        client.write_all(b"last words").await?;
        within(client.shutdown()).await??;
        let mut got = Vec::new();
        within(server.read_to_end(&mut got)).await??;
        assert_eq!(got, b"last words");
        // Still able to answer after the peer's close_notify, then close too.
        server.write_all(b"ack").await?;
        within(server.shutdown()).await??;
        let mut got = Vec::new();
        within(client.read_to_end(&mut got)).await??;
        assert_eq!(got, b"ack");
        Ok(())
    }

    #[tokio::test]
    async fn client_certificates_are_available_after_the_handshake() -> R {
        let pki = pki()?;
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "device-1");
        let cert = params.self_signed(&key)?;
        let identity = || {
            (
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
        };
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let client = client_config(&pki, &[version], Some(identity()))?;
            let (server, _client) = pair_with(&pki, client, 64 * 1024).await?;
            let certs = server.peer_certificates().ok_or("no client certificate")?;
            assert_eq!(certs, std::slice::from_ref(cert.der()));
        }
        let (server, _client) = pair(&pki, &[&rustls::version::TLS13], 64 * 1024).await?;
        assert!(server.peer_certificates().is_none_or(|c| c.is_empty()));
        Ok(())
    }

    #[tokio::test]
    async fn a_client_that_is_not_tls_fails_the_handshake() -> R {
        let pki = pki()?;
        let (a, mut b) = duplex(64 * 1024);
        b.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        let r = within(UnbufferedTlsStream::accept(pki.server.clone(), a)).await?;
        assert!(matches!(
            r,
            Err(TlsStreamError::Tls(_)) | Err(TlsStreamError::Io(_))
        ));
        // And a client that hangs up mid-handshake.
        let (a, b) = duplex(64 * 1024);
        drop(b);
        let r = within(UnbufferedTlsStream::accept(pki.server.clone(), a)).await?;
        assert!(r.is_err());
        Ok(())
    }
}
