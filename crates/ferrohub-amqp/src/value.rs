//! The AMQP 1.0 type system (part 1 of the spec): one [`Value`] enum, a decoder that checks
//! every length against the bytes at hand before allocating, and an encoder.

use thiserror::Error;

/// Nesting deeper than this is refused, so a hostile frame cannot exhaust the stack.
const MAX_DEPTH: usize = 32;
/// Elements an array of zero-width values (null, true, false, uint0, ulong0, list0) may have.
const MAX_ZERO_WIDTH_ELEMENTS: usize = 1024;

#[derive(Debug, Clone, PartialEq, Default)]
pub enum Value {
    #[default]
    Null,
    Bool(bool),
    Ubyte(u8),
    Ushort(u16),
    Uint(u32),
    Ulong(u64),
    Byte(i8),
    Short(i16),
    Int(i32),
    Long(i64),
    Float(f32),
    Double(f64),
    /// decimal32/64/128, kept as their bytes (nothing here computes with them).
    Decimal(Vec<u8>),
    Char(char),
    /// Milliseconds since the Unix epoch.
    Timestamp(i64),
    Uuid([u8; 16]),
    Binary(Vec<u8>),
    String(String),
    Symbol(String),
    List(Vec<Value>),
    /// In wire order; AMQP maps may repeat keys only in broken peers, which the first wins.
    Map(Vec<(Value, Value)>),
    Array(Vec<Value>),
    Described(Box<Value>, Box<Value>),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("truncated value")]
    Truncated,
    #[error("unknown format code 0x{0:02x}")]
    UnknownFormat(u8),
    #[error("invalid UTF-8 in a string or symbol")]
    Utf8,
    #[error("invalid char")]
    Char,
    #[error("values nested too deeply")]
    TooDeep,
    #[error("map with an odd number of elements")]
    OddMap,
    #[error("{0}")]
    Shape(&'static str),
}

impl Value {
    pub fn str(s: impl Into<String>) -> Value {
        Value::String(s.into())
    }
    pub fn sym(s: impl Into<String>) -> Value {
        Value::Symbol(s.into())
    }
    pub fn described(code: u64, v: Value) -> Value {
        Value::Described(Box::new(Value::Ulong(code)), Box::new(v))
    }
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
    /// String or symbol text.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) | Value::Symbol(s) => Some(s),
            _ => None,
        }
    }
    /// Any unsigned or non-negative signed integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::Ubyte(v) => Some(v.into()),
            Value::Ushort(v) => Some(v.into()),
            Value::Uint(v) => Some(v.into()),
            Value::Ulong(v) => Some(v),
            Value::Byte(v) => u64::try_from(v).ok(),
            Value::Short(v) => u64::try_from(v).ok(),
            Value::Int(v) => u64::try_from(v).ok(),
            Value::Long(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::Byte(v) => Some(v.into()),
            Value::Short(v) => Some(v.into()),
            Value::Int(v) => Some(v.into()),
            Value::Long(v) => Some(v),
            Value::Timestamp(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    pub fn as_u32(&self) -> Option<u32> {
        self.as_u64().and_then(|v| u32::try_from(v).ok())
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
    /// A map entry by string or symbol key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }
    /// The descriptor code of a described value (numeric descriptors only).
    pub fn descriptor(&self) -> Option<u64> {
        match self {
            Value::Described(d, _) => d.as_u64(),
            _ => None,
        }
    }

    /// Decodes one value from the front of `buf`, advancing it.
    pub fn decode(buf: &mut &[u8]) -> Result<Value, DecodeError> {
        decode_at(buf, 0)
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        encode(self, out)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        encode(self, &mut out);
        out
    }
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], DecodeError> {
    if buf.len() < n {
        return Err(DecodeError::Truncated);
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

fn u8_(buf: &mut &[u8]) -> Result<u8, DecodeError> {
    Ok(take(buf, 1)?[0])
}

fn arr<const N: usize>(buf: &mut &[u8]) -> Result<[u8; N], DecodeError> {
    let mut a = [0u8; N];
    a.copy_from_slice(take(buf, N)?);
    Ok(a)
}

fn size(buf: &mut &[u8], wide: bool) -> Result<usize, DecodeError> {
    Ok(if wide {
        u32::from_be_bytes(arr(buf)?) as usize
    } else {
        u8_(buf)? as usize
    })
}

fn decode_at(buf: &mut &[u8], depth: usize) -> Result<Value, DecodeError> {
    if depth > MAX_DEPTH {
        return Err(DecodeError::TooDeep);
    }
    let code = u8_(buf)?;
    if code == 0x00 {
        let d = decode_at(buf, depth + 1)?;
        let v = decode_at(buf, depth + 1)?;
        return Ok(Value::Described(Box::new(d), Box::new(v)));
    }
    decode_body(code, buf, depth)
}

/// The value after its constructor `code` (shared with array elements, which omit it).
fn decode_body(code: u8, buf: &mut &[u8], depth: usize) -> Result<Value, DecodeError> {
    Ok(match code {
        0x40 => Value::Null,
        0x41 => Value::Bool(true),
        0x42 => Value::Bool(false),
        0x56 => Value::Bool(u8_(buf)? != 0),
        0x50 => Value::Ubyte(u8_(buf)?),
        0x60 => Value::Ushort(u16::from_be_bytes(arr(buf)?)),
        0x70 => Value::Uint(u32::from_be_bytes(arr(buf)?)),
        0x52 => Value::Uint(u8_(buf)?.into()),
        0x43 => Value::Uint(0),
        0x80 => Value::Ulong(u64::from_be_bytes(arr(buf)?)),
        0x53 => Value::Ulong(u8_(buf)?.into()),
        0x44 => Value::Ulong(0),
        0x51 => Value::Byte(i8::from_be_bytes(arr(buf)?)),
        0x61 => Value::Short(i16::from_be_bytes(arr(buf)?)),
        0x71 => Value::Int(i32::from_be_bytes(arr(buf)?)),
        0x54 => Value::Int(i8::from_be_bytes(arr(buf)?).into()),
        0x81 => Value::Long(i64::from_be_bytes(arr(buf)?)),
        0x55 => Value::Long(i8::from_be_bytes(arr(buf)?).into()),
        0x72 => Value::Float(f32::from_be_bytes(arr(buf)?)),
        0x82 => Value::Double(f64::from_be_bytes(arr(buf)?)),
        0x74 => Value::Decimal(take(buf, 4)?.to_vec()),
        0x84 => Value::Decimal(take(buf, 8)?.to_vec()),
        0x94 => Value::Decimal(take(buf, 16)?.to_vec()),
        0x73 => {
            Value::Char(char::from_u32(u32::from_be_bytes(arr(buf)?)).ok_or(DecodeError::Char)?)
        }
        0x83 => Value::Timestamp(i64::from_be_bytes(arr(buf)?)),
        0x98 => Value::Uuid(arr(buf)?),
        0xa0 | 0xb0 => {
            let n = size(buf, code == 0xb0)?;
            Value::Binary(take(buf, n)?.to_vec())
        }
        0xa1 | 0xb1 | 0xa3 | 0xb3 => {
            let n = size(buf, code & 0x10 != 0)?;
            let s = std::str::from_utf8(take(buf, n)?).map_err(|_| DecodeError::Utf8)?;
            if code & 0x02 != 0 {
                Value::Symbol(s.to_owned())
            } else {
                Value::String(s.to_owned())
            }
        }
        0x45 => Value::List(Vec::new()),
        0xc0 | 0xd0 | 0xc1 | 0xd1 => {
            let wide = code & 0x10 != 0;
            let n = size(buf, wide)?;
            let mut body = take(buf, n)?;
            let count = size(&mut body, wide)?;
            // Each element takes at least one byte: a count beyond that is a lie, and must
            // not size an allocation.
            if count > body.len() {
                return Err(DecodeError::Truncated);
            }
            let mut items = Vec::with_capacity(count);
            for _ in 0..count {
                items.push(decode_at(&mut body, depth + 1)?);
            }
            if code & 0x01 != 0 {
                if items.len() % 2 != 0 {
                    return Err(DecodeError::OddMap);
                }
                let mut entries = Vec::with_capacity(items.len() / 2);
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    entries.push((k, v));
                }
                Value::Map(entries)
            } else {
                Value::List(items)
            }
        }
        0xe0 | 0xf0 => {
            let wide = code == 0xf0;
            let n = size(buf, wide)?;
            let mut body = take(buf, n)?;
            let count = size(&mut body, wide)?;
            let mut elem = u8_(&mut body)?;
            let mut descriptor = None;
            if elem == 0x00 {
                descriptor = Some(decode_at(&mut body, depth + 1)?);
                elem = u8_(&mut body)?;
            }
            // Zero-width elements (true, null, uint0...) would let a tiny frame claim
            // billions of them, so they get a fixed cap; anything else needs a byte per
            // element at least.
            let zero_width = matches!(elem, 0x40..=0x45);
            if (zero_width && count > MAX_ZERO_WIDTH_ELEMENTS)
                || (!zero_width && count > body.len())
            {
                return Err(DecodeError::Truncated);
            }
            let mut items = Vec::with_capacity(count);
            for _ in 0..count {
                let v = decode_body(elem, &mut body, depth + 1)?;
                items.push(match &descriptor {
                    Some(d) => Value::Described(Box::new(d.clone()), Box::new(v)),
                    None => v,
                });
            }
            Value::Array(items)
        }
        other => return Err(DecodeError::UnknownFormat(other)),
    })
}

pub(crate) fn put_sized(out: &mut Vec<u8>, short: u8, long: u8, bytes: &[u8]) {
    match u8::try_from(bytes.len()) {
        Ok(n) => {
            out.push(short);
            out.push(n);
        }
        Err(_) => {
            out.push(long);
            out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        }
    }
    out.extend_from_slice(bytes);
}

pub(crate) fn encode(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Null => out.push(0x40),
        Value::Bool(true) => out.push(0x41),
        Value::Bool(false) => out.push(0x42),
        Value::Ubyte(b) => out.extend_from_slice(&[0x50, *b]),
        Value::Ushort(n) => {
            out.push(0x60);
            out.extend_from_slice(&n.to_be_bytes());
        }
        // The compact forms are not only shorter: pyamqp (azure-eventhub <= 5.15.1) reads a
        // performative's descriptor as the byte after `00 53`, so descriptors must be
        // smallulong.
        Value::Uint(0) => out.push(0x43),
        Value::Uint(n) if *n < 256 => out.extend_from_slice(&[0x52, *n as u8]),
        Value::Uint(n) => {
            out.push(0x70);
            out.extend_from_slice(&n.to_be_bytes());
        }
        Value::Ulong(0) => out.push(0x44),
        Value::Ulong(n) if *n < 256 => out.extend_from_slice(&[0x53, *n as u8]),
        Value::Ulong(n) => {
            out.push(0x80);
            out.extend_from_slice(&n.to_be_bytes());
        }
        Value::Byte(n) => out.extend_from_slice(&[0x51, *n as u8]),
        Value::Short(n) => {
            out.push(0x61);
            out.extend_from_slice(&n.to_be_bytes());
        }
        Value::Int(n) => {
            out.push(0x71);
            out.extend_from_slice(&n.to_be_bytes());
        }
        Value::Long(n) => {
            out.push(0x81);
            out.extend_from_slice(&n.to_be_bytes());
        }
        Value::Float(f) => {
            out.push(0x72);
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::Double(f) => {
            out.push(0x82);
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::Decimal(b) => {
            out.push(match b.len() {
                4 => 0x74,
                8 => 0x84,
                _ => 0x94,
            });
            let mut fixed = b.clone();
            fixed.resize(
                if b.len() <= 4 {
                    4
                } else if b.len() <= 8 {
                    8
                } else {
                    16
                },
                0,
            );
            out.extend_from_slice(&fixed);
        }
        Value::Char(c) => {
            out.push(0x73);
            out.extend_from_slice(&u32::from(*c).to_be_bytes());
        }
        Value::Timestamp(t) => {
            out.push(0x83);
            out.extend_from_slice(&t.to_be_bytes());
        }
        Value::Uuid(u) => {
            out.push(0x98);
            out.extend_from_slice(u);
        }
        Value::Binary(b) => put_sized(out, 0xa0, 0xb0, b),
        Value::String(s) => put_sized(out, 0xa1, 0xb1, s.as_bytes()),
        Value::Symbol(s) => put_sized(out, 0xa3, 0xb3, s.as_bytes()),
        Value::List(items) => encode_compound(out, 0xc0, 0xd0, items.len(), |out| {
            for i in items {
                encode(i, out);
            }
        }),
        Value::Map(entries) => encode_map(out, entries),
        Value::Array(items) => encode_array(items, out),
        Value::Described(d, v) => {
            out.push(0x00);
            encode(d, out);
            encode(v, out);
        }
    }
}

/// A map from its entries in wire order (also for message sections, without building a
/// `Value` of them).
pub(crate) fn encode_map(out: &mut Vec<u8>, entries: &[(Value, Value)]) {
    encode_compound(out, 0xc1, 0xd1, entries.len() * 2, |out| {
        for (k, v) in entries {
            encode(k, out);
            encode(v, out);
        }
    });
}

/// A list or map whose `count` items `body` writes: in the compact form (`short`, one-byte
/// size and count) when it fits, else the long one. The items are written in place after
/// room for the long header, and moved down over the unused bytes when the compact form fits
/// (at most 254 bytes, so the move is short), rather than written elsewhere and copied.
fn encode_compound(
    out: &mut Vec<u8>,
    short: u8,
    long: u8,
    count: usize,
    body: impl FnOnce(&mut Vec<u8>),
) {
    const LONG_HEADER: usize = 9;
    let start = out.len();
    out.extend_from_slice(&[long, 0, 0, 0, 0, 0, 0, 0, 0]);
    body(out);
    let len = out.len() - start - LONG_HEADER;
    if len < 255 && count < 256 {
        out[start] = short;
        out[start + 1] = (len + 1) as u8;
        out[start + 2] = count as u8;
        out.copy_within(start + LONG_HEADER.., start + 3);
        out.truncate(start + 3 + len);
    } else {
        out[start + 1..start + 5].copy_from_slice(&((len + 4) as u32).to_be_bytes());
        out[start + 5..start + 9].copy_from_slice(&(count as u32).to_be_bytes());
    }
}

/// One element of an array: a constructor shared by every element, and this element's bytes
/// after it. Arrays need one encoding for all their elements, so each type has one fixed
/// (widest) form here.
fn element(v: &Value) -> (Vec<u8>, Vec<u8>) {
    let fixed = |code: u8, bytes: &[u8]| (vec![code], bytes.to_vec());
    let sized = |code: u8, bytes: &[u8]| {
        let mut b = (bytes.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(bytes);
        (vec![code], b)
    };
    match v {
        Value::Null => fixed(0x40, &[]),
        Value::Bool(b) => fixed(0x56, &[u8::from(*b)]),
        Value::Ubyte(n) => fixed(0x50, &[*n]),
        Value::Ushort(n) => fixed(0x60, &n.to_be_bytes()),
        Value::Uint(n) => fixed(0x70, &n.to_be_bytes()),
        Value::Ulong(n) => fixed(0x80, &n.to_be_bytes()),
        Value::Byte(n) => fixed(0x51, &n.to_be_bytes()),
        Value::Short(n) => fixed(0x61, &n.to_be_bytes()),
        Value::Int(n) => fixed(0x71, &n.to_be_bytes()),
        Value::Long(n) => fixed(0x81, &n.to_be_bytes()),
        Value::Float(f) => fixed(0x72, &f.to_be_bytes()),
        Value::Double(f) => fixed(0x82, &f.to_be_bytes()),
        Value::Decimal(_) | Value::List(_) | Value::Map(_) | Value::Array(_) => {
            // Their general encoding, split into constructor and body.
            let mut all = Vec::new();
            encode(v, &mut all);
            let body = all.split_off(1);
            let (code, body) = match all[0] {
                0xc0 | 0xc1 | 0x45 | 0xe0 => widen(all[0], &body),
                c => (c, body),
            };
            (vec![code], body)
        }
        Value::Char(c) => fixed(0x73, &u32::from(*c).to_be_bytes()),
        Value::Timestamp(t) => fixed(0x83, &t.to_be_bytes()),
        Value::Uuid(u) => fixed(0x98, u),
        Value::Binary(b) => sized(0xb0, b),
        Value::String(t) => sized(0xb1, t.as_bytes()),
        Value::Symbol(t) => sized(0xb3, t.as_bytes()),
        Value::Described(d, inner) => {
            let mut code = vec![0x00];
            encode(d, &mut code);
            let (inner_code, body) = element(inner);
            code.extend_from_slice(&inner_code);
            (code, body)
        }
    }
}

/// The 32-bit form of a short list, map or array (as element bodies must share one width).
fn widen(code: u8, body: &[u8]) -> (u8, Vec<u8>) {
    let (size, count, items) = match code {
        0x45 => return (0xd0, [4u32.to_be_bytes(), 0u32.to_be_bytes()].concat()),
        _ => (
            u32::from(body.first().copied().unwrap_or(0)),
            u32::from(body.get(1).copied().unwrap_or(0)),
            body.get(2..).unwrap_or_default(),
        ),
    };
    let mut out = (size + 3).to_be_bytes().to_vec();
    out.extend_from_slice(&count.to_be_bytes());
    out.extend_from_slice(items);
    let wide = match code {
        0xc0 => 0xd0,
        0xc1 => 0xd1,
        _ => 0xf0,
    };
    (wide, out)
}

/// Writes an array; elements whose constructor differs from the first one's cannot be in
/// the same array and are left out (decoded arrays never have them).
fn encode_array(items: &[Value], out: &mut Vec<u8>) {
    let mut constructor = None;
    let mut bodies = Vec::new();
    let mut count: u32 = 0;
    for i in items {
        let (code, body) = element(i);
        match &constructor {
            None => constructor = Some(code),
            Some(c) if *c != code => continue,
            Some(_) => {}
        }
        bodies.extend_from_slice(&body);
        count += 1;
    }
    let mut body = count.to_be_bytes().to_vec();
    body.extend_from_slice(&constructor.unwrap_or_else(|| vec![0x40]));
    body.extend_from_slice(&bodies);
    out.push(0xf0);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compact forms up to a 254-byte body and 255 items, long ones past either, nested
    /// ones included: the in-place writing must choose as the size says and decode back.
    #[test]
    fn lists_and_maps_pick_their_form_at_the_boundaries() {
        // A binary of n bytes takes n + 2 bytes (a0, len) up to 255.
        for (body, form) in [(253usize, 0xc0u8), (254, 0xc0), (255, 0xd0), (300, 0xd0)] {
            let list = Value::List(vec![Value::Binary(vec![7; body - 2])]);
            let bytes = list.to_bytes();
            assert_eq!(bytes[0], form, "body {body}");
            assert_eq!(Value::decode(&mut bytes.as_slice()), Ok(list.clone()));
            let nested = Value::List(vec![Value::Null, list.clone(), Value::Bool(true)]);
            let bytes = nested.to_bytes();
            assert_eq!(Value::decode(&mut bytes.as_slice()), Ok(nested));
        }
        let many = Value::List(vec![Value::Null; 256]);
        let bytes = many.to_bytes();
        assert_eq!(bytes[0], 0xd0, "256 items need the long form");
        assert_eq!(Value::decode(&mut bytes.as_slice()), Ok(many));
        let map = Value::Map(vec![(
            Value::sym("k"),
            Value::Map(vec![(Value::Null, Value::str("v"))]),
        )]);
        let bytes = map.to_bytes();
        assert_eq!(&bytes[..3], &[0xc1, 11, 2]);
        assert_eq!(Value::decode(&mut bytes.as_slice()), Ok(map));
    }

    fn round(v: Value) {
        let bytes = v.to_bytes();
        let mut s = bytes.as_slice();
        assert_eq!(Value::decode(&mut s), Ok(v));
        assert!(s.is_empty());
    }

    #[test]
    fn values_round_trip() {
        round(Value::Null);
        round(Value::Ulong(u64::MAX));
        round(Value::Int(-5));
        round(Value::Timestamp(1_700_000_000_000));
        round(Value::str("x".repeat(300)));
        round(Value::Map(vec![(
            Value::sym("k"),
            Value::List(vec![Value::Bool(true)]),
        )]));
        round(Value::Array(vec![Value::sym("a"), Value::sym("bc")]));
        round(Value::Array(vec![Value::Bool(true), Value::Bool(false)]));
        round(Value::Array(vec![
            Value::List(vec![Value::Uint(1)]),
            Value::List(vec![]),
        ]));
        round(Value::Array(vec![Value::described(7, Value::Int(1))]));
        round(Value::Array(vec![Value::Array(vec![Value::Long(1)])]));
        round(Value::described(0x10, Value::List(vec![Value::Null; 300])));
    }

    #[test]
    fn descriptors_are_written_as_smallulong() {
        let v = Value::described(0x10, Value::List(vec![]));
        assert_eq!(&v.to_bytes()[..3], &[0x00, 0x53, 0x10]);
    }

    #[test]
    fn compact_encodings_decode() {
        let mut s: &[u8] = &[0x52, 7, 0x53, 9, 0x43, 0x45, 0x54, 0xff];
        assert_eq!(Value::decode(&mut s), Ok(Value::Uint(7)));
        assert_eq!(Value::decode(&mut s), Ok(Value::Ulong(9)));
        assert_eq!(Value::decode(&mut s), Ok(Value::Uint(0)));
        assert_eq!(Value::decode(&mut s), Ok(Value::List(vec![])));
        assert_eq!(Value::decode(&mut s), Ok(Value::Int(-1)));
    }

    #[test]
    fn arrays_of_zero_width_elements_re_encode() {
        // Found by the amqp_frame fuzz target: 66 `false` (and 66 nulls) in an array8 with no
        // element bytes.
        let mut s: &[u8] = &[0xe0, 0x02, 0x42, 0x40];
        let nulls = Value::decode(&mut s).unwrap_or_default().to_bytes();
        assert_eq!(
            Value::decode(&mut nulls.as_slice()),
            Ok(Value::Array(vec![Value::Null; 66]))
        );
        let mut s: &[u8] = &[0xe0, 0x07, 0x42, 0x42, 0x00, 0x00, 0x02, 0x0b, 0x01];
        let v = Value::decode(&mut s);
        assert_eq!(v, Ok(Value::Array(vec![Value::Bool(false); 66])));
        let bytes = v.unwrap_or_default().to_bytes();
        assert_eq!(
            Value::decode(&mut bytes.as_slice()),
            Ok(Value::Array(vec![Value::Bool(false); 66]))
        );
    }

    #[test]
    fn lying_lengths_and_deep_nesting_fail_without_allocating() {
        let mut s: &[u8] = &[0xd0, 0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff];
        assert!(Value::decode(&mut s).is_err());
        let mut s: &[u8] = &[0xf0, 0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0x40];
        assert!(Value::decode(&mut s).is_err());
        let deep = vec![0x00u8; 100];
        assert_eq!(
            Value::decode(&mut deep.as_slice()),
            Err(DecodeError::TooDeep)
        );
    }
}
