//! The format of the values promguard keeps in Redis, and the names it keeps them
//! under. Pure.
//!
//! A Redis key is the fleet's prefix, a tier letter and a 128-bit hash of the cache
//! key, so keys stay short whatever the query. Because a hash can collide, every
//! value carries its full cache key and is only read back for that key. A value is
//! `PGL2`, a format version, its kind, its codec, the key, four numbers, the
//! payload with its length in front, and a checksum of all of it (XXH3). The
//! payload is either LZ4 (with the decompressed size first) or, for whole answers,
//! the answer gzipped exactly as a client that accepts gzip is sent it, so a
//! replica serving it to Grafana sends the bytes as they come. Anything else (another version, kind or key, a
//! truncated, damaged or garbage value, an LZ4 payload claiming more than the
//! limit) reads as a miss, never as an answer.

use bytes::Bytes;
use xxhash_rust::xxh3::{xxh3_64, xxh3_128};

const MAGIC: &[u8; 4] = b"PGL2";
/// Bumped whenever the layout changes: older values then read as misses.
const VERSION: u8 = 3;
/// The numbers every value carries next to its payload.
pub const FIELDS: usize = 4;
const LZ4: u8 = 1;
const GZIP: u8 = 2;

/// What a value holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A whole answer: the bytes to send.
    Answer = 1,
    /// One chunk of a range query's extents: a matrix in Prometheus JSON.
    Chunk = 2,
}

impl Kind {
    fn letter(self) -> char {
        match self {
            Kind::Answer => 'a',
            Kind::Chunk => 'c',
        }
    }
}

/// A payload, as given to [`encode`] and returned by [`decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// The bytes themselves (kept LZ4-compressed).
    Plain(Bytes),
    /// A gzip stream of the bytes (kept as it is).
    Gzip(Bytes),
}

/// The Redis key for cache key `key` of `kind`, under `prefix`.
pub fn redis_key(prefix: &str, kind: Kind, key: &str) -> String {
    format!(
        "{prefix}{}:{:032x}",
        kind.letter(),
        xxh3_128(key.as_bytes())
    )
}

/// A value read back: its numbers and its payload.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    /// What the writer put there (for answers: when stored, how long fresh, points;
    /// for chunks: the span's first and last timestamp and when it expires; for
    /// both, last, the backends it came from as [`crate::routing::Sources::bits`]).
    pub fields: [i64; FIELDS],
    /// The payload: decompressed if it was LZ4, as stored if gzip.
    pub payload: Payload,
}

fn len32(len: usize) -> [u8; 4] {
    u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes()
}

/// Encode a value of `kind` for cache key `key`.
pub fn encode(kind: Kind, key: &str, fields: [i64; FIELDS], payload: &Payload) -> Vec<u8> {
    let (codec, stored) = match payload {
        Payload::Plain(bytes) => (LZ4, lz4_flex::block::compress_prepend_size(bytes)),
        Payload::Gzip(bytes) => (GZIP, bytes.to_vec()),
    };
    let mut out = Vec::with_capacity(4 + 3 + 4 + key.len() + 8 * FIELDS + 12 + stored.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[VERSION, kind as u8, codec]);
    out.extend_from_slice(&len32(key.len()));
    out.extend_from_slice(key.as_bytes());
    for field in fields {
        out.extend_from_slice(&field.to_le_bytes());
    }
    out.extend_from_slice(&len32(stored.len()));
    out.extend_from_slice(&stored);
    let checksum = xxh3_64(&out);
    out.extend_from_slice(&checksum.to_le_bytes());
    out
}

/// Decode a value that must be of `kind` for cache key `key`, whose payload may be
/// at most `max_payload` bytes (an LZ4 payload once decompressed). `None` for
/// anything else.
pub fn decode(bytes: &[u8], kind: Kind, key: &str, max_payload: usize) -> Option<Decoded> {
    let (value, checksum) = bytes.split_last_chunk::<8>()?;
    if xxh3_64(value) != u64::from_le_bytes(*checksum) {
        return None;
    }
    let rest = value.strip_prefix(MAGIC)?;
    let (&[version, stored_kind, codec], rest) = rest.split_first_chunk::<3>()?;
    if version != VERSION || stored_kind != kind as u8 {
        return None;
    }
    let (len, rest) = rest.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
    let (stored_key, rest) = rest.split_at_checked(len)?;
    if stored_key != key.as_bytes() {
        return None;
    }
    let mut fields = [0i64; FIELDS];
    let mut rest = rest;
    for field in &mut fields {
        let (number, tail) = rest.split_first_chunk::<8>()?;
        *field = i64::from_le_bytes(*number);
        rest = tail;
    }
    let (len, stored) = rest.split_first_chunk::<4>()?;
    if usize::try_from(u32::from_le_bytes(*len)).ok()? != stored.len() || stored.len() > max_payload
    {
        return None;
    }
    let payload = match codec {
        LZ4 => {
            // The decompressed size comes first; refuse a claim past the limit
            // before allocating for it.
            let (claimed, _) = stored.split_first_chunk::<4>()?;
            if usize::try_from(u32::from_le_bytes(*claimed)).ok()? > max_payload {
                return None;
            }
            Payload::Plain(Bytes::from(
                lz4_flex::block::decompress_size_prepended(stored).ok()?,
            ))
        }
        GZIP => Payload::Gzip(Bytes::copy_from_slice(stored)),
        _ => return None,
    };
    Some(Decoded { fields, payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "recent\u{0}/api/v1/query\u{0}sum(up)\u{0}@1795770000000";

    fn plain(bytes: &[u8]) -> Payload {
        Payload::Plain(Bytes::copy_from_slice(bytes))
    }

    fn value() -> Vec<u8> {
        encode(
            Kind::Answer,
            KEY,
            [1, -2, 3, 4],
            &plain(br#"{"status":"success"}"#),
        )
    }

    #[test]
    fn a_value_reads_back_for_its_key_and_kind() {
        let decoded = decode(&value(), Kind::Answer, KEY, 1 << 20).expect("decodes");
        assert_eq!(decoded.fields, [1, -2, 3, 4]);
        assert_eq!(decoded.payload, plain(br#"{"status":"success"}"#));
        let gzip = Payload::Gzip(Bytes::from_static(b"\x1f\x8b not checked here"));
        let decoded = decode(
            &encode(Kind::Answer, KEY, [4, 5, 6, 7], &gzip),
            Kind::Answer,
            KEY,
            1 << 20,
        );
        assert_eq!(decoded.map(|d| d.payload), Some(gzip));
    }

    #[test]
    fn another_key_kind_or_version_is_a_miss() {
        assert_eq!(decode(&value(), Kind::Answer, "another", 1 << 20), None);
        assert_eq!(decode(&value(), Kind::Chunk, KEY, 1 << 20), None);
        let mut newer = value();
        newer[4] = VERSION + 1;
        assert_eq!(decode(&newer, Kind::Answer, KEY, 1 << 20), None);
    }

    #[test]
    fn damaged_values_are_misses() {
        let good = value();
        for cut in 0..good.len() {
            assert_eq!(
                decode(&good[..cut], Kind::Answer, KEY, 1 << 20),
                None,
                "cut at {cut}"
            );
        }
        for at in 0..good.len() {
            let mut flipped = good.clone();
            flipped[at] ^= 0x01;
            assert_eq!(
                decode(&flipped, Kind::Answer, KEY, 1 << 20),
                None,
                "bit flipped at {at}"
            );
        }
        let mut longer = good.clone();
        longer.push(0);
        assert_eq!(decode(&longer, Kind::Answer, KEY, 1 << 20), None);
        assert_eq!(decode(b"garbage", Kind::Answer, KEY, 1 << 20), None);
        assert_eq!(decode(b"", Kind::Answer, KEY, 1 << 20), None);
    }

    #[test]
    fn a_payload_past_the_limit_is_not_decompressed() {
        let big = encode(Kind::Chunk, KEY, [0; FIELDS], &plain(&vec![b'x'; 4096]));
        assert!(decode(&big, Kind::Chunk, KEY, 4096).is_some());
        assert_eq!(decode(&big, Kind::Chunk, KEY, 4095), None);
        // A forged size in front of a tiny payload (checksum and all) is refused
        // the same way.
        let mut lz4 = lz4_flex::block::compress_prepend_size(b"x");
        lz4[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut forged = encode(
            Kind::Chunk,
            KEY,
            [0; FIELDS],
            &Payload::Gzip(Bytes::from(lz4)),
        );
        forged[6] = LZ4;
        let at = forged.len() - 8;
        let (value, checksum) = forged.split_at_mut(at);
        checksum.copy_from_slice(&xxh3_64(value).to_le_bytes());
        assert_eq!(decode(&forged, Kind::Chunk, KEY, 1 << 20), None);
    }

    #[test]
    fn redis_keys_are_short_and_distinct_per_kind_and_prefix() {
        let a = redis_key("pg:", Kind::Answer, KEY);
        assert_eq!(a.len(), "pg:a:".len() + 32);
        assert_ne!(a, redis_key("pg:", Kind::Chunk, KEY));
        assert_ne!(a, redis_key("other:", Kind::Answer, KEY));
        assert_ne!(a, redis_key("pg:", Kind::Answer, "sum(up)"));
    }
}
