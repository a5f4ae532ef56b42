//! The fleet's cache (L2): whole answers and range extents in Redis, behind each
//! replica's own (L1), and the lock that makes one replica fetch what several miss
//! at once.
//!
//! Writes never delay an answer: they run in the background after it is sent to
//! the caller's replica. Reads are bounded by the Redis timeout, and anything that
//! does not decode for its key (see [`super::envelope`]) is a miss. Freshness
//! travels as wall-clock times, so an answer is as fresh on every replica as on the
//! one that fetched it (replica clocks are assumed to agree within a second).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use prometheus::{IntCounterVec, Opts, Registry};
use redis::Script;
use tokio::task::JoinHandle;

use super::envelope::{Kind, Payload, decode, encode, redis_key};
use super::redis::Redis;
use crate::cache::extent::Span;
use crate::cache::key::{CacheKey, SeriesKey};
use crate::cache::matrix::Matrix;
use crate::cache::store::{self, Chunk, gunzip};
use crate::routing::Sources;
use crate::units::{millis, now_millis};

/// How long a fetch lock lives unless its holder extends it; a replica that dies
/// holding one blocks nobody for longer.
const LOCK_TTL: Duration = Duration::from_secs(3);
/// How often a holder extends its lock while its fetch runs.
const LOCK_REFRESH: Duration = Duration::from_secs(1);
/// How often a replica waiting on another's fetch looks for its answer.
const POLL: Duration = Duration::from_millis(20);

/// An answer read from the fleet's cache.
#[derive(Debug, Clone)]
pub struct SharedAnswer {
    /// The bytes to send, gzipped when they are worth it (see [`L2::plain`]).
    pub body: Payload,
    /// Points in a range answer, for the points-served metric.
    pub points: u64,
    /// How long ago the fetching replica stored it.
    pub age: Duration,
    /// How long it is fresh from when it was stored.
    pub fresh: Duration,
    /// The backends it came from.
    pub sources: Sources,
}

impl SharedAnswer {
    /// Fresh, or younger than `floor` (the caller's refresh floor).
    pub fn is_fresh(&self, floor: Duration) -> bool {
        self.age < self.fresh || self.age < floor
    }
}

/// One range extent chunk read from the fleet's cache.
pub struct SharedChunk {
    /// Its index among the series' chunks.
    pub index: i64,
    /// The grid timestamps it answers for.
    pub span: Span,
    /// Its series.
    pub matrix: Matrix,
    /// The backends its points came from.
    pub sources: Sources,
    /// How long it is kept from now.
    pub left: Duration,
}

/// What a replica that missed an answer should do.
pub enum Lead {
    /// Fetch it: with the fleet's lock (others wait for this fetch), or without
    /// one (Redis failing, or the wait ran out).
    Fetch(Option<FetchLock>),
    /// Another replica fetched it meanwhile.
    Answer(SharedAnswer),
}

/// The fleet's cache.
pub struct L2 {
    redis: Arc<Redis>,
    prefix: String,
    replica: String,
    tokens: AtomicU64,
    /// Values larger than this (compressed) are not written.
    max_value: usize,
    /// Values claiming more than this decompressed are misses.
    max_payload: usize,
    tier_hits: IntCounterVec,
    values: IntCounterVec,
    release: Script,
    extend: Script,
}

fn duration(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn chunk_key(series: &SeriesKey, index: i64) -> String {
    format!("{}\u{0}#{index}", series.0)
}

impl L2 {
    /// The fleet cache on `redis`, its keys under `prefix`; `replica` names this
    /// replica's locks.
    ///
    /// # Errors
    ///
    /// When its metrics cannot be registered.
    pub fn new(
        redis: Arc<Redis>,
        prefix: &str,
        replica: &str,
        max_value: usize,
        max_payload: usize,
        registry: &Registry,
    ) -> Result<Self, String> {
        let tier_hits = IntCounterVec::new(
            Opts::new(
                "cache_tier_hits_total",
                "Cache hits by tier: l1 (this replica's memory) or l2 (the fleet's Redis).",
            ),
            &["tier"],
        )
        .map_err(|e| e.to_string())?;
        let values = IntCounterVec::new(
            Opts::new(
                "cache_l2_values_total",
                "Fleet cache reads and writes by outcome: hit, miss, invalid (did not \
                 decode for its key), written, too_large, error.",
            ),
            &["op", "outcome"],
        )
        .map_err(|e| e.to_string())?;
        for collector in [
            Box::new(tier_hits.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(values.clone()),
        ] {
            registry.register(collector).map_err(|e| e.to_string())?;
        }
        Ok(L2 {
            redis,
            prefix: prefix.to_string(),
            replica: replica.to_string(),
            tokens: AtomicU64::new(0),
            max_value,
            max_payload,
            tier_hits,
            values,
            release: Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
            ),
            extend: Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0",
            ),
        })
    }

    /// Count a hit of this replica's own cache, for the per-tier metric.
    pub fn count_l1_hit(&self) {
        self.tier_hits.with_label_values(&["l1"]).inc();
    }

    /// Count a hit of the fleet's cache.
    pub fn count_l2_hit(&self) {
        self.tier_hits.with_label_values(&["l2"]).inc();
    }

    fn count(&self, op: &str, outcome: &str) {
        self.values.with_label_values(&[op, outcome]).inc();
    }

    /// The answer stored under `key`, fresh or not.
    pub async fn answer(&self, key: &CacheKey) -> Option<SharedAnswer> {
        let rkey = redis_key(&self.prefix, Kind::Answer, &key.0);
        let raw: Option<Vec<u8>> = match self
            .redis
            .query("get_answer", redis::cmd("GET").arg(&rkey))
            .await
        {
            Ok(raw) => raw,
            Err(_) => {
                self.count("get", "error");
                return None;
            }
        };
        self.read_answer(key, raw.as_deref())
    }

    fn read_answer(&self, key: &CacheKey, raw: Option<&[u8]>) -> Option<SharedAnswer> {
        let Some(raw) = raw else {
            self.count("get", "miss");
            return None;
        };
        let Some(decoded) = decode(raw, Kind::Answer, &key.0, self.max_payload) else {
            self.count("get", "invalid");
            return None;
        };
        let [stored, fresh, points, sources] = decoded.fields;
        let age = duration(now_millis().saturating_sub(stored));
        self.count("get", "hit");
        Some(SharedAnswer {
            body: decoded.payload,
            points: u64::try_from(points).unwrap_or(0),
            age,
            fresh: duration(fresh),
            sources: Sources::from_bits(sources),
        })
    }

    /// The answer's bytes uncompressed: a gzipped answer is inflated off the async
    /// threads. `None` (counted as invalid) for a stream that does not inflate
    /// within the payload limit.
    pub async fn plain(&self, answer: &SharedAnswer) -> Option<Bytes> {
        match &answer.body {
            Payload::Plain(body) => Some(body.clone()),
            Payload::Gzip(gzipped) => {
                let (gzipped, limit) = (gzipped.clone(), self.max_payload);
                let plain = tokio::task::spawn_blocking(move || gunzip(&gzipped, limit))
                    .await
                    .ok()
                    .flatten();
                if plain.is_none() {
                    self.count("get", "invalid");
                }
                plain
            }
        }
    }

    /// Store `answer` (just stored in this replica's cache) as the fleet's answer
    /// for `key`: fresh for `fresh`, kept `keep` (at least `fresh`) for stale
    /// serving. In the background, gzipped there when worth it (the copy this
    /// replica's own hits then send too); the write's task, so a [`FetchLock`] can
    /// be released only after it.
    pub fn put_answer(
        self: &Arc<Self>,
        key: &CacheKey,
        answer: Arc<store::Answer>,
        fresh: Duration,
        keep: Duration,
    ) -> JoinHandle<()> {
        let this = self.clone();
        let key = key.clone();
        let fields = [
            now_millis(),
            millis(fresh),
            i64::try_from(answer.points).unwrap_or(0),
            answer.sources.bits(),
        ];
        tokio::spawn(async move {
            let encoded = tokio::task::spawn_blocking({
                let key = key.clone();
                move || {
                    let payload = match answer.gzipped() {
                        Some(gzipped) => Payload::Gzip(gzipped.clone()),
                        None => Payload::Plain(answer.body.clone()),
                    };
                    encode(Kind::Answer, &key.0, fields, &payload)
                }
            })
            .await;
            if let Ok(value) = encoded {
                let rkey = redis_key(&this.prefix, Kind::Answer, &key.0);
                this.write(rkey, value, keep.max(fresh)).await;
            }
        })
    }

    async fn write(&self, rkey: String, value: Vec<u8>, keep: Duration) {
        if value.len() > self.max_value {
            self.count("set", "too_large");
            return;
        }
        let mut set = redis::cmd("SET");
        set.arg(&rkey).arg(value).arg("PX").arg(millis(keep).max(1));
        match self.redis.query::<()>("set", &set).await {
            Ok(()) => self.count("set", "written"),
            Err(_) => self.count("set", "error"),
        }
    }

    /// The chunks `indices` of the series `series` that the fleet holds.
    pub async fn chunks(&self, series: &SeriesKey, indices: &[i64]) -> Vec<SharedChunk> {
        if indices.is_empty() {
            return Vec::new();
        }
        let keys: Vec<String> = indices.iter().map(|&i| chunk_key(series, i)).collect();
        let mut get = redis::cmd("MGET");
        for key in &keys {
            get.arg(redis_key(&self.prefix, Kind::Chunk, key));
        }
        let Ok(raws) = self
            .redis
            .query::<Vec<Option<Vec<u8>>>>("get_chunks", &get)
            .await
        else {
            self.count("get", "error");
            return Vec::new();
        };
        let now = now_millis();
        let mut found = Vec::new();
        for ((index, key), raw) in indices.iter().zip(&keys).zip(raws) {
            let Some(raw) = raw else {
                self.count("get", "miss");
                continue;
            };
            let decoded = decode(&raw, Kind::Chunk, key, self.max_payload);
            let Some((decoded, matrix)) = decoded.and_then(|d| {
                let Payload::Plain(json) = &d.payload else {
                    return None;
                };
                let matrix = Matrix::parse(json).ok()?;
                Some((d, matrix))
            }) else {
                self.count("get", "invalid");
                continue;
            };
            let [from, to, expires, sources] = decoded.fields;
            self.count("get", "hit");
            found.push(SharedChunk {
                index: *index,
                span: Span { from, to },
                matrix,
                sources: Sources::from_bits(sources),
                left: duration(expires.saturating_sub(now)),
            });
        }
        found
    }

    /// Store chunk `index` of `series`, kept `ttl`. In the background.
    pub fn put_chunk(
        self: &Arc<Self>,
        series: &SeriesKey,
        index: i64,
        chunk: &Chunk,
        ttl: Duration,
    ) {
        let key = chunk_key(series, index);
        let value = encode(
            Kind::Chunk,
            &key,
            [
                chunk.span.from,
                chunk.span.to,
                now_millis().saturating_add(millis(ttl)),
                chunk.sources.bits(),
            ],
            &Payload::Plain(Bytes::from(chunk.matrix.to_json())),
        );
        let this = self.clone();
        tokio::spawn(async move {
            this.write(redis_key(&this.prefix, Kind::Chunk, &key), value, ttl)
                .await;
        });
    }

    /// Decide who fetches `key` in the fleet: this replica, holding the lock, when
    /// no other is fetching it; else wait, up to `wait`, for the other's answer,
    /// taking over if its lock goes without one (it failed, or died).
    pub async fn lead(self: &Arc<Self>, key: &CacheKey, wait: Duration) -> Lead {
        let lock = format!(
            "{}l:{}",
            self.prefix,
            &redis_key("", Kind::Answer, &key.0)[2..]
        );
        let token = format!(
            "{}:{}",
            self.replica,
            self.tokens.fetch_add(1, Ordering::Relaxed)
        );
        let answer_key = redis_key(&self.prefix, Kind::Answer, &key.0);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut take = redis::cmd("SET");
            take.arg(&lock)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(millis(LOCK_TTL));
            match self.redis.query::<Option<String>>("lock", &take).await {
                Ok(Some(_)) => {
                    return Lead::Fetch(Some(FetchLock::hold(self.clone(), lock, token)));
                }
                Ok(None) => {}
                Err(_) => return Lead::Fetch(None),
            }
            // Another replica fetches it: look for its answer until its lock goes.
            loop {
                if tokio::time::Instant::now() + POLL > deadline {
                    return Lead::Fetch(None);
                }
                tokio::time::sleep(POLL).await;
                let mut look = redis::pipe();
                look.cmd("GET").arg(&answer_key).cmd("EXISTS").arg(&lock);
                let Ok((raw, locked)) = self
                    .redis
                    .pipeline::<(Option<Vec<u8>>, bool)>("wait_fetch", &look)
                    .await
                else {
                    return Lead::Fetch(None);
                };
                if let Some(answer) = self
                    .read_answer(key, raw.as_deref())
                    .filter(|a| a.is_fresh(Duration::ZERO))
                {
                    return Lead::Answer(answer);
                }
                if !locked {
                    break;
                }
            }
        }
    }
}

/// The fleet's lock on one fetch: extended while held, released when dropped (the
/// fetch finished, failed or was abandoned), after the writes it was told of, so
/// that a replica waiting on it finds the answer before it finds the lock gone.
pub struct FetchLock {
    l2: Arc<L2>,
    key: String,
    token: String,
    refresher: JoinHandle<()>,
    writes: Vec<JoinHandle<()>>,
}

impl FetchLock {
    fn hold(l2: Arc<L2>, key: String, token: String) -> Self {
        let refresher = {
            let (l2, key, token) = (l2.clone(), key.clone(), token.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(LOCK_REFRESH);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let mut extend = l2.extend.key(&key);
                    extend.arg(&token).arg(millis(LOCK_TTL));
                    let _ = l2.redis.script::<i64>("lock_extend", &extend).await;
                }
            })
        };
        FetchLock {
            l2,
            key,
            token,
            refresher,
            writes: Vec::new(),
        }
    }

    /// Release only once `write` is done.
    pub fn after(&mut self, write: JoinHandle<()>) {
        self.writes.push(write);
    }
}

impl Drop for FetchLock {
    fn drop(&mut self) {
        self.refresher.abort();
        let (l2, key, token, writes) = (
            self.l2.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.token),
            std::mem::take(&mut self.writes),
        );
        // Outside a runtime (a shutdown) the lock simply expires.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for write in writes {
                    let _ = write.await;
                }
                let mut release = l2.release.key(&key);
                release.arg(&token);
                let _ = l2.redis.script::<i64>("unlock", &release).await;
            });
        }
    }
}
