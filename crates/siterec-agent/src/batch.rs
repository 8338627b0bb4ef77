//! Chunk batches: many small encoded chunks in one request.
//!
//! A 1% scattered change touches nine in ten of a disk's 1 MiB blocks, and
//! each then ships as a delta chunk of a few KiB. One request per chunk
//! costs more than the data: the source sends such chunks in batches, as
//! the body of `POST /data/v1/items/{item}/chunks`.
//!
//! Body (version 1): the magic `SRCB`, a version byte `1`, then for each
//! chunk its 32-byte id, its length as a little-endian `u32` and its
//! encoded bytes (the same bytes `PUT chunks/{id}` takes), to the end of
//! the body. At most [`MAX_BATCH_CHUNKS`] chunks.

use siterec_store::ChunkId;

const MAGIC: &[u8; 4] = b"SRCB";
const VERSION: u8 = 1;
/// Chunks per batch at most (the source sends at most this many).
pub const MAX_BATCH_CHUNKS: usize = 256;
/// Encoded bytes the source gathers into one batch before sending it.
pub const BATCH_BYTES: usize = 1 << 20;

/// Encodes chunks `(id, encoded bytes)` as a batch body.
pub fn encode(chunks: &[(ChunkId, Vec<u8>)]) -> Vec<u8> {
    let len: usize = chunks.iter().map(|(_, b)| 36 + b.len()).sum();
    let mut out = Vec::with_capacity(5 + len);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    for (id, bytes) in chunks {
        out.extend_from_slice(&id.0);
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    out
}

/// Splits a batch body into its chunks, as byte ranges of `body`; the
/// error says what is wrong with it.
pub fn decode(body: &[u8]) -> Result<Vec<(ChunkId, std::ops::Range<usize>)>, String> {
    let rest = body
        .strip_prefix(MAGIC.as_slice())
        .ok_or("not a chunk batch (the body does not start with SRCB)")?;
    match rest.first() {
        Some(&VERSION) => {}
        Some(v) => {
            return Err(format!(
                "chunk batch version {v} is not supported (only {VERSION})"
            ));
        }
        None => return Err("chunk batch ends after its magic".into()),
    }
    let mut at = 5;
    let mut out = Vec::new();
    while at < body.len() {
        if out.len() == MAX_BATCH_CHUNKS {
            return Err(format!(
                "chunk batch holds more than {MAX_BATCH_CHUNKS} chunks"
            ));
        }
        let head = body
            .get(at..at + 36)
            .ok_or_else(|| format!("chunk batch truncated in the header of chunk {}", out.len()))?;
        let mut id = [0u8; 32];
        id.copy_from_slice(&head[..32]);
        let len = u32::from_le_bytes([head[32], head[33], head[34], head[35]]) as usize;
        let start = at + 36;
        let end = start
            .checked_add(len)
            .filter(|e| *e <= body.len())
            .ok_or_else(|| {
                format!(
                    "chunk batch truncated: chunk {} claims {len} bytes, {} remain",
                    out.len(),
                    body.len() - start
                )
            })?;
        out.push((ChunkId(id), start..end));
        at = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip() {
        let chunks = vec![
            (ChunkId([1; 32]), vec![9u8; 100]),
            (ChunkId([2; 32]), Vec::new()),
            (ChunkId([3; 32]), vec![7u8; 5000]),
        ];
        let body = encode(&chunks);
        let back = decode(&body).unwrap();
        assert_eq!(back.len(), 3);
        for ((id, bytes), (id2, range)) in chunks.iter().zip(&back) {
            assert_eq!(id, id2);
            assert_eq!(&body[range.clone()], bytes.as_slice());
        }
        assert!(decode(&encode(&[])).unwrap().is_empty());
    }

    #[test]
    fn damaged_batches_are_refused_with_a_reason() {
        let body = encode(&[(ChunkId([1; 32]), vec![9u8; 100])]);
        for cut in [0, 3, 4, 5 + 20, body.len() - 1] {
            assert!(decode(&body[..cut]).is_err(), "cut at {cut} accepted");
        }
        assert!(decode(b"SRCB\x02").unwrap_err().contains("version 2"));
        assert!(decode(b"XXXX\x01").unwrap_err().contains("SRCB"));
        let mut huge = body.clone();
        huge[5 + 32..5 + 36].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge).unwrap_err().contains("truncated"));
        let many: Vec<_> = (0..=MAX_BATCH_CHUNKS)
            .map(|i| (ChunkId([i as u8; 32]), vec![1u8]))
            .collect();
        assert!(decode(&encode(&many)).unwrap_err().contains("more than"));
    }
}
