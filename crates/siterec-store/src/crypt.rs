//! Encryption at rest: the store key, its key file, and the envelope that
//! wraps chunk and manifest objects of an encrypted store.
//!
//! Everything is derived from one 32-byte [`StoreKey`] with BLAKE3's
//! `derive_key` (a different context string per use), so the key file is
//! the only secret to keep. See `FORMAT.md` ("Encryption").

use std::fmt;
use std::io::Write;
use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::chunk::ChunkId;
use crate::error::StoreError;

/// Length of a [`StoreKey`] in bytes.
pub const STORE_KEY_LEN: usize = 32;
/// First line of a key file (the `1` is the key file version).
pub const KEY_FILE_HEADER: &str = "siterec-store-key/1";
/// Magic bytes at the start of every encrypted object (envelope version 1).
pub const ENVELOPE_MAGIC: &[u8; 8] = b"SRENC001";
/// Bytes an envelope adds to its plaintext: magic, nonce and GCM tag.
pub const ENVELOPE_OVERHEAD: usize = ENVELOPE_MAGIC.len() + NONCE_LEN + TAG_LEN;
/// `encryption.algorithm` in `store.json`.
pub const ENCRYPTION_ALGORITHM: &str = "AES-256-GCM";
/// `encryption.nameKey` in `store.json`: how chunk object names are made.
pub const NAME_KEY_SCHEME: &str = "blake3-keyed";

const TAG_LEN: usize = 16;
const HEADER_LEN: usize = ENVELOPE_MAGIC.len() + NONCE_LEN;

const CTX_KEY_ID: &str = "siterec store key id v1";
const CTX_CHUNK_NAME: &str = "siterec chunk name v1";
const CTX_CHUNK_DATA: &str = "siterec chunk data v1";
const CTX_MANIFEST: &str = "siterec manifest data v1";

/// The secret key of an encrypted store: 32 random bytes.
///
/// Generated once when the recovery agent is set up and exported to a key
/// file ([`StoreKey::write_file`]); without it the store's data cannot be
/// read. `Debug` shows only the [key id](StoreKey::key_id).
#[derive(Clone, PartialEq, Eq)]
pub struct StoreKey {
    bytes: [u8; STORE_KEY_LEN],
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreKey")
            .field("key_id", &self.key_id())
            .finish_non_exhaustive()
    }
}

impl Drop for StoreKey {
    fn drop(&mut self) {
        wipe(&mut self.bytes);
    }
}

/// Overwrites secret material so it does not linger in freed memory.
fn wipe(bytes: &mut [u8; STORE_KEY_LEN]) {
    for b in bytes.iter_mut() {
        // SAFETY: `b` is a valid, aligned, exclusive reference to a u8.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
}

fn key_file_error(reason: impl Into<String>) -> StoreError {
    StoreError::InvalidKeyFile {
        what: "key file".into(),
        reason: reason.into(),
    }
}

impl StoreKey {
    /// A new random key from the system's CSPRNG.
    pub fn generate() -> Result<StoreKey, StoreError> {
        let mut bytes = [0u8; STORE_KEY_LEN];
        aws_lc_rs::rand::fill(&mut bytes).map_err(|_| StoreError::Crypto {
            op: "generate a store key",
        })?;
        Ok(StoreKey { bytes })
    }

    /// A key from its raw bytes.
    pub fn from_bytes(bytes: [u8; STORE_KEY_LEN]) -> StoreKey {
        StoreKey { bytes }
    }

    /// Identifies the key without revealing it: the first 16 hex digits of
    /// `BLAKE3-derive_key("siterec store key id v1", key)`.
    pub fn key_id(&self) -> String {
        let mut id = self.derive(CTX_KEY_ID);
        let hex = hex::encode(&id[..8]);
        wipe(&mut id);
        hex
    }

    fn derive(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, &self.bytes)
    }

    /// The key file: `siterec-store-key/1\n<base64 key>\n<key id>\n`.
    pub fn to_file_bytes(&self) -> Vec<u8> {
        format!(
            "{KEY_FILE_HEADER}\n{}\n{}\n",
            BASE64.encode(self.bytes),
            self.key_id()
        )
        .into_bytes()
    }

    /// Parses a key file written by [`StoreKey::to_file_bytes`]. Anything
    /// else (other header, bad base64, wrong length, a key id that does not
    /// match the key) is refused with [`StoreError::InvalidKeyFile`].
    pub fn from_file_bytes(bytes: &[u8]) -> Result<StoreKey, StoreError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| key_file_error("it is not text (not a siterec store key file)"))?;
        let Some(body) = text.strip_suffix('\n') else {
            return Err(key_file_error(
                "it does not end with a newline (truncated?)",
            ));
        };
        let lines: Vec<&str> = body.split('\n').collect();
        if lines.first() != Some(&KEY_FILE_HEADER) {
            return Err(key_file_error(format!(
                "the first line is not {KEY_FILE_HEADER:?} (not a siterec store key file, \
                 or one from a newer version)"
            )));
        }
        let [_, encoded, key_id] = lines[..] else {
            return Err(key_file_error(format!(
                "expected 3 lines (header, key, key id), found {}",
                lines.len()
            )));
        };
        let mut raw = BASE64
            .decode(encoded)
            .map_err(|e| key_file_error(format!("the key line is not valid base64: {e}")))?;
        if raw.len() != STORE_KEY_LEN {
            let n = raw.len();
            raw.fill(0);
            return Err(key_file_error(format!(
                "the key is {n} bytes, expected {STORE_KEY_LEN}"
            )));
        }
        let mut bytes = [0u8; STORE_KEY_LEN];
        bytes.copy_from_slice(&raw);
        raw.fill(0);
        let key = StoreKey { bytes };
        if key.key_id() != key_id {
            return Err(key_file_error(format!(
                "the key id line {key_id:?} does not match the key (key id {}): the file is \
                 damaged",
                key.key_id()
            )));
        }
        Ok(key)
    }

    /// Reads a key file.
    pub fn read_file(path: impl AsRef<Path>) -> Result<StoreKey, StoreError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| StoreError::io("read", path, e))?;
        StoreKey::from_file_bytes(&bytes).map_err(|e| match e {
            StoreError::InvalidKeyFile { reason, .. } => StoreError::InvalidKeyFile {
                what: path.display().to_string(),
                reason,
            },
            other => other,
        })
    }

    /// Writes the key file durably (fsync of the file and its directory)
    /// with mode 0600. Refuses to overwrite an existing file; a file left
    /// half-written by a failure is removed.
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<(), StoreError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = path.as_ref();
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| StoreError::io("create key file", path, e))?;
        let mut contents = self.to_file_bytes();
        let written = file
            .write_all(&contents)
            .and_then(|()| file.sync_all())
            .map_err(|e| StoreError::io("write key file", path, e));
        contents.fill(0);
        drop(file);
        if let Err(e) = written {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::io("sync directory", dir, e))
    }
}

/// The keys an encrypted store works with, all derived from its
/// [`StoreKey`].
pub(crate) struct Cipher {
    key_id: String,
    name_key: [u8; 32],
    chunk_key: LessSafeKey,
    manifest_key: LessSafeKey,
}

impl Drop for Cipher {
    fn drop(&mut self) {
        wipe(&mut self.name_key);
    }
}

/// Why an envelope could not be opened.
pub(crate) enum OpenError {
    /// Written by a newer siterec (envelope version digit).
    Newer(u32),
    /// Anything else: damaged, truncated, swapped, not encrypted.
    Corrupt(String),
}

impl Cipher {
    pub(crate) fn new(key: &StoreKey) -> Result<Cipher, StoreError> {
        let aead = |context: &str| -> Result<LessSafeKey, StoreError> {
            let mut k = key.derive(context);
            let unbound = UnboundKey::new(&AES_256_GCM, &k);
            wipe(&mut k);
            unbound
                .map(LessSafeKey::new)
                .map_err(|_| StoreError::Crypto {
                    op: "set up an AES-256-GCM key",
                })
        };
        Ok(Cipher {
            key_id: key.key_id(),
            name_key: key.derive(CTX_CHUNK_NAME),
            chunk_key: aead(CTX_CHUNK_DATA)?,
            manifest_key: aead(CTX_MANIFEST)?,
        })
    }

    pub(crate) fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The 32 bytes naming chunk `id`'s object: keyed BLAKE3 of the id.
    pub(crate) fn chunk_name(&self, id: &ChunkId) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.name_key, id.as_bytes()).as_bytes())
    }

    pub(crate) fn seal_chunk(&self, object_key: &str, plain: &[u8]) -> Result<Vec<u8>, StoreError> {
        seal(&self.chunk_key, object_key, plain)
    }

    pub(crate) fn open_chunk(
        &self,
        object_key: &str,
        sealed: Vec<u8>,
    ) -> Result<Vec<u8>, OpenError> {
        open(&self.chunk_key, object_key, sealed)
    }

    pub(crate) fn seal_manifest(
        &self,
        object_key: &str,
        plain: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        seal(&self.manifest_key, object_key, plain)
    }

    pub(crate) fn open_manifest(
        &self,
        object_key: &str,
        sealed: Vec<u8>,
    ) -> Result<Vec<u8>, OpenError> {
        open(&self.manifest_key, object_key, sealed)
    }
}

/// `magic ‖ nonce ‖ AES-256-GCM(plain, aad = object key) ‖ tag`.
fn seal(key: &LessSafeKey, object_key: &str, plain: &[u8]) -> Result<Vec<u8>, StoreError> {
    let mut nonce = [0u8; NONCE_LEN];
    aws_lc_rs::rand::fill(&mut nonce).map_err(|_| StoreError::Crypto {
        op: "draw a random nonce",
    })?;
    let mut out = Vec::with_capacity(plain.len() + ENVELOPE_OVERHEAD);
    out.extend_from_slice(ENVELOPE_MAGIC);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plain);
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(object_key.as_bytes()),
            &mut out[HEADER_LEN..],
        )
        .map_err(|_| StoreError::Crypto {
            op: "encrypt an object",
        })?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

fn open(key: &LessSafeKey, object_key: &str, mut sealed: Vec<u8>) -> Result<Vec<u8>, OpenError> {
    if sealed.len() >= ENVELOPE_MAGIC.len()
        && sealed[..7] == ENVELOPE_MAGIC[..7]
        && sealed[7] != ENVELOPE_MAGIC[7]
        && sealed[7].is_ascii_digit()
    {
        return Err(OpenError::Newer(u32::from(sealed[7] - b'0')));
    }
    if sealed.len() < ENVELOPE_OVERHEAD {
        return Err(OpenError::Corrupt(format!(
            "encrypted object is {} bytes, shorter than the {ENVELOPE_OVERHEAD}-byte envelope",
            sealed.len()
        )));
    }
    if &sealed[..ENVELOPE_MAGIC.len()] != ENVELOPE_MAGIC {
        return Err(OpenError::Corrupt(
            "not an encrypted object (bad envelope magic) in an encrypted store".into(),
        ));
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&sealed[ENVELOPE_MAGIC.len()..HEADER_LEN]);
    let plain_len = key
        .open_within(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(object_key.as_bytes()),
            &mut sealed,
            HEADER_LEN..,
        )
        .map_err(|_| {
            OpenError::Corrupt(
                "decryption failed: the object was altered, damaged, or moved from another name"
                    .into(),
            )
        })?
        .len();
    sealed.truncate(plain_len);
    Ok(sealed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_round_trip() {
        let key = StoreKey::generate().unwrap();
        let text = key.to_file_bytes();
        let back = StoreKey::from_file_bytes(&text).unwrap();
        assert_eq!(back, key);
        assert_eq!(key.key_id().len(), 16);
        assert_ne!(key, StoreKey::generate().unwrap());
        let s = String::from_utf8(text.clone()).unwrap();
        assert!(s.starts_with("siterec-store-key/1\n"));
        assert!(s.ends_with(&format!("\n{}\n", key.key_id())));
        let debug = format!("{key:?}");
        assert!(debug.contains(&key.key_id()), "{debug}");
        let b64 = s.lines().nth(1).unwrap();
        assert!(!debug.contains(b64), "Debug shows the key: {debug}");
        assert!(!debug.contains(&hex::encode(key.bytes)), "{debug}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.key");
        key.write_file(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(StoreKey::read_file(&path).unwrap(), key);
        // Never overwritten.
        let other = StoreKey::generate().unwrap();
        assert!(other.write_file(&path).is_err());
        assert_eq!(StoreKey::read_file(&path).unwrap(), key);
    }

    #[test]
    fn damaged_key_files_are_refused() {
        let key = StoreKey::from_bytes([7; 32]);
        let good = String::from_utf8(key.to_file_bytes()).unwrap();
        let lines: Vec<&str> = good.lines().collect();
        let id = key.key_id();
        let b64 = lines[1];
        let short = BASE64.encode([7u8; 31]);
        let mut flipped: Vec<u8> = BASE64.decode(b64).unwrap();
        flipped[0] ^= 1;
        let flipped = BASE64.encode(flipped);
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "newline"),
            (format!("siterec-store-key/2\n{b64}\n{id}\n"), "first line"),
            (format!("hello\n{b64}\n{id}\n"), "first line"),
            (format!("{KEY_FILE_HEADER}\n{b64}\n{id}"), "newline"),
            (format!("{KEY_FILE_HEADER}\n{b64}\n"), "3 lines"),
            (
                format!("{KEY_FILE_HEADER}\n{b64}\n{id}\nextra\n"),
                "3 lines",
            ),
            (format!("{KEY_FILE_HEADER}\n{b64}!\n{id}\n"), "base64"),
            (format!("{KEY_FILE_HEADER}\n{short}\n{id}\n"), "31 bytes"),
            (format!("{KEY_FILE_HEADER}\n{flipped}\n{id}\n"), "damaged"),
            (
                format!("{KEY_FILE_HEADER}\n{b64}\n0000000000000000\n"),
                "damaged",
            ),
            (
                format!("{KEY_FILE_HEADER}\r\n{b64}\r\n{id}\r\n"),
                "first line",
            ),
        ];
        for (text, expect) in cases {
            let err = StoreKey::from_file_bytes(text.as_bytes()).unwrap_err();
            assert!(
                matches!(err, StoreError::InvalidKeyFile { .. }),
                "{text:?}: {err}"
            );
            assert!(err.to_string().contains(expect), "{text:?}: {err}");
            assert!(!err.to_string().contains(b64), "error shows the key: {err}");
        }
        assert!(StoreKey::from_file_bytes(&[0xff, 0xfe, b'\n']).is_err());
    }

    #[test]
    fn envelope_round_trip_and_tamper() {
        let c = Cipher::new(&StoreKey::from_bytes([1; 32])).unwrap();
        let sealed = c.seal_chunk("chunks/ab/x", b"hello world").unwrap();
        assert_eq!(&sealed[..8], ENVELOPE_MAGIC);
        assert_eq!(sealed.len(), 11 + ENVELOPE_OVERHEAD);
        assert_eq!(
            c.open_chunk("chunks/ab/x", sealed.clone()).ok().unwrap(),
            b"hello world"
        );
        // Another name, another key purpose, or one flipped bit: refused.
        assert!(c.open_chunk("chunks/ab/y", sealed.clone()).is_err());
        assert!(c.open_manifest("chunks/ab/x", sealed.clone()).is_err());
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x10;
            assert!(c.open_chunk("chunks/ab/x", bad).is_err(), "byte {i}");
        }
        assert!(c.open_chunk("chunks/ab/x", sealed[..30].to_vec()).is_err());
        let mut newer = sealed.clone();
        newer[7] = b'2';
        assert!(matches!(
            c.open_chunk("chunks/ab/x", newer),
            Err(OpenError::Newer(2))
        ));
        // Random nonces: sealing twice differs.
        assert_ne!(
            c.seal_chunk("k", b"a").unwrap(),
            c.seal_chunk("k", b"a").unwrap()
        );
    }

    /// Throughput of seal + open of 256 KiB chunks; run with
    /// `cargo test -p siterec-store --release crypt_throughput -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn crypt_throughput() {
        let c = Cipher::new(&StoreKey::generate().unwrap()).unwrap();
        let plain: Vec<u8> = (0..256 * 1024).map(|i| (i * 31 % 251) as u8).collect();
        let n = 4096;
        let start = std::time::Instant::now();
        for _ in 0..n {
            let sealed = c.seal_chunk("chunks/ab/cd", &plain).unwrap();
            let back = c.open_chunk("chunks/ab/cd", sealed).ok().unwrap();
            assert_eq!(back.len(), plain.len());
        }
        let secs = start.elapsed().as_secs_f64();
        let mib = (n * plain.len()) as f64 / (1024.0 * 1024.0);
        println!(
            "seal+open of {n} x 256 KiB: {secs:.3} s, {:.0} MiB/s (each direction counted once)",
            mib / secs
        );
    }
}
