//! Chunk ids and the encoding of chunk objects.
//!
//! A chunk object is `header ‖ payload`:
//!
//! | offset | size | field                                         |
//! |--------|------|-----------------------------------------------|
//! | 0      | 8    | magic `b"SRCHUNK1"` (the `1` is the version)  |
//! | 8      | 1    | codec: 0 = raw, 1 = zstd, 2 = delta, 3 = lz4  |
//! | 9      | 4    | plaintext length, u32 little-endian           |
//! | 13     | ...  | payload (plaintext, zstd frame or lz4 block)  |
//!
//! The id of a chunk is the BLAKE3 hash of its plaintext, so it does not
//! depend on the codec. A delta chunk holds only the 4 KiB pages in which
//! its plaintext differs from a base chunk (itself never a delta); reading
//! it needs the base, and the rebuilt plaintext is checked against the id
//! like any other. See `FORMAT.md`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::bufpool::Pool;
use crate::error::StoreError;

/// Magic bytes at the start of every chunk object (format version 1).
pub const CHUNK_MAGIC: &[u8; 8] = b"SRCHUNK1";
/// Length of the chunk object header.
pub const CHUNK_HEADER_LEN: usize = 13;
/// Largest plaintext a chunk may have (64 MiB).
pub const MAX_CHUNK_LEN: usize = 64 * 1024 * 1024;
/// Codec byte: payload is the plaintext.
pub const CODEC_RAW: u8 = 0;
/// Codec byte: payload is one zstd frame (written by earlier versions;
/// still read).
pub const CODEC_ZSTD: u8 = 1;
/// Codec byte: payload is one LZ4 block (no frame) that decompresses to
/// the declared plaintext length. Whole chunks are compressed this way.
pub const CODEC_LZ4: u8 = 3;
/// Codec byte: payload is a delta against a base chunk (see
/// [`encode_delta_chunk`]).
pub const CODEC_DELTA: u8 = 2;
/// Page size of delta chunks.
pub const DELTA_PAGE: usize = 4096;

/// zstd level used for the pages of delta chunks.
const ZSTD_LEVEL: i32 = 1;
/// Chunks at least this long are sampled before being compressed.
const SAMPLE_MIN_LEN: usize = 64 * 1024;
/// Size of the sample compressed to detect incompressible data.
const SAMPLE_LEN: usize = 4096;

/// The base of a delta chunk on a block of zeros (all-zero bytes: not the
/// hash of anything anyone will find). No object holds it — stores keep no
/// all-zero chunk — and a reader rebuilds such a delta on zeros. A block
/// that is zeros but for a few pages ships as such a delta instead of
/// whole. See FORMAT.md.
pub const ZERO_BASE: ChunkId = ChunkId([0; 32]);

/// The id of a chunk: the BLAKE3 hash of its plaintext.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id of `plain`.
    pub fn of(plain: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(plain).as_bytes())
    }

    /// The raw hash bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.to_hex())
    }
}

/// Why a string is not a chunk id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid chunk id {input:?}: expected 64 hexadecimal characters (a BLAKE3 hash), {reason}")]
pub struct ParseChunkIdError {
    input: String,
    reason: String,
}

impl FromStr for ChunkId {
    type Err = ParseChunkIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shown: String = s.chars().take(80).collect();
        if s.len() != 64 {
            return Err(ParseChunkIdError {
                input: shown,
                reason: format!("got {} characters", s.len()),
            });
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|e| ParseChunkIdError {
            input: shown,
            reason: e.to_string(),
        })?;
        Ok(ChunkId(out))
    }
}

impl Serialize for ChunkId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A chunk ready to be sent or stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedChunk {
    /// BLAKE3 of the plaintext.
    pub id: ChunkId,
    /// The chunk object (header and payload).
    pub bytes: Vec<u8>,
    /// Length of the plaintext.
    pub plain_len: u32,
}

/// True if every byte of `data` is zero (also for empty data).
pub fn is_all_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(16);
    let all_words = words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0);
    all_words && words.remainder().iter().all(|&b| b == 0)
}

fn header(codec: u8, plain_len: u32, payload_len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + payload_len);
    out.extend_from_slice(CHUNK_MAGIC);
    out.push(codec);
    out.extend_from_slice(&plain_len.to_le_bytes());
    out
}

fn raw_object(plain: &[u8], plain_len: u32) -> Vec<u8> {
    let mut out = header(CODEC_RAW, plain_len, plain.len());
    out.extend_from_slice(plain);
    out
}

fn check_chunk_len(plain: &[u8]) {
    assert!(
        plain.len() <= MAX_CHUNK_LEN,
        "chunk of {} bytes exceeds the maximum of {MAX_CHUNK_LEN}",
        plain.len()
    );
}

/// The LZ4 chunk object of `plain` if `compress` is set and compressing
/// makes it strictly smaller (see [`encode_chunk`]); `None` means raw.
fn compressed_object(plain: &[u8], compress: bool) -> Option<Vec<u8>> {
    if !compress || !worth_compressing(plain) {
        return None;
    }
    // The compressor wants room for its worst case: it writes into a
    // buffer from a shared pool, and only a smaller block is copied out.
    SCRATCH.with(|scratch| {
        scratch.resize(lz4_flex::block::get_maximum_output_size(plain.len()), 0);
        let n = lz4_flex::block::compress_into(plain, scratch).ok()?;
        let block = scratch.get(..n).filter(|b| b.len() < plain.len())?;
        let mut out = header(CODEC_LZ4, plain.len() as u32, block.len());
        out.extend_from_slice(block);
        Some(out)
    })
}

/// Encodes `plain` as a chunk object.
///
/// With `compress`, the payload is compressed with LZ4 and kept compressed
/// only if that makes it strictly smaller; chunks of 64 KiB or more whose
/// first 4 KiB do not compress at all are stored raw without trying the
/// whole chunk. (LZ4 rather than zstd: about 1.6 times faster to compress
/// and twice as fast to check, for a smaller ratio on text; the protected
/// machine pays for the compression, the target for the check.)
///
/// # Panics
///
/// If `plain` is longer than [`MAX_CHUNK_LEN`]: chunk sizes are chosen by the
/// program, never by data, so this is a programming error.
pub fn encode_chunk(plain: &[u8], compress: bool) -> EncodedChunk {
    encode_chunk_with_id(plain, ChunkId::of(plain), compress)
}

/// [`encode_chunk`] for a caller that has already hashed `plain`: `id`
/// must be [`ChunkId::of`]`(plain)` (a wrong id makes a chunk that every
/// reader rejects).
pub fn encode_chunk_with_id(plain: &[u8], id: ChunkId, compress: bool) -> EncodedChunk {
    check_chunk_len(plain);
    let plain_len = plain.len() as u32;
    let bytes = compressed_object(plain, compress).unwrap_or_else(|| raw_object(plain, plain_len));
    EncodedChunk {
        id,
        bytes,
        plain_len,
    }
}

/// Cheap test on a sample: false when the data is evidently incompressible.
fn worth_compressing(plain: &[u8]) -> bool {
    if plain.len() < SAMPLE_MIN_LEN {
        return !plain.is_empty();
    }
    let sample = &plain[..SAMPLE_LEN];
    let mut out = [0u8; lz4_flex::block::get_maximum_output_size(SAMPLE_LEN)];
    lz4_flex::block::compress_into(sample, &mut out).is_ok_and(|n| n < SAMPLE_LEN)
}

thread_local! {
    // One zstd context per thread, reused: creating a context for every
    // chunk cost about a tenth of the compression time itself.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn zstd_compress(data: &[u8]) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let c = match &mut *slot {
            Some(c) => c,
            empty => empty.insert(zstd::bulk::Compressor::new(ZSTD_LEVEL)?),
        };
        c.compress(data)
    })
}

/// Runs `f` with this thread's zstd decompression context.
fn with_decompressor<T>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let d = match &mut *slot {
            Some(d) => d,
            empty => empty.insert(zstd::bulk::Decompressor::new()?),
        };
        f(d)
    })
}

fn zstd_decompress(data: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    with_decompressor(|d| d.decompress(data, capacity))
}

/// The header fields of a chunk object, checked for shape but not content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// [`CODEC_RAW`], [`CODEC_ZSTD`], [`CODEC_LZ4`] or [`CODEC_DELTA`].
    pub codec: u8,
    /// Declared plaintext length.
    pub plain_len: u32,
}

/// Parses the header of a chunk object.
pub fn parse_chunk_header(id: ChunkId, bytes: &[u8]) -> Result<ChunkHeader, StoreError> {
    let corrupt = |reason: String| StoreError::CorruptChunk { id, reason };
    if bytes.len() < CHUNK_HEADER_LEN {
        return Err(corrupt(format!(
            "object is {} bytes, shorter than the {CHUNK_HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    if &bytes[..7] == b"SRCHUNK" && bytes[7] != b'1' && bytes[7].is_ascii_digit() {
        return Err(StoreError::UnsupportedVersion {
            what: format!("chunk {id}"),
            found: u32::from(bytes[7] - b'0'),
            supported: 1,
        });
    }
    if &bytes[..8] != CHUNK_MAGIC {
        return Err(corrupt(
            "bad magic bytes (not a siterec chunk object)".into(),
        ));
    }
    let codec = bytes[8];
    if !matches!(codec, CODEC_RAW | CODEC_ZSTD | CODEC_DELTA | CODEC_LZ4) {
        return Err(corrupt(format!("unknown codec {codec}")));
    }
    let plain_len = u32::from_le_bytes([bytes[9], bytes[10], bytes[11], bytes[12]]);
    if plain_len as usize > MAX_CHUNK_LEN {
        return Err(corrupt(format!(
            "declared plaintext length {plain_len} exceeds the maximum {MAX_CHUNK_LEN}"
        )));
    }
    Ok(ChunkHeader { codec, plain_len })
}

/// Decodes a chunk object and checks that its plaintext hashes to `id`.
///
/// Decompression never produces more than the declared plaintext length,
/// which itself is at most [`MAX_CHUNK_LEN`], so hostile input cannot make
/// this allocate without bound.
pub fn decode_chunk(id: ChunkId, bytes: &[u8]) -> Result<Vec<u8>, StoreError> {
    let plain = decode_chunk_unverified(id, bytes)?;
    let actual = ChunkId::of(&plain);
    if actual != id {
        return Err(StoreError::CorruptChunk {
            id,
            reason: format!("plaintext hashes to {actual}"),
        });
    }
    Ok(plain)
}

/// The id of a delta chunk: derived from the id of the plaintext it
/// rebuilds (`target`) and of its base, so that the same content stored
/// whole or as deltas against different bases never shares an object.
pub fn delta_id(target: ChunkId, base: ChunkId) -> ChunkId {
    let mut h = blake3::Hasher::new_derive_key("siterec delta chunk v1");
    h.update(target.as_bytes());
    h.update(base.as_bytes());
    ChunkId(*h.finalize().as_bytes())
}

/// Encodes a delta chunk: the plaintext whose id is `target` (and length
/// `plain_len`) is `base`'s plaintext with the 4 KiB pages listed in
/// `pages` (index, content) replaced. The chunk's id is
/// [`delta_id`]`(target, base)`. Page contents are zstd-compressed when
/// `compress` is set and that makes them smaller.
///
/// Payload: base id (32) ‖ target id (32) ‖ flags (1; bit 0 = pages
/// compressed) ‖ page count (u16 LE) ‖ page indexes (u16 LE each,
/// ascending) ‖ the pages' bytes, concatenated (the last page of a short
/// chunk may be short).
///
/// # Panics
///
/// If the pages are not ascending, out of range or of the wrong length:
/// they are computed by the program, never taken from input.
pub fn encode_delta_chunk(
    target: ChunkId,
    plain_len: u32,
    base: ChunkId,
    pages: &[(u16, &[u8])],
    compress: bool,
) -> EncodedChunk {
    let mut data = Vec::with_capacity(pages.len() * DELTA_PAGE);
    let mut last = None;
    for (index, page) in pages {
        assert!(last.is_none_or(|l| l < *index), "delta pages must ascend");
        assert_eq!(
            page.len(),
            delta_page_len(plain_len, *index),
            "delta page length"
        );
        last = Some(*index);
        data.extend_from_slice(page);
    }
    let (flags, data) = match compress.then(|| zstd_compress(&data)) {
        Some(Ok(z)) if z.len() < data.len() => (1u8, z),
        _ => (0u8, data),
    };
    let mut out = header(
        CODEC_DELTA,
        plain_len,
        DELTA_FIXED + pages.len() * 2 + data.len(),
    );
    out.extend_from_slice(base.as_bytes());
    out.extend_from_slice(target.as_bytes());
    out.push(flags);
    out.extend_from_slice(&(pages.len() as u16).to_le_bytes());
    for (index, _) in pages {
        out.extend_from_slice(&index.to_le_bytes());
    }
    out.extend_from_slice(&data);
    EncodedChunk {
        id: delta_id(target, base),
        bytes: out,
        plain_len,
    }
}

/// Bytes of a delta payload before the page indexes.
const DELTA_FIXED: usize = 32 + 32 + 1 + 2;

/// Length of page `index` in a chunk of `plain_len` bytes (0 if beyond).
fn delta_page_len(plain_len: u32, index: u16) -> usize {
    (plain_len as usize)
        .saturating_sub(usize::from(index) * DELTA_PAGE)
        .min(DELTA_PAGE)
}

/// A parsed delta chunk payload.
pub(crate) struct Delta {
    pub base: ChunkId,
    /// The id of the plaintext the delta rebuilds.
    pub target: ChunkId,
    pub plain_len: u32,
    /// (page index, page bytes).
    pub pages: Vec<(u16, Vec<u8>)>,
}

/// The base of a delta chunk object, or `None` for any other chunk.
pub fn delta_base(id: ChunkId, bytes: &[u8]) -> Result<Option<ChunkId>, StoreError> {
    let h = parse_chunk_header(id, bytes)?;
    if h.codec != CODEC_DELTA {
        return Ok(None);
    }
    Ok(Some(parse_delta(id, bytes)?.base))
}

/// Parses and checks the shape of delta chunk `id`, including that `id`
/// is the [`delta_id`] of its target and base.
pub(crate) fn parse_delta(id: ChunkId, bytes: &[u8]) -> Result<Delta, StoreError> {
    let d = parse_delta_unnamed(id, bytes)?;
    if delta_id(d.target, d.base) != id {
        return Err(StoreError::CorruptChunk {
            id,
            reason: format!(
                "it names base {} and target {}, which do not make its id",
                d.base, d.target
            ),
        });
    }
    Ok(d)
}

/// [`parse_delta`] without checking the id (`id` only names the chunk in
/// errors): for objects whose name does not reveal their id.
pub(crate) fn parse_delta_unnamed(id: ChunkId, bytes: &[u8]) -> Result<Delta, StoreError> {
    let corrupt = |reason: String| StoreError::CorruptChunk { id, reason };
    let h = parse_chunk_header(id, bytes)?;
    let p = &bytes[CHUNK_HEADER_LEN..];
    if h.codec != CODEC_DELTA || p.len() < DELTA_FIXED {
        return Err(corrupt(
            "not a delta chunk, or its payload is truncated".into(),
        ));
    }
    let (mut base, mut target) = ([0u8; 32], [0u8; 32]);
    base.copy_from_slice(&p[..32]);
    target.copy_from_slice(&p[32..64]);
    let (base, target) = (ChunkId(base), ChunkId(target));
    let flags = p[64];
    let count = usize::from(u16::from_le_bytes([p[65], p[66]]));
    let index_end = DELTA_FIXED + count * 2;
    if p.len() < index_end {
        return Err(corrupt("delta page list is truncated".into()));
    }
    let indexes: Vec<u16> = p[DELTA_FIXED..index_end]
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    let mut expected = 0usize;
    for (k, &i) in indexes.iter().enumerate() {
        let len = delta_page_len(h.plain_len, i);
        if len == 0 || (k > 0 && indexes[k - 1] >= i) {
            return Err(corrupt(format!(
                "delta page {i} is out of order or out of range"
            )));
        }
        expected += len;
    }
    let data = match flags {
        0 => p[index_end..].to_vec(),
        1 => zstd_decompress(&p[index_end..], expected)
            .map_err(|e| corrupt(format!("delta pages do not decompress: {e}")))?,
        f => return Err(corrupt(format!("unknown delta flags {f}"))),
    };
    if data.len() != expected {
        return Err(corrupt(format!(
            "delta pages hold {} bytes, {expected} expected",
            data.len()
        )));
    }
    let mut pages = Vec::with_capacity(count);
    let mut at = 0;
    for i in indexes {
        let len = delta_page_len(h.plain_len, i);
        pages.push((i, data[at..at + len].to_vec()));
        at += len;
    }
    Ok(Delta {
        base,
        target,
        plain_len: h.plain_len,
        pages,
    })
}

/// Rebuilds a delta chunk's plaintext from its base's (unverified: the
/// caller hashes the result).
pub(crate) fn apply_delta(id: ChunkId, delta: &Delta, base: &[u8]) -> Result<Vec<u8>, StoreError> {
    apply_delta_in_place(id, delta, base.to_vec())
}

/// [`apply_delta`] on the base's plaintext itself: its pages are replaced
/// where it lies (no copy of the megabyte).
pub(crate) fn apply_delta_in_place(
    id: ChunkId,
    delta: &Delta,
    mut plain: Vec<u8>,
) -> Result<Vec<u8>, StoreError> {
    if plain.len() != delta.plain_len as usize {
        return Err(StoreError::CorruptChunk {
            id,
            reason: format!(
                "its base {} is {} bytes long, the delta {}",
                delta.base,
                plain.len(),
                delta.plain_len
            ),
        });
    }
    for (i, page) in &delta.pages {
        let at = usize::from(*i) * DELTA_PAGE;
        plain[at..at + page.len()].copy_from_slice(page);
    }
    Ok(plain)
}

/// What [`check_chunk`] found in a valid chunk object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkContent {
    /// The plaintext is all zeros (stores keep no such chunk).
    Zero,
    /// Anything else.
    Data,
}

/// Checks a chunk object (not a delta) against its id, as
/// [`decode_chunk`] does, without keeping the plaintext: a raw payload is
/// hashed where it lies, a compressed one is decompressed into a buffer
/// from a shared pool.
pub fn check_chunk(id: ChunkId, bytes: &[u8]) -> Result<ChunkContent, StoreError> {
    let h = parse_chunk_header(id, bytes)?;
    SCRATCH.with(|scratch| {
        let plain = plaintext(id, h, &bytes[CHUNK_HEADER_LEN..], scratch)?;
        let actual = ChunkId::of(plain);
        if actual != id {
            return Err(StoreError::CorruptChunk {
                id,
                reason: format!("plaintext hashes to {actual}"),
            });
        }
        Ok(if is_all_zero(plain) {
            ChunkContent::Zero
        } else {
            ChunkContent::Data
        })
    })
}

/// The plaintext of a whole (non-delta) chunk's `payload`, checked
/// against the declared length `h.plain_len`: a raw payload itself, a
/// compressed one decompressed into `out`. Decompression never writes more
/// than the declared length (itself at most [`MAX_CHUNK_LEN`]) plus what
/// `out` already holds, so hostile input cannot make it allocate without
/// bound.
fn plaintext<'a>(
    id: ChunkId,
    h: ChunkHeader,
    payload: &'a [u8],
    out: &'a mut Vec<u8>,
) -> Result<&'a [u8], StoreError> {
    let corrupt = |reason: String| StoreError::CorruptChunk { id, reason };
    let plain_len = h.plain_len as usize;
    let (name, decompressed) = match h.codec {
        CODEC_RAW => {
            if payload.len() != plain_len {
                return Err(corrupt(format!(
                    "raw payload is {} bytes but the header declares {plain_len}",
                    payload.len()
                )));
            }
            return Ok(payload);
        }
        CODEC_LZ4 => {
            // Every byte is overwritten by a valid block: only growing the
            // buffer needs zeros.
            out.resize(plain_len, 0);
            let n = lz4_flex::block::decompress_into(payload, out);
            ("lz4", n.map_err(|e| e.to_string()))
        }
        CODEC_ZSTD => {
            out.clear();
            out.reserve(plain_len);
            let n = with_decompressor(|d| d.decompress_to_buffer(payload, out));
            ("zstd", n.map_err(|e| e.to_string()))
        }
        _ => {
            return Err(corrupt(
                "a delta chunk where a full chunk is required (deltas of deltas are not allowed)"
                    .into(),
            ));
        }
    };
    match decompressed {
        Err(e) => Err(corrupt(format!("{name} payload does not decompress: {e}"))),
        Ok(n) if n != plain_len => Err(corrupt(format!(
            "{name} payload decompresses to {n} bytes but the header declares {plain_len}"
        ))),
        Ok(_) => Ok(&out[..plain_len]),
    }
}

/// Largest scratch buffer kept between chunks.
const SCRATCH_KEEP: usize = 4 << 20;

/// Scratch buffers: the plaintext of a chunk being checked (see
/// [`check_chunk`]) or the compressor's output (see `compressed_object`).
static SCRATCH: Pool = Pool::new(8, SCRATCH_KEEP);

/// Decodes a chunk object without comparing its hash to anything; `id`
/// only names the chunk in errors. The caller must hash the result.
/// Delta chunks are refused here: they need their base (the store
/// resolves them).
pub(crate) fn decode_chunk_unverified(id: ChunkId, bytes: &[u8]) -> Result<Vec<u8>, StoreError> {
    let h = parse_chunk_header(id, bytes)?;
    let payload = &bytes[CHUNK_HEADER_LEN..];
    let mut out = Vec::new();
    plaintext(id, h, payload, &mut out)?;
    Ok(if h.codec == CODEC_RAW {
        payload.to_vec()
    } else {
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngCore;

    fn text(len: usize) -> Vec<u8> {
        let line = b"2024-05-01T12:00:00Z INFO replication of disk scsi0 progressing, 42% done\n";
        line.iter().copied().cycle().take(len).collect()
    }

    fn random(len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        rand::rng().fill_bytes(&mut v);
        v
    }

    #[test]
    fn round_trip_text_is_compressed() {
        let plain = text(1 << 20);
        let enc = encode_chunk(&plain, true);
        assert_eq!(enc.id, ChunkId::of(&plain));
        assert_eq!(enc.plain_len as usize, plain.len());
        assert_eq!(enc.bytes[8], CODEC_LZ4);
        assert!(enc.bytes.len() < plain.len() / 10, "{}", enc.bytes.len());
        assert_eq!(decode_chunk(enc.id, &enc.bytes).unwrap(), plain);
    }

    #[test]
    fn round_trip_random_is_raw() {
        for len in [100, 4096, 100_000, 1 << 20] {
            let plain = random(len);
            let enc = encode_chunk(&plain, true);
            assert_eq!(enc.bytes[8], CODEC_RAW, "len {len}");
            assert_eq!(enc.bytes.len(), CHUNK_HEADER_LEN + len);
            assert_eq!(decode_chunk(enc.id, &enc.bytes).unwrap(), plain);
        }
    }

    #[test]
    fn round_trip_zeroish_and_uncompressed() {
        let mut plain = vec![0u8; 65536];
        plain[40_000] = 7;
        assert!(!is_all_zero(&plain));
        let enc = encode_chunk(&plain, true);
        assert_eq!(enc.bytes[8], CODEC_LZ4);
        assert!(enc.bytes.len() < 1000);
        assert_eq!(decode_chunk(enc.id, &enc.bytes).unwrap(), plain);

        let enc_raw = encode_chunk(&plain, false);
        assert_eq!(enc_raw.bytes[8], CODEC_RAW);
        assert_eq!(enc_raw.id, enc.id);
        assert_eq!(decode_chunk(enc.id, &enc_raw.bytes).unwrap(), plain);
    }

    #[test]
    fn all_zero_detection() {
        assert!(is_all_zero(&[]));
        assert!(is_all_zero(&[0; 4096]));
        assert!(is_all_zero(&[0; 33]));
        for len in [1usize, 15, 16, 17, 4096, 4099] {
            for pos in [0, len / 2, len - 1] {
                let mut v = vec![0u8; len];
                v[pos] = 0x80;
                assert!(!is_all_zero(&v), "len {len} pos {pos}");
            }
        }
    }

    #[test]
    fn corruption_is_detected() {
        let plain = text(100_000);
        for compress in [false, true] {
            let enc = encode_chunk(&plain, compress);
            for pos in [CHUNK_HEADER_LEN, enc.bytes.len() / 2, enc.bytes.len() - 1] {
                let mut bad = enc.bytes.clone();
                bad[pos] ^= 0x01;
                let err = decode_chunk(enc.id, &bad).unwrap_err();
                assert!(matches!(err, StoreError::CorruptChunk { .. }), "{err}");
            }
            // Truncation, bad magic, bad codec, wrong id.
            assert!(decode_chunk(enc.id, &enc.bytes[..enc.bytes.len() - 1]).is_err());
            assert!(decode_chunk(enc.id, &enc.bytes[..5]).is_err());
            let mut bad = enc.bytes.clone();
            bad[0] = b'X';
            assert!(decode_chunk(enc.id, &bad).is_err());
            let mut bad = enc.bytes.clone();
            bad[8] = 9;
            assert!(decode_chunk(enc.id, &bad).is_err());
            assert!(decode_chunk(ChunkId::of(b"other"), &enc.bytes).is_err());
        }
    }

    #[test]
    fn oversized_and_lying_lengths_rejected() {
        let enc = encode_chunk(&text(10_000), true);
        let mut bad = enc.bytes.clone();
        bad[9..13].copy_from_slice(&(MAX_CHUNK_LEN as u32 + 1).to_le_bytes());
        assert!(decode_chunk(enc.id, &bad).is_err());
        // Declared length smaller than the real output: bounded decompression fails.
        let mut bad = enc.bytes.clone();
        bad[9..13].copy_from_slice(&100u32.to_le_bytes());
        assert!(decode_chunk(enc.id, &bad).is_err());
    }

    #[test]
    fn encoding_round_trips_mixed_content() {
        let mut mixed = text(300_000);
        mixed.extend(random(300_000));
        for plain in [
            text(1 << 20),
            random(1 << 20),
            mixed,
            b"tiny".to_vec(),
            Vec::new(),
        ] {
            for compress in [false, true] {
                let id = ChunkId::of(&plain);
                let enc = encode_chunk_with_id(&plain, id, compress);
                assert_eq!(enc, encode_chunk(&plain, compress));
                assert_eq!(decode_chunk(id, &enc.bytes).unwrap(), plain);
            }
        }
        // Text is compressed, random data stays raw.
        let t = text(1 << 20);
        let enc = encode_chunk_with_id(&t, ChunkId::of(&t), true);
        assert_eq!(enc.bytes[8], CODEC_LZ4);
        assert!(enc.bytes.len() < t.len() / 4);
        let r = random(1 << 20);
        let enc = encode_chunk_with_id(&r, ChunkId::of(&r), true);
        assert_eq!(enc.bytes[8], CODEC_RAW);
        assert_eq!(&enc.bytes[CHUNK_HEADER_LEN..], &r[..]);
    }

    #[test]
    fn check_chunk_agrees_with_decode() {
        let zeros = vec![0u8; 1 << 20];
        for (plain, want) in [
            (text(1 << 20), ChunkContent::Data),
            (random(200_000), ChunkContent::Data),
            (zeros.clone(), ChunkContent::Zero),
        ] {
            for compress in [false, true] {
                let enc = encode_chunk(&plain, compress);
                assert_eq!(check_chunk(enc.id, &enc.bytes).unwrap(), want);
                // Every corruption decode_chunk finds, check_chunk finds.
                for pos in [CHUNK_HEADER_LEN, enc.bytes.len() / 2, enc.bytes.len() - 1] {
                    let mut bad = enc.bytes.clone();
                    bad[pos] ^= 0x01;
                    let err = check_chunk(enc.id, &bad).unwrap_err();
                    assert!(matches!(err, StoreError::CorruptChunk { .. }), "{err}");
                }
                assert!(check_chunk(enc.id, &enc.bytes[..enc.bytes.len() - 1]).is_err());
                assert!(check_chunk(ChunkId::of(b"other"), &enc.bytes).is_err());
            }
        }
        // Lying lengths: larger than the maximum, smaller than the output.
        let enc = encode_chunk(&text(100_000), true);
        let mut bad = enc.bytes.clone();
        bad[9..13].copy_from_slice(&(MAX_CHUNK_LEN as u32 + 1).to_le_bytes());
        assert!(check_chunk(enc.id, &bad).is_err());
        let mut bad = enc.bytes.clone();
        bad[9..13].copy_from_slice(&100u32.to_le_bytes());
        assert!(matches!(
            check_chunk(enc.id, &bad),
            Err(StoreError::CorruptChunk { .. })
        ));
        // After a large chunk, the thread's buffer does not let a small
        // declared length accept a longer output.
        let big = encode_chunk(&text(1 << 20), true);
        check_chunk(big.id, &big.bytes).unwrap();
        assert!(check_chunk(enc.id, &bad).is_err());
        // A delta is not a whole chunk.
        let base = text(DELTA_PAGE * 2);
        let mut target = base.clone();
        target[0] = b'#';
        let delta = encode_delta_chunk(
            ChunkId::of(&target),
            target.len() as u32,
            ChunkId::of(&base),
            &[(0, &target[..DELTA_PAGE])],
            false,
        );
        assert!(check_chunk(delta.id, &delta.bytes).is_err());
    }

    /// A chunk object as versions before LZ4 wrote them: a zstd frame.
    fn zstd_object(plain: &[u8]) -> Vec<u8> {
        let mut out = header(CODEC_ZSTD, plain.len() as u32, 0);
        out.extend(zstd::bulk::compress(plain, ZSTD_LEVEL).unwrap());
        out
    }

    #[test]
    fn zstd_chunks_of_earlier_versions_still_read() {
        let plain = text(1 << 20);
        let id = ChunkId::of(&plain);
        let obj = zstd_object(&plain);
        assert!(obj.len() < plain.len() / 10);
        assert_eq!(decode_chunk(id, &obj).unwrap(), plain);
        assert_eq!(check_chunk(id, &obj).unwrap(), ChunkContent::Data);
        let zeros = vec![0u8; 100_000];
        let z = zstd_object(&zeros);
        assert_eq!(
            check_chunk(ChunkId::of(&zeros), &z).unwrap(),
            ChunkContent::Zero
        );
        for pos in [CHUNK_HEADER_LEN + 3, obj.len() / 2, obj.len() - 1] {
            let mut bad = obj.clone();
            bad[pos] ^= 0x10;
            assert!(matches!(
                decode_chunk(id, &bad),
                Err(StoreError::CorruptChunk { .. })
            ));
            assert!(matches!(
                check_chunk(id, &bad),
                Err(StoreError::CorruptChunk { .. })
            ));
        }
        // Declared length smaller than the frame's output.
        let mut bad = obj.clone();
        bad[9..13].copy_from_slice(&1000u32.to_le_bytes());
        assert!(decode_chunk(id, &bad).is_err());
        assert!(check_chunk(id, &bad).is_err());
    }

    #[test]
    fn newer_chunk_version_rejected() {
        let mut enc = encode_chunk(b"hello", false).bytes;
        enc[7] = b'2';
        let err = decode_chunk(ChunkId::of(b"hello"), &enc).unwrap_err();
        assert!(
            matches!(err, StoreError::UnsupportedVersion { found: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn chunk_id_hex_and_serde() {
        let id = ChunkId::of(b"abc");
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<ChunkId>().unwrap(), id);
        assert_eq!(s.to_uppercase().parse::<ChunkId>().unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<ChunkId>(&json).unwrap(), id);
        let err = "abc".parse::<ChunkId>().unwrap_err().to_string();
        assert!(err.contains("64 hexadecimal"), "{err}");
        assert!(s.replace(&s[..1], "g").parse::<ChunkId>().is_err());
        assert!(serde_json::from_str::<ChunkId>("\"zz\"").is_err());
    }
}
