//! The on-disk record format and its decoder, which must hold up against any bytes (a torn
//! tail, a flipped bit, a fuzzer).
//!
//! A record is `len: u32 LE | crc: u32 LE | payload[len]`, the CRC32C covering the length
//! bytes and the payload, so a torn length is caught as surely as a torn body. The payload:
//! `sequence u64 | enqueued_ms i64 | device str | module opt-str | system map | app list |
//! body bytes`, where a str/bytes is `u32 LE length | bytes`, an opt-str a `0`/`1` tag byte
//! (then a str), a map/list a `u32 LE count` of entries.

use std::collections::BTreeMap;

use ferrohub_store::telemetry::NewEvent;

/// Bytes before the payload.
pub const HEADER: usize = 8;
/// Larger payloads are treated as garbage: IoT Hub caps a message at 256 KB, so a length
/// beyond this is a torn or corrupt header, and refusing it keeps a bad length from making
/// a reader allocate gigabytes.
pub const MAX_PAYLOAD: usize = 16 << 20;

/// Why bytes are not a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes end inside the record: a torn tail if this is the end of the file.
    Incomplete,
    /// The checksum, a length or an encoding is wrong.
    Corrupt(&'static str),
}

/// Appends the record for `event` at `sequence` to `out`.
pub fn encode(out: &mut Vec<u8>, sequence: u64, event: &NewEvent) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER]);
    out.extend_from_slice(&sequence.to_le_bytes());
    out.extend_from_slice(&event.enqueued_ms.to_le_bytes());
    put_bytes(out, event.device_id.as_bytes());
    put_opt(out, event.module_id.as_deref());
    put_u32(out, event.system_properties.len());
    for (k, v) in &event.system_properties {
        put_bytes(out, k.as_bytes());
        put_bytes(out, v.as_bytes());
    }
    put_u32(out, event.properties.len());
    for (k, v) in &event.properties {
        put_bytes(out, k.as_bytes());
        put_opt(out, v.as_deref());
    }
    put_bytes(out, &event.body);
    let len = (out.len() - start - HEADER) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&len.to_le_bytes()), &out[start + HEADER..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    // Every length written is bounded far below u32::MAX by the hub's message size limits.
    out.extend_from_slice(&(n as u32).to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len());
    out.extend_from_slice(b);
}

fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_bytes(out, s.as_bytes());
        }
    }
}

/// The header of the record at the start of `buf`, checksum verified: (sequence,
/// enqueued_ms, total length). Cheaper than [`decode`] for scans that only index.
pub fn peek(buf: &[u8]) -> Result<(u64, i64, usize), DecodeError> {
    let payload = checked_payload(buf)?;
    let mut r = Reader(payload);
    let seq = r.u64()?;
    let ms = r.u64()? as i64;
    Ok((seq, ms, HEADER + payload.len()))
}

fn checked_payload(buf: &[u8]) -> Result<&[u8], DecodeError> {
    let head = buf.get(..HEADER).ok_or(DecodeError::Incomplete)?;
    let mut len_bytes = [0u8; 4];
    len_bytes.copy_from_slice(&head[..4]);
    let len = u32::from_le_bytes(len_bytes) as usize;
    if !(16..=MAX_PAYLOAD).contains(&len) {
        return Err(DecodeError::Corrupt("record length out of range"));
    }
    let mut crc_bytes = [0u8; 4];
    crc_bytes.copy_from_slice(&head[4..8]);
    let payload = buf
        .get(HEADER..HEADER + len)
        .ok_or(DecodeError::Incomplete)?;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&len_bytes), payload);
    if crc != u32::from_le_bytes(crc_bytes) {
        return Err(DecodeError::Corrupt("checksum mismatch"));
    }
    Ok(payload)
}

/// The record at the start of `buf`: (sequence, event, total length).
pub fn decode(buf: &[u8]) -> Result<(u64, NewEvent, usize), DecodeError> {
    let payload = checked_payload(buf)?;
    let mut r = Reader(payload);
    let seq = r.u64()?;
    let enqueued_ms = r.u64()? as i64;
    let device_id = r.string()?;
    let module_id = r.opt()?;
    let mut system_properties = BTreeMap::new();
    for _ in 0..r.count()? {
        let k = r.string()?;
        let v = r.string()?;
        system_properties.insert(k, v);
    }
    let n = r.count()?;
    let mut properties = Vec::with_capacity(n);
    for _ in 0..n {
        let k = r.string()?;
        let v = r.opt()?;
        properties.push((k, v));
    }
    let body = r.bytes()?.to_vec();
    if !r.0.is_empty() {
        return Err(DecodeError::Corrupt("trailing bytes in record"));
    }
    Ok((
        seq,
        NewEvent {
            device_id,
            module_id,
            enqueued_ms,
            system_properties,
            properties,
            body,
        },
        HEADER + payload.len(),
    ))
}

/// A cursor over a checksummed payload: running out of bytes here means a bad encoding, not
/// a torn record (the length and checksum already matched).
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Corrupt("field runs past the record"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    fn u32(&mut self) -> Result<usize, DecodeError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b) as usize)
    }

    /// An entry count, bounded by what the remaining bytes could hold so a forged count
    /// cannot make the decoder reserve memory it will never fill.
    fn count(&mut self) -> Result<usize, DecodeError> {
        let n = self.u32()?;
        if n > self.0.len() / 5 {
            return Err(DecodeError::Corrupt("entry count larger than the record"));
        }
        Ok(n)
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()?;
        self.take(n)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Corrupt("invalid UTF-8"))
    }

    fn opt(&mut self) -> Result<Option<String>, DecodeError> {
        match self.take(1)?[0] {
            0 => Ok(None),
            1 => self.string().map(Some),
            _ => Err(DecodeError::Corrupt("bad option tag")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> NewEvent {
        NewEvent {
            device_id: "dev".into(),
            module_id: Some("m".into()),
            enqueued_ms: -5,
            system_properties: BTreeMap::from([("message-id".into(), "x".into())]),
            properties: vec![("a".into(), None), ("b".into(), Some("".into()))],
            body: b"hello".to_vec(),
        }
    }

    #[test]
    fn round_trips_and_rejects_every_truncation_and_bit_flip() {
        let mut buf = Vec::new();
        encode(&mut buf, 42, &event());
        let (seq, ev, len) = decode(&buf).expect("a fresh record decodes");
        assert_eq!((seq, &ev, len), (42, &event(), buf.len()));
        assert_eq!(peek(&buf), Ok((42, -5, buf.len())));
        for cut in 0..buf.len() {
            assert!(decode(&buf[..cut]).is_err(), "cut at {cut}");
        }
        for byte in 0..buf.len() {
            let mut bad = buf.clone();
            bad[byte] ^= 0x10;
            assert!(decode(&bad).is_err(), "flip in byte {byte}");
        }
    }

    #[test]
    fn the_fuzz_seed_corpus_is_in_this_format() {
        let seed = include_bytes!("../../../fuzz/corpus/segment_record/two_records");
        let (seq, ev, len) = decode(seed).expect("first seed record");
        assert_eq!(
            (seq, ev.device_id.as_str(), ev.body.as_slice()),
            (0, "dev1", &b"hello"[..])
        );
        let (seq, ev, rest) = decode(&seed[len..]).expect("second seed record");
        assert_eq!((seq, ev.module_id.as_deref()), (1, Some("mod")));
        assert_eq!(len + rest, seed.len());
    }
}
