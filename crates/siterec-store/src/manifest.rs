//! Manifests: the description of one recovery point, and their encoding.

use serde::{Deserialize, Serialize};
use siterec_core::Consistency;

use crate::chunk::{ChunkId, MAX_CHUNK_LEN};
use crate::error::StoreError;

/// Magic bytes at the start of every manifest.
pub const MANIFEST_MAGIC: &[u8; 8] = b"SRMANIFS";
/// The manifest format version this build writes and the newest it reads
/// (version 2 added the delta bases section; version 1 is still read).
pub const MANIFEST_VERSION: u32 = 2;
/// Largest JSON header accepted (16 MiB).
const MAX_HEADER_LEN: usize = 16 * 1024 * 1024;
const ENTRY_LEN: usize = 33;
const ENTRY_ZERO: u8 = 0;
const ENTRY_CHUNK: u8 = 1;
const TRAILER_LEN: usize = 32;
const MAX_NAME_LEN: usize = 128;
const MAX_DISK_ID_LEN: usize = 256;

/// A recovery point: for each disk, the chunk holding each block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The protected item (VM) this point belongs to.
    pub item: String,
    /// Unique id of the point within its item.
    pub point_id: String,
    /// When the point was taken at the source, Unix milliseconds.
    pub created_at_unix_ms: i64,
    /// How consistent the point is.
    pub consistency: Consistency,
    /// The disks, in the VM's order.
    pub disks: Vec<DiskManifest>,
    /// For each referenced delta chunk, the base chunk it is read against
    /// (so that commit checks and garbage collection see the bases too).
    pub bases: std::collections::BTreeMap<ChunkId, ChunkId>,
}

/// One disk of a recovery point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskManifest {
    /// Id of the disk within the item.
    pub disk_id: String,
    /// Size of the disk in bytes.
    pub size: u64,
    /// Size of every chunk but possibly the last, which may be short.
    pub chunk_size: u32,
    /// Chunk `i` covers bytes `i * chunk_size ..` of the disk; `None` is an
    /// all-zero block. `chunks.len() == ceil(size / chunk_size)`.
    pub chunks: Vec<Option<ChunkId>>,
}

impl DiskManifest {
    /// How many chunks a disk of `size` bytes has with `chunk_size` chunks.
    pub fn chunk_count_for(size: u64, chunk_size: u32) -> u64 {
        if chunk_size == 0 {
            return 0;
        }
        size.div_ceil(u64::from(chunk_size))
    }

    /// Byte offset of chunk `index` in the disk.
    pub fn offset_of(&self, index: usize) -> u64 {
        index as u64 * u64::from(self.chunk_size)
    }

    /// Length in bytes of chunk `index` (the last one may be short); 0 if
    /// `index` is past the end.
    pub fn len_of(&self, index: usize) -> u64 {
        let start = self.offset_of(index);
        self.size
            .saturating_sub(start)
            .min(u64::from(self.chunk_size))
    }

    fn check(&self) -> Result<(), String> {
        if self.disk_id.is_empty() || self.disk_id.len() > MAX_DISK_ID_LEN {
            return Err(format!(
                "disk id {:?} must be 1 to {MAX_DISK_ID_LEN} bytes",
                self.disk_id
            ));
        }
        if self.disk_id.chars().any(char::is_control) {
            return Err(format!(
                "disk id {:?} contains control characters",
                self.disk_id
            ));
        }
        if self.chunk_size == 0 || self.chunk_size as usize > MAX_CHUNK_LEN {
            return Err(format!(
                "disk {}: chunk size {} must be between 1 and {MAX_CHUNK_LEN}",
                self.disk_id, self.chunk_size
            ));
        }
        let expected = Self::chunk_count_for(self.size, self.chunk_size);
        if self.chunks.len() as u64 != expected {
            return Err(format!(
                "disk {}: {} chunk entries, but a {}-byte disk in {}-byte chunks needs {expected}",
                self.disk_id,
                self.chunks.len(),
                self.size,
                self.chunk_size
            ));
        }
        Ok(())
    }
}

/// Checks an item name or point id (they are used in keys): 1 to 128
/// characters from `[A-Za-z0-9._-]`, not starting with `.`.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), StoreError> {
    let bad = |reason: &str| StoreError::InvalidName {
        what,
        name: name.chars().take(200).collect(),
        reason: reason.to_string(),
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad("too long"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(bad(&format!("character {c:?} is not allowed")));
    }
    if name.starts_with('.') {
        return Err(bad("starts with '.'"));
    }
    Ok(())
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    item: String,
    point_id: String,
    created_at_unix_ms: i64,
    consistency: Consistency,
    disks: Vec<DiskHeader>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskHeader {
    disk_id: String,
    size: u64,
    chunk_size: u32,
    chunk_count: u64,
}

impl Manifest {
    /// Checks that the manifest can be committed: valid names, unique disk
    /// ids, chunk sizes in range and chunk counts that match disk sizes.
    pub fn validate(&self) -> Result<(), StoreError> {
        validate_name("item", &self.item)?;
        validate_name("point id", &self.point_id)?;
        let invalid = |reason: String| StoreError::InvalidManifest {
            item: self.item.clone(),
            point_id: self.point_id.clone(),
            reason,
        };
        let mut seen = std::collections::HashSet::new();
        for d in &self.disks {
            d.check().map_err(invalid)?;
            if !seen.insert(d.disk_id.as_str()) {
                return Err(invalid(format!("disk id {} appears twice", d.disk_id)));
            }
        }
        if !self.bases.is_empty() {
            let used: std::collections::HashSet<ChunkId> = self
                .disks
                .iter()
                .flat_map(|d| d.chunks.iter().flatten().copied())
                .collect();
            for (delta, base) in &self.bases {
                if delta == base || !used.contains(delta) || self.bases.contains_key(base) {
                    return Err(invalid(format!(
                        "delta chunk {delta} with base {base}: a delta must be referenced, and its base must differ and not be a delta"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Every distinct chunk the manifest references, delta bases included.
    pub fn referenced_chunks(&self) -> std::collections::HashSet<ChunkId> {
        self.disks
            .iter()
            .flat_map(|d| d.chunks.iter().flatten().copied())
            .chain(self.bases.values().copied())
            // A delta on zeros has no base object.
            .filter(|id| *id != crate::chunk::ZERO_BASE)
            .collect()
    }

    /// Encodes the manifest (format version 1, see `FORMAT.md`).
    ///
    /// Encoding does not validate: [`Manifest::decode`] rejects what
    /// [`Manifest::validate`] would.
    pub fn encode(&self) -> Vec<u8> {
        let header = Header {
            item: self.item.clone(),
            point_id: self.point_id.clone(),
            created_at_unix_ms: self.created_at_unix_ms,
            consistency: self.consistency,
            disks: self
                .disks
                .iter()
                .map(|d| DiskHeader {
                    disk_id: d.disk_id.clone(),
                    size: d.size,
                    chunk_size: d.chunk_size,
                    chunk_count: d.chunks.len() as u64,
                })
                .collect(),
        };
        // Serializing plain strings and integers to JSON cannot fail.
        let json = serde_json::to_vec(&header).unwrap_or_default();
        let entries: usize = self.disks.iter().map(|d| d.chunks.len()).sum();
        let mut out = Vec::with_capacity(16 + json.len() + entries * ENTRY_LEN + TRAILER_LEN);
        out.extend_from_slice(MANIFEST_MAGIC);
        out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        for d in &self.disks {
            for c in &d.chunks {
                match c {
                    None => {
                        out.push(ENTRY_ZERO);
                        out.extend_from_slice(&[0u8; 32]);
                    }
                    Some(id) => {
                        out.push(ENTRY_CHUNK);
                        out.extend_from_slice(id.as_bytes());
                    }
                }
            }
        }
        out.extend_from_slice(&(self.bases.len() as u32).to_le_bytes());
        for (delta, base) in &self.bases {
            out.extend_from_slice(delta.as_bytes());
            out.extend_from_slice(base.as_bytes());
        }
        let trailer = blake3::hash(&out);
        out.extend_from_slice(trailer.as_bytes());
        out
    }

    /// Decodes and verifies a manifest.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, StoreError> {
        Self::decode_named("manifest", bytes)
    }

    /// Like [`Manifest::decode`], naming the object `what` in errors.
    pub fn decode_named(what: &str, bytes: &[u8]) -> Result<Manifest, StoreError> {
        let corrupt = |reason: String| StoreError::CorruptManifest {
            what: what.to_string(),
            reason,
        };
        if bytes.len() < 8 + 4 {
            return Err(corrupt(format!("only {} bytes long", bytes.len())));
        }
        if &bytes[..8] != MANIFEST_MAGIC {
            return Err(corrupt("bad magic bytes (not a siterec manifest)".into()));
        }
        let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if version > MANIFEST_VERSION {
            return Err(StoreError::UnsupportedVersion {
                what: what.to_string(),
                found: version,
                supported: MANIFEST_VERSION,
            });
        }
        if version == 0 {
            return Err(corrupt("format version 0 does not exist".into()));
        }
        if bytes.len() < 16 + TRAILER_LEN {
            return Err(corrupt(format!(
                "truncated: only {} bytes long",
                bytes.len()
            )));
        }
        let (body, trailer) = bytes.split_at(bytes.len() - TRAILER_LEN);
        if blake3::hash(body).as_bytes() != trailer {
            return Err(corrupt("checksum mismatch (truncated or damaged)".into()));
        }
        let header_len = u32::from_le_bytes([body[12], body[13], body[14], body[15]]) as usize;
        if header_len > MAX_HEADER_LEN || 16 + header_len > body.len() {
            return Err(corrupt(format!("header length {header_len} out of range")));
        }
        let header: Header = serde_json::from_slice(&body[16..16 + header_len])
            .map_err(|e| corrupt(format!("header is not valid: {e}")))?;
        let mut rest = &body[16 + header_len..];
        let mut disks = Vec::with_capacity(header.disks.len().min(1024));
        for dh in header.disks {
            let count = usize::try_from(dh.chunk_count)
                .ok()
                .filter(|c| c.checked_mul(ENTRY_LEN).is_some_and(|n| n <= rest.len()))
                .ok_or_else(|| {
                    corrupt(format!(
                        "disk {} declares {} chunks but the entries are truncated",
                        dh.disk_id, dh.chunk_count
                    ))
                })?;
            let (entries, tail) = rest.split_at(count * ENTRY_LEN);
            rest = tail;
            let mut chunks = Vec::with_capacity(count);
            for e in entries.chunks_exact(ENTRY_LEN) {
                let mut hash = [0u8; 32];
                hash.copy_from_slice(&e[1..]);
                match e[0] {
                    ENTRY_ZERO if hash == [0u8; 32] => chunks.push(None),
                    ENTRY_CHUNK => chunks.push(Some(ChunkId(hash))),
                    k => {
                        return Err(corrupt(format!(
                            "disk {}: bad chunk entry kind {k}",
                            dh.disk_id
                        )));
                    }
                }
            }
            disks.push(DiskManifest {
                disk_id: dh.disk_id,
                size: dh.size,
                chunk_size: dh.chunk_size,
                chunks,
            });
        }
        let mut bases = std::collections::BTreeMap::new();
        if version >= 2 {
            if rest.len() < 4 {
                return Err(corrupt("the delta bases section is truncated".into()));
            }
            let count = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            rest = &rest[4..];
            if count.checked_mul(64) != Some(rest.len()) {
                return Err(corrupt(format!(
                    "the delta bases section declares {count} entries in {} bytes",
                    rest.len()
                )));
            }
            for pair in rest.chunks_exact(64) {
                let (mut d, mut b) = ([0u8; 32], [0u8; 32]);
                d.copy_from_slice(&pair[..32]);
                b.copy_from_slice(&pair[32..]);
                bases.insert(ChunkId(d), ChunkId(b));
            }
            rest = &[];
        }
        if !rest.is_empty() {
            return Err(corrupt(format!("{} unexpected trailing bytes", rest.len())));
        }
        let m = Manifest {
            item: header.item,
            point_id: header.point_id,
            created_at_unix_ms: header.created_at_unix_ms,
            consistency: header.consistency,
            disks,
            bases,
        };
        m.validate().map_err(|e| corrupt(e.to_string()))?;
        Ok(m)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            item: "vm-01".into(),
            point_id: "p-20240501T120000Z".into(),
            created_at_unix_ms: 1_714_564_800_000,
            consistency: Consistency::CrashConsistent,
            disks: vec![
                DiskManifest {
                    disk_id: "scsi0:0".into(),
                    size: 10_000,
                    chunk_size: 4096,
                    chunks: vec![Some(ChunkId::of(b"a")), None, Some(ChunkId::of(b"c"))],
                },
                DiskManifest {
                    disk_id: "empty".into(),
                    size: 0,
                    chunk_size: 4096,
                    chunks: vec![],
                },
            ],
            bases: Default::default(),
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        m.validate().unwrap();
        let bytes = m.encode();
        assert_eq!(&bytes[..8], MANIFEST_MAGIC);
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        assert_eq!(m.encode(), bytes, "encoding is deterministic");
        let mut app = m.clone();
        app.consistency = Consistency::AppConsistent;
        assert_eq!(Manifest::decode(&app.encode()).unwrap(), app);
    }

    #[test]
    fn truncation_and_damage_rejected() {
        let bytes = sample().encode();
        for len in [0, 5, 12, 20, 40, bytes.len() - 33, bytes.len() - 1] {
            let err = Manifest::decode(&bytes[..len]).unwrap_err();
            assert!(
                matches!(err, StoreError::CorruptManifest { .. }),
                "len {len}: {err}"
            );
        }
        for pos in [12, 20, bytes.len() - 40, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[pos] ^= 0x10;
            let err = Manifest::decode(&bad).unwrap_err();
            assert!(
                matches!(err, StoreError::CorruptManifest { .. }),
                "pos {pos}: {err}"
            );
        }
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(matches!(
            Manifest::decode(&bad).unwrap_err(),
            StoreError::CorruptManifest { .. }
        ));
    }

    /// Rebuilds the checksum so that only the semantic check can fail.
    fn reseal(mut body: Vec<u8>) -> Vec<u8> {
        let h = blake3::hash(&body);
        body.extend_from_slice(h.as_bytes());
        body
    }

    #[test]
    fn newer_version_rejected() {
        let bytes = sample().encode();
        let mut body = bytes[..bytes.len() - 32].to_vec();
        body[8..12].copy_from_slice(&3u32.to_le_bytes());
        let err = Manifest::decode(&reseal(body)).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::UnsupportedVersion {
                    found: 3,
                    supported: 2,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("upgrade"));
    }

    #[test]
    fn well_sealed_but_inconsistent_rejected() {
        // Chunk count not matching the disk size.
        let mut m = sample();
        m.disks[0].chunks.pop();
        assert!(m.validate().is_err());
        assert!(Manifest::decode(&m.encode()).is_err());
        // Extra bytes after the entries, sealed.
        let bytes = sample().encode();
        let mut body = bytes[..bytes.len() - 32].to_vec();
        body.push(0);
        assert!(Manifest::decode(&reseal(body)).is_err());
        // A bad entry kind, sealed.
        let bytes = sample().encode();
        let mut body = bytes[..bytes.len() - 32].to_vec();
        let first_entry = body.len() - 4 - 3 * ENTRY_LEN;
        body[first_entry] = 7;
        assert!(Manifest::decode(&reseal(body)).is_err());
        // A delta base for a chunk the point does not use, sealed.
        let mut m = sample();
        m.bases.insert(ChunkId::of(b"zz"), ChunkId::of(b"a"));
        assert!(m.validate().is_err());
        assert!(Manifest::decode(&m.encode()).is_err());
        // A delta whose base is a delta.
        let mut m = sample();
        m.bases.insert(ChunkId::of(b"a"), ChunkId::of(b"c"));
        m.bases.insert(ChunkId::of(b"c"), ChunkId::of(b"q"));
        assert!(m.validate().is_err());
        // A well-formed base section round-trips.
        let mut m = sample();
        m.bases.insert(ChunkId::of(b"a"), ChunkId::of(b"base"));
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        assert!(m.referenced_chunks().contains(&ChunkId::of(b"base")));
    }

    #[test]
    fn names_validated() {
        for good in ["vm-1", "A.b_c", &"x".repeat(128)] {
            validate_name("item", good).unwrap();
        }
        for bad in ["", "..", ".x", "a/b", "a b", "ü", &"x".repeat(129)] {
            assert!(validate_name("item", bad).is_err(), "{bad:?}");
        }
        let mut m = sample();
        m.point_id = "../../etc".into();
        assert!(matches!(m.validate(), Err(StoreError::InvalidName { .. })));
        let mut m = sample();
        m.disks[1].disk_id = "scsi0:0".into();
        assert!(matches!(
            m.validate(),
            Err(StoreError::InvalidManifest { .. })
        ));
    }

    #[test]
    fn offsets_and_lengths() {
        let d = &sample().disks[0];
        assert_eq!(d.offset_of(2), 8192);
        assert_eq!(d.len_of(0), 4096);
        assert_eq!(d.len_of(2), 10_000 - 8192);
        assert_eq!(d.len_of(3), 0);
        assert_eq!(DiskManifest::chunk_count_for(8192, 4096), 2);
        assert_eq!(DiskManifest::chunk_count_for(8193, 4096), 3);
    }
}
