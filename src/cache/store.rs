//! The shared in-memory store: whole answers and range-query extents in one moka
//! cache, bounded by bytes, each entry with its own time to live.
//!
//! Answers are kept past their freshness, up to the stale limit, so a failing
//! backend can be covered with an older answer. Does no I/O.

use std::io::Write;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use moka::notification::RemovalCause;
use moka::sync::Cache;
use prometheus::IntCounterVec;

use super::extent::Span;
use super::key::{CacheKey, SeriesKey};
use super::matrix::Matrix;
use crate::routing::Sources;

/// A whole answer, stored as the exact bytes to send.
#[derive(Debug)]
pub struct Answer {
    /// The exact bytes to send, as the backend or the stitching wrote them.
    pub body: Bytes,
    /// Points in a range answer, for the points-served metric; 0 otherwise.
    pub points: u64,
    /// The backends it came from, for `X-Promguard-Backend` on hits.
    pub sources: Sources,
    /// When it was stored, on the cache's clock: its age for the refresh floor and
    /// for the stale warning.
    pub stored: Instant,
    /// Served as a hit until then; afterwards only as a stale fallback.
    pub fresh_until: Instant,
    /// The body gzipped, made on the first hit from a client that accepts it.
    /// Grafana's client does: a hit then writes a tenth of the bytes.
    gzipped: OnceLock<Option<Bytes>>,
}

/// Whether a body is worth compressing: small ones are not.
fn worth_gzipping(body: &[u8]) -> bool {
    body.len() >= 1024
}

/// The bytes a gzip stream holds, if it is whole and they are at most `limit`.
pub fn gunzip(gzipped: &[u8], limit: usize) -> Option<Bytes> {
    use std::io::Read;
    let mut body = Vec::with_capacity(gzipped.len().saturating_mul(8).min(limit));
    flate2::read::GzDecoder::new(gzipped)
        .take(u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1))
        .read_to_end(&mut body)
        .ok()?;
    (body.len() <= limit).then(|| Bytes::from(body))
}

impl Answer {
    /// Take `gzipped` as the gzip copy, unless one is made already: the copy that
    /// came with an answer from the fleet's cache.
    pub fn offer_gzipped(&self, gzipped: Bytes) {
        let _ = self.gzipped.set(Some(gzipped));
    }

    /// The gzipped body, compressed once; `None` for small bodies.
    pub fn gzipped(&self) -> Option<&Bytes> {
        self.gzipped
            .get_or_init(|| {
                if !worth_gzipping(&self.body) {
                    return None;
                }
                // Fast compression: JSON shrinks about tenfold even at level 1.
                let mut encoder =
                    GzEncoder::new(Vec::with_capacity(self.body.len() / 8), Compression::fast());
                encoder.write_all(&self.body).ok()?;
                let mut gzipped = encoder.finish().ok()?;
                gzipped.shrink_to_fit();
                Some(Bytes::from(gzipped))
            })
            .as_ref()
    }
}

/// The immutable part of a range query's result within one chunk.
#[derive(Debug)]
pub struct Chunk {
    /// Grid timestamps this chunk answers for; points outside do not exist.
    pub span: Span,
    /// The chunk's series, holding only points within `span`.
    pub matrix: Matrix,
    /// The backends its points came from.
    pub sources: Sources,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Answer(CacheKey),
    Chunk(SeriesKey, i64),
}

#[derive(Debug, Clone)]
enum Value {
    Answer(Arc<Answer>),
    Chunk(Arc<Chunk>),
}

/// Each entry carries its own time to live.
#[derive(Debug, Clone)]
struct Entry {
    value: Value,
    ttl: Duration,
    bytes: u32,
}

struct PerEntryTtl;

impl moka::Expiry<Key, Entry> for PerEntryTtl {
    fn expire_after_create(&self, _: &Key, entry: &Entry, _: Instant) -> Option<Duration> {
        Some(entry.ttl)
    }

    fn expire_after_update(
        &self,
        _: &Key,
        entry: &Entry,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

/// The store. Cloning shares it.
#[derive(Clone)]
pub struct Store {
    cache: Cache<Key, Entry>,
}

/// Fixed bookkeeping per entry on top of its payload (key, moka's node, Arcs).
const ENTRY_OVERHEAD: usize = 160;

impl Store {
    /// A store holding at most `max_bytes` of entries (payload plus overhead);
    /// evictions are counted in `evictions` by cause.
    pub fn new(max_bytes: u64, evictions: IntCounterVec) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_: &Key, e: &Entry| e.bytes)
            .expire_after(PerEntryTtl)
            .eviction_listener(move |_, _, cause| {
                let label = match cause {
                    RemovalCause::Size => "size",
                    RemovalCause::Expired => "expired",
                    RemovalCause::Explicit | RemovalCause::Replaced => return,
                };
                evictions.with_label_values(&[label]).inc();
            })
            .build();
        Store { cache }
    }

    /// The whole answer stored under `key`, fresh or not: the caller judges by
    /// `fresh_until` and `stored`.
    pub fn answer(&self, key: &CacheKey) -> Option<Arc<Answer>> {
        match self.cache.get(&Key::Answer(key.clone()))?.value {
            Value::Answer(a) => Some(a),
            Value::Chunk(_) => None,
        }
    }

    /// Keep `body` as the answer for `key`, stored at `now`: fresh for `fresh`,
    /// then kept up to `keep` in total for stale serving. (Eviction at the end of
    /// `keep` runs on the real clock; freshness and age are judged on `now`.) The
    /// answer as stored.
    #[allow(clippy::too_many_arguments)]
    pub fn put_answer(
        &self,
        key: CacheKey,
        body: Bytes,
        points: u64,
        sources: Sources,
        now: Instant,
        fresh: Duration,
        keep: Duration,
    ) -> Arc<Answer> {
        // The gzip copy is made later, on the first hit from a client that takes
        // it (Grafana always does), so its room is booked now: JSON answers shrink
        // about tenfold at the fast level, and an eighth leaves a margin.
        let gzip_room = if worth_gzipping(&body) {
            body.len() / 8
        } else {
            0
        };
        let bytes = weight(key.0.len() + body.len() + gzip_room);
        let answer = Arc::new(Answer {
            body,
            points,
            sources,
            stored: now,
            fresh_until: now + fresh,
            gzipped: OnceLock::new(),
        });
        self.cache.insert(
            Key::Answer(key),
            Entry {
                value: Value::Answer(answer.clone()),
                ttl: keep.max(fresh),
                bytes,
            },
        );
        answer
    }

    /// Chunk `index` (by [`super::extent::chunks_of`]) of the series `key`, if kept.
    pub fn chunk(&self, key: &SeriesKey, index: i64) -> Option<Arc<Chunk>> {
        match self.cache.get(&Key::Chunk(key.clone(), index))?.value {
            Value::Chunk(c) => Some(c),
            Value::Answer(_) => None,
        }
    }

    /// Keep `chunk` as chunk `index` of `key` for `ttl`, replacing what was there;
    /// its matrix is shrunk first, so the byte bound counts what it holds.
    pub fn put_chunk(&self, key: SeriesKey, index: i64, mut chunk: Chunk, ttl: Duration) {
        chunk.matrix.shrink_to_fit();
        let bytes = weight(key.0.len() + chunk.matrix.bytes());
        self.cache.insert(
            Key::Chunk(key, index),
            Entry {
                value: Value::Chunk(Arc::new(chunk)),
                ttl,
                bytes,
            },
        );
    }

    /// Entries and weighted bytes, after applying pending evictions.
    pub fn usage(&self) -> (u64, u64) {
        self.cache.run_pending_tasks();
        (self.cache.entry_count(), self.cache.weighted_size())
    }
}

fn weight(payload: usize) -> u32 {
    u32::try_from(payload + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Opts;

    fn evictions() -> IntCounterVec {
        IntCounterVec::new(Opts::new("e", "e"), &["cause"]).unwrap()
    }

    #[test]
    fn answers_are_kept_past_freshness_for_stale_use() {
        let store = Store::new(1 << 20, evictions());
        let key = CacheKey("k".into());
        store.put_answer(
            key.clone(),
            Bytes::from_static(b"{}"),
            0,
            Sources::default(),
            Instant::now(),
            Duration::ZERO,
            Duration::from_secs(60),
        );
        let a = store.answer(&key).unwrap();
        assert!(a.fresh_until <= Instant::now());
        assert_eq!(&a.body[..], b"{}");
    }

    #[test]
    fn gzip_copies_are_made_once_and_only_for_large_bodies() {
        use std::io::Read;
        let store = Store::new(1 << 20, evictions());
        let json = format!(
            "{{\"status\":\"success\",\"data\":\"{}\"}}",
            "ab".repeat(4096)
        );
        let key = CacheKey("big".into());
        store.put_answer(
            key.clone(),
            Bytes::from(json.clone()),
            0,
            Sources::default(),
            Instant::now(),
            Duration::from_secs(60),
            Duration::from_secs(60),
        );
        let answer = store.answer(&key).unwrap();
        let gz = answer.gzipped().unwrap().clone();
        assert!(gz.len() < json.len() / 10, "{} bytes", gz.len());
        assert_eq!(answer.gzipped().unwrap().as_ptr(), gz.as_ptr(), "made once");
        let mut plain = String::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_string(&mut plain)
            .unwrap();
        assert_eq!(plain, json);

        let small = CacheKey("small".into());
        store.put_answer(
            small.clone(),
            Bytes::from_static(b"{}"),
            0,
            Sources::default(),
            Instant::now(),
            Duration::from_secs(60),
            Duration::from_secs(60),
        );
        assert!(store.answer(&small).unwrap().gzipped().is_none());
    }

    #[test]
    fn the_byte_bound_holds() {
        let ev = evictions();
        let store = Store::new(100_000, ev.clone());
        for i in 0..1000 {
            store.put_answer(
                CacheKey(format!("k{i}").into()),
                Bytes::from(vec![b'x'; 1000]),
                0,
                Sources::default(),
                Instant::now(),
                Duration::from_secs(60),
                Duration::from_secs(60),
            );
        }
        let (entries, bytes) = store.usage();
        assert!(bytes <= 100_000, "{bytes}");
        assert!(entries < 100, "{entries}");
        assert!(ev.with_label_values(&["size"]).get() > 800);
    }
}
