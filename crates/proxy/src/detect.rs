//! Protocol detection: what the first bytes of a connection say it speaks, decided without
//! consuming them (the stream is then handed, whole, to the right server).

use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// What a connection's first bytes look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sniffed {
    /// A TLS record (a ClientHello).
    Tls,
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 connection preface (h2c with prior knowledge).
    H2,
    /// Anything else, or nothing within the timeout (server-first protocols): opaque TCP.
    Opaque,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

/// Classifies a prefix, or `None` if more bytes are needed to tell.
pub(crate) fn classify(prefix: &[u8]) -> Option<Sniffed> {
    let &first = prefix.first()?;
    if first == 0x16 {
        return Some(Sniffed::Tls);
    }
    let could_be = |pattern: &[u8]| {
        let n = prefix.len().min(pattern.len());
        prefix[..n] == pattern[..n]
    };
    if prefix.starts_with(H2_PREFACE) {
        return Some(Sniffed::H2);
    }
    if METHODS.iter().any(|m| prefix.starts_with(m)) {
        return Some(Sniffed::Http1);
    }
    if could_be(H2_PREFACE) || METHODS.iter().any(|m| could_be(m)) {
        return None;
    }
    Some(Sniffed::Opaque)
}

/// Peeks at `tcp` until its first bytes tell the protocol, for at most `timeout`. A peer that
/// says nothing in time (it waits for the server to speak first) is opaque TCP; a peer that
/// closes is reported as an error.
pub(crate) async fn sniff(tcp: &TcpStream, timeout: Duration) -> std::io::Result<Sniffed> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 32];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = match tokio::time::timeout(left, tcp.peek(&mut buf)).await {
            Ok(Ok(0)) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the peer closed before sending anything",
                ));
            }
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(Sniffed::Opaque),
        };
        if let Some(found) = classify(&buf[..n]) {
            return Ok(found);
        }
        if n == buf.len() || Instant::now() >= deadline {
            return Ok(Sniffed::Opaque);
        }
        // Undecided on a partial prefix: wait for more without spinning.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_tell_the_protocol() {
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Sniffed::Tls));
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Sniffed::Http1));
        assert_eq!(classify(b"DELETE /x"), Some(Sniffed::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Sniffed::H2));
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Some(Sniffed::Opaque));
        assert_eq!(classify(b"\x00\x01binary"), Some(Sniffed::Opaque));
        assert_eq!(classify(b"GETX"), Some(Sniffed::Opaque));
        // Too short to tell yet.
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"P"), None);
    }
}
