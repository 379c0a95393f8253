//! Rewrites the `:authority` of every request a Workload API client sends to `localhost`,
//! below HTTP/2, before h2 parses it.
//!
//! grpc-core (and so py-spiffe, grpc-java on some versions, grpc-swift) sends the socket's
//! path, percent-encoded, as `:authority` on a Unix socket; h2 refuses that as a malformed
//! authority and resets the stream (PROTOCOL_ERROR) before any service could see it. A Unix
//! socket has no authority to check, so this relay decodes each header block of the client's
//! side with the client's HPACK state, replaces `:authority`, and re-encodes the block with
//! literals only (never the dynamic table), so h2's decoder needs no state of ours. Every
//! other frame, and the whole server side, passes through untouched.
//!
//! Bounded: a frame over [`MAX_FRAME`] bytes, a header block over [`MAX_BLOCK`] bytes
//! (encoded or decoded), or anything that does not decode ends the connection; malformed
//! input is an error, never a panic that escapes.

use std::borrow::Cow;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The largest frame accepted from a client (h2's own limit is smaller unless raised).
pub(crate) const MAX_FRAME: usize = 1 << 20;
/// The largest header block, encoded or decoded.
pub(crate) const MAX_BLOCK: usize = 64 * 1024;
/// Frames this relay writes: the HTTP/2 default maximum frame size.
const OUT_FRAME: usize = 16_384;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// HTTP/2's default SETTINGS_HEADER_TABLE_SIZE, which the server does not raise.
const TABLE_SIZE: usize = 4096;

/// Why the client's bytes cannot be carried on.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Malformed {
    #[error("not the HTTP/2 connection preface")]
    Preface,
    #[error("a frame of {0} bytes is over the limit")]
    FrameTooLarge(usize),
    #[error("a header block is over the limit")]
    BlockTooLarge,
    #[error("a header block does not decode")]
    Hpack,
    #[error("a HEADERS frame's padding or priority does not fit in it")]
    Padding,
    #[error("a CONTINUATION frame is not where one was expected")]
    Continuation,
}

/// The client-to-server half of one connection.
pub(crate) struct Rewriter {
    input: Vec<u8>,
    preface_seen: bool,
    decoder: fluke_hpack::Decoder<'static>,
    /// A header block waiting for its CONTINUATION frames: stream, END_STREAM, fragment.
    pending: Option<(u32, bool, Vec<u8>)>,
}

impl Default for Rewriter {
    fn default() -> Rewriter {
        let mut decoder = fluke_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Rewriter {
            input: Vec::new(),
            preface_seen: false,
            decoder,
            pending: None,
        }
    }
}

impl Rewriter {
    /// Takes bytes from the client and appends what the server should read to `out`.
    pub(crate) fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), Malformed> {
        self.input.extend_from_slice(bytes);
        let mut at = 0;
        if !self.preface_seen {
            let n = self.input.len().min(PREFACE.len());
            if self.input[..n] != PREFACE[..n] {
                return Err(Malformed::Preface);
            }
            if n < PREFACE.len() {
                return Ok(());
            }
            out.extend_from_slice(PREFACE);
            self.preface_seen = true;
            at = PREFACE.len();
        }
        while let Some(head) = self.input.get(at..at + 9) {
            let len =
                (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            if len > MAX_FRAME {
                return Err(Malformed::FrameTooLarge(len));
            }
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let Some(payload) = self.input.get(at + 9..at + 9 + len) else {
                break;
            };
            let frame = &self.input[at..at + 9 + len];
            match (kind, self.pending.is_some()) {
                (HEADERS, false) => {
                    let fragment = fragment(flags, payload)?.to_vec();
                    let end_stream = flags & END_STREAM != 0;
                    if flags & END_HEADERS != 0 {
                        let block = rewrite(&mut self.decoder, &fragment)?;
                        write_block(out, stream, end_stream, &block);
                    } else {
                        self.pending = Some((stream, end_stream, fragment));
                    }
                }
                (CONTINUATION, true) => {
                    let Some((id, end_stream, mut fragment)) = self.pending.take() else {
                        return Err(Malformed::Continuation);
                    };
                    if id != stream {
                        return Err(Malformed::Continuation);
                    }
                    fragment.extend_from_slice(payload);
                    if fragment.len() > MAX_BLOCK {
                        return Err(Malformed::BlockTooLarge);
                    }
                    if flags & END_HEADERS != 0 {
                        let block = rewrite(&mut self.decoder, &fragment)?;
                        write_block(out, stream, end_stream, &block);
                    } else {
                        self.pending = Some((id, end_stream, fragment));
                    }
                }
                (_, true) | (CONTINUATION, false) => return Err(Malformed::Continuation),
                _ => out.extend_from_slice(frame),
            }
            at += 9 + len;
        }
        self.input.drain(..at);
        Ok(())
    }
}

/// The header block fragment of a HEADERS frame, without padding and priority.
fn fragment(flags: u8, payload: &[u8]) -> Result<&[u8], Malformed> {
    let mut body = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&n, rest) = body.split_first().ok_or(Malformed::Padding)?;
        pad = usize::from(n);
        body = rest;
    }
    if flags & PRIORITY != 0 {
        body = body.get(5..).ok_or(Malformed::Padding)?;
    }
    body.get(..body.len().checked_sub(pad).ok_or(Malformed::Padding)?)
        .ok_or(Malformed::Padding)
}

/// Decodes a block with the client's HPACK state and encodes it again with `:authority`
/// set to `localhost`, as literals without indexing.
fn rewrite(
    decoder: &mut fluke_hpack::Decoder<'static>,
    block: &[u8],
) -> Result<Vec<u8>, Malformed> {
    if block.len() > MAX_BLOCK {
        return Err(Malformed::BlockTooLarge);
    }
    let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut decoded = 0usize;
    // The decoder panics on a few truncated inputs (a size update's integer): contained
    // here and answered as malformed, never carried past this connection.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decoder.decode_with_cb(block, |name: Cow<[u8]>, value: Cow<[u8]>| {
            decoded += name.len() + value.len() + 32;
            if decoded <= MAX_BLOCK {
                let value = match &*name {
                    b":authority" => b"localhost".to_vec(),
                    _ => value.into_owned(),
                };
                headers.push((name.into_owned(), value));
            }
        })
    }));
    match outcome {
        Ok(Ok(())) if decoded <= MAX_BLOCK => {}
        Ok(Ok(())) => return Err(Malformed::BlockTooLarge),
        _ => return Err(Malformed::Hpack),
    }
    let mut out = Vec::with_capacity(decoded);
    for (name, value) in &headers {
        out.push(0x00); // literal header field without indexing, new name
        string(&mut out, name);
        string(&mut out, value);
    }
    Ok(out)
}

/// An HPACK string literal without Huffman coding.
fn string(out: &mut Vec<u8>, bytes: &[u8]) {
    integer(out, bytes.len(), 7, 0x00);
    out.extend_from_slice(bytes);
}

/// An HPACK integer with an `prefix`-bit prefix; `first` holds the bits above the prefix.
fn integer(out: &mut Vec<u8>, mut value: usize, prefix: u8, first: u8) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A header block as one HEADERS frame and as many CONTINUATION frames as it needs.
fn write_block(out: &mut Vec<u8>, stream: u32, end_stream: bool, block: &[u8]) {
    let mut chunks = block.chunks(OUT_FRAME).peekable();
    let mut first = true;
    if block.is_empty() {
        frame(
            out,
            HEADERS,
            END_HEADERS | u8::from(end_stream),
            stream,
            &[],
        );
        return;
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let kind = if first { HEADERS } else { CONTINUATION };
        let mut flags = if last { END_HEADERS } else { 0 };
        if first && end_stream {
            flags |= END_STREAM;
        }
        frame(out, kind, flags, stream, chunk);
        first = false;
    }
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers_frame(stream: u32, flags: u8, block: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame(&mut out, HEADERS, flags, stream, block);
        out
    }

    fn decode_out(bytes: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        assert_eq!(&bytes[..PREFACE.len()], PREFACE);
        let body = &bytes[PREFACE.len()..];
        let len = (usize::from(body[0]) << 16) | (usize::from(body[1]) << 8) | usize::from(body[2]);
        assert_eq!(body[3], HEADERS);
        let mut d = fluke_hpack::Decoder::new();
        d.decode(&body[9..9 + len]).unwrap()
    }

    #[test]
    fn the_authority_becomes_localhost_and_the_rest_is_kept_across_split_reads() {
        let mut enc = fluke_hpack::Encoder::new();
        let block = enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (&b":authority"[..], &b"%2Ftmp%2Fx.sock"[..]),
            (&b":path"[..], &b"/SpiffeWorkloadAPI/FetchX509SVID"[..]),
            (&b"workload.spiffe.io"[..], &b"true"[..]),
        ]);
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(1, END_HEADERS, &block));
        input.extend([0, 0, 0, 0x4, 0x1, 0, 0, 0, 0]); // SETTINGS ACK, passed through
        let mut r = Rewriter::default();
        let mut out = Vec::new();
        for byte in &input {
            r.feed(std::slice::from_ref(byte), &mut out).unwrap();
        }
        let headers = decode_out(&out);
        assert_eq!(
            headers,
            vec![
                (b":method".to_vec(), b"POST".to_vec()),
                (b":authority".to_vec(), b"localhost".to_vec()),
                (
                    b":path".to_vec(),
                    b"/SpiffeWorkloadAPI/FetchX509SVID".to_vec()
                ),
                (b"workload.spiffe.io".to_vec(), b"true".to_vec()),
            ]
        );
        assert!(out.ends_with(&[0, 0, 0, 0x4, 0x1, 0, 0, 0, 0]));
        // The client's dynamic table is followed: the same authority again, indexed.
        let again = enc.encode([(&b":authority"[..], &b"%2Ftmp%2Fx.sock"[..])]);
        let mut out = Vec::new();
        r.feed(
            &headers_frame(3, END_HEADERS | END_STREAM, &again),
            &mut out,
        )
        .unwrap();
        let mut d = fluke_hpack::Decoder::new();
        assert_eq!(out[4], END_HEADERS | END_STREAM);
        assert_eq!(
            d.decode(&out[9..]).unwrap(),
            vec![(b":authority".to_vec(), b"localhost".to_vec())]
        );
    }

    #[test]
    fn padding_priority_and_continuations_are_undone() {
        let mut enc = fluke_hpack::Encoder::new();
        let block = enc.encode([
            (&b":authority"[..], &b"unix:/x"[..]),
            (&b"a"[..], &b"b"[..]),
        ]);
        let (one, two) = block.split_at(3);
        let mut payload = vec![2u8]; // pad length
        payload.extend([0, 0, 0, 0, 16]); // priority
        payload.extend(one);
        payload.extend([0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(1, PADDED | PRIORITY, &payload));
        frame(&mut input, CONTINUATION, END_HEADERS, 1, two);
        let mut out = Vec::new();
        Rewriter::default().feed(&input, &mut out).unwrap();
        assert_eq!(
            decode_out(&out),
            vec![
                (b":authority".to_vec(), b"localhost".to_vec()),
                (b"a".to_vec(), b"b".to_vec())
            ]
        );
    }

    #[test]
    fn garbage_is_refused_without_a_panic() {
        let mut out = Vec::new();
        assert_eq!(
            Rewriter::default().feed(b"GET / HTTP/1.1\r\n", &mut out),
            Err(Malformed::Preface)
        );
        for block in [
            &[0x3f][..],
            &[0xff, 0xff],
            &[0x40, 0x85],
            &[0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ] {
            let mut input = PREFACE.to_vec();
            input.extend(headers_frame(1, END_HEADERS, block));
            assert!(
                Rewriter::default().feed(&input, &mut out).is_err(),
                "{block:?}"
            );
        }
        let mut input = PREFACE.to_vec();
        input.extend([0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 1]);
        assert_eq!(
            Rewriter::default().feed(&input, &mut out),
            Err(Malformed::FrameTooLarge(0xff_ffff))
        );
        let mut input = PREFACE.to_vec();
        frame(&mut input, CONTINUATION, END_HEADERS, 1, b"x");
        assert_eq!(
            Rewriter::default().feed(&input, &mut out),
            Err(Malformed::Continuation)
        );
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(1, PADDED, &[9, 1]));
        assert_eq!(
            Rewriter::default().feed(&input, &mut out),
            Err(Malformed::Padding)
        );
    }

    #[test]
    fn integers_round_trip_through_the_decoder() {
        for n in [0usize, 1, 126, 127, 128, 300, 70_000] {
            let mut out = vec![0x00];
            string(&mut out, b"n");
            string(&mut out, &vec![b'v'; n]);
            let mut d = fluke_hpack::Decoder::new();
            assert_eq!(d.decode(&out).unwrap()[0].1.len(), n);
        }
    }
}
