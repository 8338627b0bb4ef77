//! Encryption at rest (store format version 3): the recovery key the
//! operator keeps, the credential the recovery agent keeps, the per-session
//! data keys, the envelopes around chunk and manifest objects, and the
//! transport seal the vault uses to hand a recovery key to an agent.
//!
//! The split of secrets (see `FORMAT.md`, "Encryption"):
//!
//! * [`RecoveryKey`] (file `siterec-recovery-key/1`, kept by the operator):
//!   an X25519 private key and the chunk name key. It is the only thing
//!   that can decrypt chunk data.
//! * [`StoreCredential`] (`DATA/store.credential`, kept by the recovery
//!   agent): the X25519 public key and the name key. Enough to write chunks
//!   (each writer session seals a fresh AES-256-GCM data key to the public
//!   key), name them, and read and write manifests; never enough to read a
//!   chunk back.
//! * [`TransportKey`] (`DATA/identity/transport.key`, kept by an agent): an
//!   X25519 key pair whose public half the vault seals recovery keys to at
//!   failover time, so the vault never stores a recovery key in the clear.

use std::fmt;
use std::io::Write;
use std::path::Path;

use aws_lc_rs::agreement::{self, PrivateKey, UnparsedPublicKey, X25519};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

use crate::chunk::ChunkId;
use crate::error::StoreError;

/// Length of X25519 keys and of the name key, in bytes.
pub const KEY_LEN: usize = 32;
/// First line of a recovery key file (the `1` is the file version).
pub const RECOVERY_KEY_HEADER: &str = "siterec-recovery-key/1";
/// First line of a store credential file.
pub const CREDENTIAL_HEADER: &str = "siterec-store-credential/1";
/// First line of an agent's transport key file.
pub const TRANSPORT_KEY_HEADER: &str = "siterec-transport-key/1";
/// Magic of a chunk object in an encrypted store (envelope version 3:
/// XXH3-128 checksum).
pub const ENVELOPE_MAGIC: &[u8; 8] = b"SRENC003";
/// Magic of envelope version 2 (BLAKE3 checksum): still read.
pub const ENVELOPE_MAGIC_V2: &[u8; 8] = b"SRENC002";
/// Magic of a manifest object in an encrypted store (envelope version 1).
pub const MANIFEST_ENVELOPE_MAGIC: &[u8; 8] = b"SRENC001";
/// Magic of a sealed data key object (`keys/<id>`).
pub const DATA_KEY_MAGIC: &[u8; 8] = b"SRDEK001";
/// Magic of a recovery key sealed to an agent's transport key.
pub const TRANSPORT_MAGIC: &[u8; 8] = b"SRKT0001";
/// Bytes a chunk envelope adds to its plaintext: magic, data key id,
/// nonce, GCM tag and the checksum.
pub const ENVELOPE_OVERHEAD: usize = CHUNK_HEADER_LEN + TAG_LEN + CHECKSUM_LEN;
/// `encryption.algorithm` in `store.json`.
pub const ENCRYPTION_ALGORITHM: &str = "AES-256-GCM";
/// `encryption.keyWrap` in `store.json`: how data keys are sealed.
pub const KEY_WRAP_SCHEME: &str = "X25519-BLAKE3-AES-256-GCM";
/// `encryption.nameKey` in `store.json`: how chunk object names are made.
pub const NAME_KEY_SCHEME: &str = "blake3-keyed";
/// Length of a data key id in bytes (16 hex digits in `keys/<id>`).
pub const DATA_KEY_ID_LEN: usize = 8;
/// Prefix of data key objects.
pub const DATA_KEYS_PREFIX: &str = "keys/";

const TAG_LEN: usize = 16;
const CHECKSUM_LEN: usize = 16;
/// Checksum length of envelope version 2 (BLAKE3).
const CHECKSUM_LEN_V2: usize = 32;
const CHUNK_HEADER_LEN: usize = 8 + DATA_KEY_ID_LEN + NONCE_LEN;
const MANIFEST_HEADER_LEN: usize = 8 + NONCE_LEN;
/// magic ‖ ephemeral public key ‖ nonce ‖ ciphertext ‖ tag.
const BOX_OVERHEAD: usize = 8 + KEY_LEN + NONCE_LEN + TAG_LEN;

const CTX_KEY_ID: &str = "siterec store key id v3";
const CTX_MANIFEST: &str = "siterec manifest data v3";
const CTX_DATA_KEY_WRAP: &str = "siterec data key wrap v1";
const CTX_TRANSPORT_WRAP: &str = "siterec transport wrap v1";

/// Overwrites secret material so it does not linger in freed memory.
fn wipe(bytes: &mut [u8]) {
    for b in bytes.iter_mut() {
        // SAFETY: `b` is a valid, aligned, exclusive reference to a u8.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
}

fn random_bytes<const N: usize>(op: &'static str) -> Result<[u8; N], StoreError> {
    let mut out = [0u8; N];
    aws_lc_rs::rand::fill(&mut out).map_err(|_| StoreError::Crypto { op })?;
    Ok(out)
}

fn x25519_public(private: &[u8; KEY_LEN]) -> Result<[u8; KEY_LEN], StoreError> {
    let op = "compute an X25519 public key";
    let key =
        PrivateKey::from_private_key(&X25519, private).map_err(|_| StoreError::Crypto { op })?;
    let public = key
        .compute_public_key()
        .map_err(|_| StoreError::Crypto { op })?;
    public
        .as_ref()
        .try_into()
        .map_err(|_| StoreError::Crypto { op })
}

fn aead_key(bytes: &[u8; KEY_LEN]) -> Result<LessSafeKey, StoreError> {
    UnboundKey::new(&AES_256_GCM, bytes)
        .map(LessSafeKey::new)
        .map_err(|_| StoreError::Crypto {
            op: "set up an AES-256-GCM key",
        })
}

/// The key id of a key pair and name key: the first 16 hex digits of
/// `BLAKE3-derive_key("siterec store key id v3", public ‖ name key)`.
fn key_id_of(public: &[u8; KEY_LEN], name_key: &[u8; KEY_LEN]) -> String {
    let mut input = [0u8; 2 * KEY_LEN];
    input[..KEY_LEN].copy_from_slice(public);
    input[KEY_LEN..].copy_from_slice(name_key);
    let id = blake3::derive_key(CTX_KEY_ID, &input);
    wipe(&mut input);
    hex::encode(&id[..8])
}

/// Parses the text of a key-like file: `header` on the first line, then
/// exactly `N` more lines, each ending in `\n`.
fn parse_lines<'a, const N: usize>(
    bytes: &'a [u8],
    header: &str,
    what: &str,
) -> Result<[&'a str; N], String> {
    let text = std::str::from_utf8(bytes).map_err(|_| format!("it is not text (not a {what})"))?;
    let Some(body) = text.strip_suffix('\n') else {
        return Err("it does not end with a newline (truncated?)".into());
    };
    let lines: Vec<&str> = body.split('\n').collect();
    if lines.first() != Some(&header) {
        return Err(format!(
            "the first line is not {header:?} (not a {what}, or one from a newer version)"
        ));
    }
    let rest: [&str; N] = lines[1..]
        .try_into()
        .map_err(|_| format!("expected {} lines, found {}", N + 1, lines.len()))?;
    Ok(rest)
}

fn decode_key(line: &str, name: &str) -> Result<[u8; KEY_LEN], String> {
    let mut raw = BASE64
        .decode(line)
        .map_err(|e| format!("the {name} line is not valid base64: {e}"))?;
    if raw.len() != KEY_LEN {
        let n = raw.len();
        wipe(&mut raw);
        return Err(format!("the {name} is {n} bytes, expected {KEY_LEN}"));
    }
    let mut out = [0u8; KEY_LEN];
    out.copy_from_slice(&raw);
    wipe(&mut raw);
    Ok(out)
}

fn invalid(what: &str, reason: impl Into<String>) -> StoreError {
    StoreError::InvalidKeyFile {
        what: what.to_string(),
        reason: reason.into(),
    }
}

/// Renames the `what` of an [`StoreError::InvalidKeyFile`] to the path.
fn at_path(e: StoreError, path: &Path) -> StoreError {
    match e {
        StoreError::InvalidKeyFile { reason, .. } => StoreError::InvalidKeyFile {
            what: path.display().to_string(),
            reason,
        },
        other => other,
    }
}

/// Writes a secret file durably with mode 0600: fsync of the file and its
/// directory. Refuses to overwrite an existing file; a file left
/// half-written by a failure is removed.
fn write_secret_file(
    path: &Path,
    contents: &mut [u8],
    what: &'static str,
) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    let mut file = match file {
        Ok(f) => f,
        Err(e) => {
            wipe(contents);
            return Err(StoreError::io(what, path, e));
        }
    };
    let written = file
        .write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| StoreError::io(what, path, e));
    wipe(contents);
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

/// The secret that reads an encrypted store: an X25519 private key and the
/// chunk name key. Generated once when the store is created and exported
/// to a file the operator keeps ([`RecoveryKey::write_file`]); the
/// recovery agent keeps only its [`StoreCredential`]. `Debug` shows only
/// the [key id](RecoveryKey::key_id).
#[derive(Clone, PartialEq, Eq)]
pub struct RecoveryKey {
    private: [u8; KEY_LEN],
    public: [u8; KEY_LEN],
    name_key: [u8; KEY_LEN],
}

impl fmt::Debug for RecoveryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecoveryKey")
            .field("key_id", &self.key_id())
            .finish_non_exhaustive()
    }
}

impl Drop for RecoveryKey {
    fn drop(&mut self) {
        wipe(&mut self.private);
        wipe(&mut self.name_key);
    }
}

impl RecoveryKey {
    /// A new random recovery key from the system's CSPRNG.
    pub fn generate() -> Result<RecoveryKey, StoreError> {
        let private = random_bytes("generate a recovery key")?;
        let name_key = random_bytes("generate a chunk name key")?;
        RecoveryKey::from_parts(private, name_key)
    }

    fn from_parts(
        private: [u8; KEY_LEN],
        name_key: [u8; KEY_LEN],
    ) -> Result<RecoveryKey, StoreError> {
        let public = x25519_public(&private)?;
        Ok(RecoveryKey {
            private,
            public,
            name_key,
        })
    }

    /// Identifies the key (and its store) without revealing it.
    pub fn key_id(&self) -> String {
        key_id_of(&self.public, &self.name_key)
    }

    /// What the recovery agent keeps: the public key and the name key.
    pub fn credential(&self) -> StoreCredential {
        StoreCredential {
            public: self.public,
            name_key: self.name_key,
        }
    }

    /// The recovery key file:
    /// `siterec-recovery-key/1\n<key id>\n<base64 private key>\n<base64 name key>\n`.
    pub fn to_file_bytes(&self) -> Vec<u8> {
        format!(
            "{RECOVERY_KEY_HEADER}\n{}\n{}\n{}\n",
            self.key_id(),
            BASE64.encode(self.private),
            BASE64.encode(self.name_key)
        )
        .into_bytes()
    }

    /// Parses a recovery key file. Anything else (another header, bad
    /// base64, wrong lengths, a key id that does not match the keys) is
    /// refused with [`StoreError::InvalidKeyFile`].
    pub fn from_file_bytes(bytes: &[u8]) -> Result<RecoveryKey, StoreError> {
        const WHAT: &str = "recovery key file";
        let [key_id, private, name_key] =
            parse_lines::<3>(bytes, RECOVERY_KEY_HEADER, "siterec recovery key file")
                .map_err(|r| invalid(WHAT, r))?;
        let private = decode_key(private, "private key").map_err(|r| invalid(WHAT, r))?;
        let name_key = decode_key(name_key, "name key").map_err(|r| invalid(WHAT, r))?;
        let key = RecoveryKey::from_parts(private, name_key)?;
        if key.key_id() != key_id {
            return Err(invalid(
                WHAT,
                format!(
                    "the key id line {key_id:?} does not match the keys (key id {}): the file \
                     is damaged",
                    key.key_id()
                ),
            ));
        }
        Ok(key)
    }

    /// Reads a recovery key file.
    pub fn read_file(path: impl AsRef<Path>) -> Result<RecoveryKey, StoreError> {
        let path = path.as_ref();
        let mut bytes =
            std::fs::read(path).map_err(|e| StoreError::io("read recovery key file", path, e))?;
        let key = RecoveryKey::from_file_bytes(&bytes).map_err(|e| at_path(e, path));
        wipe(&mut bytes);
        key
    }

    /// Writes the recovery key file durably with mode 0600; never
    /// overwrites an existing file.
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<(), StoreError> {
        write_secret_file(
            path.as_ref(),
            &mut self.to_file_bytes(),
            "create recovery key file",
        )
    }
}

/// What the recovery agent keeps of an encrypted store
/// (`DATA/store.credential`): the X25519 public key data keys are sealed
/// to, and the name key (chunk object names, manifest encryption). It can
/// write and manage the store but not read chunk data.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreCredential {
    public: [u8; KEY_LEN],
    name_key: [u8; KEY_LEN],
}

impl fmt::Debug for StoreCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreCredential")
            .field("key_id", &self.key_id())
            .finish_non_exhaustive()
    }
}

impl Drop for StoreCredential {
    fn drop(&mut self) {
        wipe(&mut self.name_key);
    }
}

impl StoreCredential {
    /// The key id of the store (the same as its [`RecoveryKey::key_id`]).
    pub fn key_id(&self) -> String {
        key_id_of(&self.public, &self.name_key)
    }

    /// The X25519 public key, base64 (as in `store.json`).
    pub fn public_key_base64(&self) -> String {
        BASE64.encode(self.public)
    }

    /// `siterec-store-credential/1\n<key id>\n<base64 public key>\n<base64 name key>\n`.
    pub fn to_file_bytes(&self) -> Vec<u8> {
        format!(
            "{CREDENTIAL_HEADER}\n{}\n{}\n{}\n",
            self.key_id(),
            BASE64.encode(self.public),
            BASE64.encode(self.name_key)
        )
        .into_bytes()
    }

    /// Parses a credential file (same rules as the recovery key file).
    pub fn from_file_bytes(bytes: &[u8]) -> Result<StoreCredential, StoreError> {
        const WHAT: &str = "store credential file";
        let [key_id, public, name_key] =
            parse_lines::<3>(bytes, CREDENTIAL_HEADER, "siterec store credential file")
                .map_err(|r| invalid(WHAT, r))?;
        let public = decode_key(public, "public key").map_err(|r| invalid(WHAT, r))?;
        let name_key = decode_key(name_key, "name key").map_err(|r| invalid(WHAT, r))?;
        let c = StoreCredential { public, name_key };
        if c.key_id() != key_id {
            return Err(invalid(
                WHAT,
                format!(
                    "the key id line {key_id:?} does not match the keys (key id {}): the file \
                     is damaged",
                    c.key_id()
                ),
            ));
        }
        Ok(c)
    }

    /// Reads a credential file.
    pub fn read_file(path: impl AsRef<Path>) -> Result<StoreCredential, StoreError> {
        let path = path.as_ref();
        let bytes =
            std::fs::read(path).map_err(|e| StoreError::io("read store credential", path, e))?;
        StoreCredential::from_file_bytes(&bytes).map_err(|e| at_path(e, path))
    }

    /// Writes the credential file durably with mode 0600; never overwrites.
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<(), StoreError> {
        write_secret_file(
            path.as_ref(),
            &mut self.to_file_bytes(),
            "create store credential file",
        )
    }
}

/// An agent's transport key pair: the vault seals a recovery key to its
/// public half for the one task that needs it ([`seal_for_transport`]).
#[derive(Clone)]
pub struct TransportKey {
    private: [u8; KEY_LEN],
    public: [u8; KEY_LEN],
}

impl fmt::Debug for TransportKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportKey")
            .field("public", &self.public_key_base64())
            .finish_non_exhaustive()
    }
}

impl Drop for TransportKey {
    fn drop(&mut self) {
        wipe(&mut self.private);
    }
}

impl TransportKey {
    /// A new random key pair.
    pub fn generate() -> Result<TransportKey, StoreError> {
        let private = random_bytes("generate a transport key")?;
        Ok(TransportKey {
            public: x25519_public(&private)?,
            private,
        })
    }

    /// The public key, base64 (what the agent reports to the vault).
    pub fn public_key_base64(&self) -> String {
        BASE64.encode(self.public)
    }

    /// `siterec-transport-key/1\n<base64 private key>\n`.
    pub fn to_file_bytes(&self) -> Vec<u8> {
        format!("{TRANSPORT_KEY_HEADER}\n{}\n", BASE64.encode(self.private)).into_bytes()
    }

    /// Parses a transport key file.
    pub fn from_file_bytes(bytes: &[u8]) -> Result<TransportKey, StoreError> {
        const WHAT: &str = "transport key file";
        let [private] = parse_lines::<1>(bytes, TRANSPORT_KEY_HEADER, "siterec transport key file")
            .map_err(|r| invalid(WHAT, r))?;
        let private = decode_key(private, "private key").map_err(|r| invalid(WHAT, r))?;
        Ok(TransportKey {
            public: x25519_public(&private)?,
            private,
        })
    }

    /// Opens what [`seal_for_transport`] sealed to this key.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, StoreError> {
        open_box(
            TRANSPORT_MAGIC,
            CTX_TRANSPORT_WRAP,
            &self.private,
            &self.public,
            b"",
            sealed,
        )
        .map_err(|reason| StoreError::InvalidKeyFile {
            what: "sealed recovery key".into(),
            reason,
        })
    }
}

/// Seals `plain` (a recovery key file) to an agent's transport public key
/// (base64, as reported): `SRKT0001` ‖ ephemeral public key ‖ nonce ‖
/// AES-256-GCM ciphertext ‖ tag.
pub fn seal_for_transport(public_base64: &str, plain: &[u8]) -> Result<Vec<u8>, StoreError> {
    let public = decode_key(public_base64, "transport public key").map_err(|reason| {
        StoreError::InvalidKeyFile {
            what: "transport public key".into(),
            reason,
        }
    })?;
    seal_box(TRANSPORT_MAGIC, CTX_TRANSPORT_WRAP, &public, b"", plain)
}

fn x25519_agree(
    private: &[u8; KEY_LEN],
    peer_public: &[u8; KEY_LEN],
) -> Result<[u8; KEY_LEN], StoreError> {
    let op = "agree on an X25519 shared secret";
    let key =
        PrivateKey::from_private_key(&X25519, private).map_err(|_| StoreError::Crypto { op })?;
    agreement::agree(
        &key,
        UnparsedPublicKey::new(&X25519, &peer_public[..]),
        StoreError::Crypto { op },
        |secret| {
            let out: [u8; KEY_LEN] = secret.try_into().map_err(|_| StoreError::Crypto { op })?;
            // A low-order peer key gives an all-zero secret: refuse it.
            if out.iter().all(|b| *b == 0) {
                return Err(StoreError::Crypto { op });
            }
            Ok(out)
        },
    )
}

/// The AES key wrapping a sealed box: BLAKE3 `derive_key(context, shared ‖
/// ephemeral public ‖ recipient public)`.
fn box_key(
    context: &str,
    shared: &[u8; KEY_LEN],
    ephemeral: &[u8; KEY_LEN],
    recipient: &[u8; KEY_LEN],
) -> Result<LessSafeKey, StoreError> {
    let mut input = [0u8; 3 * KEY_LEN];
    input[..KEY_LEN].copy_from_slice(shared);
    input[KEY_LEN..2 * KEY_LEN].copy_from_slice(ephemeral);
    input[2 * KEY_LEN..].copy_from_slice(recipient);
    let mut k = blake3::derive_key(context, &input);
    wipe(&mut input);
    let key = aead_key(&k);
    wipe(&mut k);
    key
}

/// `magic ‖ ephemeral public ‖ nonce ‖ AES-256-GCM(plain, aad = magic ‖ aad) ‖ tag`.
fn seal_box(
    magic: &[u8; 8],
    context: &str,
    recipient: &[u8; KEY_LEN],
    aad: &[u8],
    plain: &[u8],
) -> Result<Vec<u8>, StoreError> {
    let mut eph_private = random_bytes::<KEY_LEN>("generate an ephemeral key")?;
    let eph_public = x25519_public(&eph_private)?;
    let shared = x25519_agree(&eph_private, recipient);
    wipe(&mut eph_private);
    let mut shared = shared?;
    let key = box_key(context, &shared, &eph_public, recipient);
    wipe(&mut shared);
    let key = key?;
    let nonce = random_bytes::<NONCE_LEN>("draw a random nonce")?;
    let mut out = Vec::with_capacity(plain.len() + BOX_OVERHEAD);
    out.extend_from_slice(magic);
    out.extend_from_slice(&eph_public);
    out.extend_from_slice(&nonce);
    let body = out.len();
    out.extend_from_slice(plain);
    let mut full_aad = magic.to_vec();
    full_aad.extend_from_slice(aad);
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&full_aad[..]),
            &mut out[body..],
        )
        .map_err(|_| StoreError::Crypto { op: "seal a key" })?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

fn open_box(
    magic: &[u8; 8],
    context: &str,
    private: &[u8; KEY_LEN],
    public: &[u8; KEY_LEN],
    aad: &[u8],
    sealed: &[u8],
) -> Result<Vec<u8>, String> {
    if sealed.len() < BOX_OVERHEAD {
        return Err(format!(
            "{} bytes, shorter than the {BOX_OVERHEAD}-byte sealed box",
            sealed.len()
        ));
    }
    if &sealed[..8] != magic {
        return Err(format!(
            "bad magic (expected {:?})",
            String::from_utf8_lossy(magic)
        ));
    }
    let eph: [u8; KEY_LEN] = sealed[8..8 + KEY_LEN]
        .try_into()
        .map_err(|_| "truncated".to_string())?;
    let nonce: [u8; NONCE_LEN] = sealed[8 + KEY_LEN..8 + KEY_LEN + NONCE_LEN]
        .try_into()
        .map_err(|_| "truncated".to_string())?;
    let mut shared = x25519_agree(private, &eph).map_err(|e| e.to_string())?;
    let key = box_key(context, &shared, &eph, public);
    wipe(&mut shared);
    let key = key.map_err(|e| e.to_string())?;
    let mut full_aad = magic.to_vec();
    full_aad.extend_from_slice(aad);
    let mut buf = sealed[8 + KEY_LEN + NONCE_LEN..].to_vec();
    let n = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&full_aad[..]),
            &mut buf,
        )
        .map_err(|_| {
            "it does not open with this key (sealed to another key, altered or damaged)".to_string()
        })?
        .len();
    buf.truncate(n);
    Ok(buf)
}

/// A writer session's data key: 32 random bytes, sealed to the store's
/// public key as object `keys/<id>`.
pub(crate) struct DataKey {
    pub(crate) id: [u8; DATA_KEY_ID_LEN],
    key: LessSafeKey,
}

impl DataKey {
    /// A new data key and its sealed object (`SRDEK001` box; the
    /// associated data is the object's key, so it cannot be moved).
    pub(crate) fn generate(
        store_public: &[u8; KEY_LEN],
    ) -> Result<(DataKey, String, Vec<u8>), StoreError> {
        let id = random_bytes::<DATA_KEY_ID_LEN>("draw a data key id")?;
        let mut raw = random_bytes::<KEY_LEN>("generate a data key")?;
        let object_key = data_key_object(&id);
        let sealed = seal_box(
            DATA_KEY_MAGIC,
            CTX_DATA_KEY_WRAP,
            store_public,
            object_key.as_bytes(),
            &raw,
        );
        let key = aead_key(&raw);
        wipe(&mut raw);
        Ok((DataKey { id, key: key? }, object_key, sealed?))
    }

    /// Opens a sealed data key object with the recovery key.
    pub(crate) fn open(
        recovery: &RecoveryKey,
        id: [u8; DATA_KEY_ID_LEN],
        sealed: &[u8],
    ) -> Result<DataKey, String> {
        let object_key = data_key_object(&id);
        let mut raw = open_box(
            DATA_KEY_MAGIC,
            CTX_DATA_KEY_WRAP,
            &recovery.private,
            &recovery.public,
            object_key.as_bytes(),
            sealed,
        )?;
        let bytes: Result<[u8; KEY_LEN], _> = raw[..].try_into();
        wipe(&mut raw);
        let mut bytes = bytes.map_err(|_| "the data key is not 32 bytes".to_string())?;
        let key = aead_key(&bytes);
        wipe(&mut bytes);
        Ok(DataKey {
            id,
            key: key.map_err(|e| e.to_string())?,
        })
    }
}

/// `keys/<16 hex digits>`.
pub(crate) fn data_key_object(id: &[u8; DATA_KEY_ID_LEN]) -> String {
    format!("{DATA_KEYS_PREFIX}{}", hex::encode(id))
}

/// Why an envelope could not be opened.
pub(crate) enum OpenError {
    /// Written by a newer siterec (envelope version digit).
    Newer(u32),
    /// Anything else: damaged, truncated, swapped, not encrypted.
    Corrupt(String),
}

fn newer_version(stored: &[u8], magic: &[u8; 8]) -> Option<u32> {
    (stored.len() >= 8
        && stored[..7] == magic[..7]
        && stored[7] != magic[7]
        && stored[7].is_ascii_digit()
        && stored[7] > magic[7])
        .then(|| u32::from(stored[7] - b'0'))
}

/// The store-level keys every holder of the credential has.
pub(crate) struct Cipher {
    key_id: String,
    public: [u8; KEY_LEN],
    name_key: [u8; KEY_LEN],
    manifest_key: LessSafeKey,
}

impl Drop for Cipher {
    fn drop(&mut self) {
        wipe(&mut self.name_key);
    }
}

impl Cipher {
    pub(crate) fn new(credential: &StoreCredential) -> Result<Cipher, StoreError> {
        let mut mk = blake3::derive_key(CTX_MANIFEST, &credential.name_key);
        let manifest_key = aead_key(&mk);
        wipe(&mut mk);
        Ok(Cipher {
            key_id: credential.key_id(),
            public: credential.public,
            name_key: credential.name_key,
            manifest_key: manifest_key?,
        })
    }

    pub(crate) fn key_id(&self) -> &str {
        &self.key_id
    }

    pub(crate) fn public(&self) -> &[u8; KEY_LEN] {
        &self.public
    }

    /// The 32 bytes naming chunk `id`'s object: keyed BLAKE3 of the id.
    pub(crate) fn chunk_name(&self, id: &ChunkId) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.name_key, id.as_bytes()).as_bytes())
    }

    /// `SRENC001 ‖ nonce ‖ AES-256-GCM(plain, aad = object key) ‖ tag`.
    pub(crate) fn seal_manifest(
        &self,
        object_key: &str,
        plain: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let nonce = random_bytes::<NONCE_LEN>("draw a random nonce")?;
        let mut out = Vec::with_capacity(plain.len() + MANIFEST_HEADER_LEN + TAG_LEN);
        out.extend_from_slice(MANIFEST_ENVELOPE_MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = self
            .manifest_key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(object_key.as_bytes()),
                &mut out[MANIFEST_HEADER_LEN..],
            )
            .map_err(|_| StoreError::Crypto {
                op: "encrypt a manifest",
            })?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    pub(crate) fn open_manifest(
        &self,
        object_key: &str,
        mut sealed: Vec<u8>,
    ) -> Result<Vec<u8>, OpenError> {
        if let Some(v) = newer_version(&sealed, MANIFEST_ENVELOPE_MAGIC) {
            return Err(OpenError::Newer(v));
        }
        if sealed.len() < MANIFEST_HEADER_LEN + TAG_LEN {
            return Err(OpenError::Corrupt(format!(
                "encrypted manifest is {} bytes, shorter than its envelope",
                sealed.len()
            )));
        }
        if &sealed[..8] != MANIFEST_ENVELOPE_MAGIC {
            return Err(OpenError::Corrupt(
                "not an encrypted manifest (bad envelope magic) in an encrypted store".into(),
            ));
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[8..MANIFEST_HEADER_LEN]);
        let n = self
            .manifest_key
            .open_within(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(object_key.as_bytes()),
                &mut sealed,
                MANIFEST_HEADER_LEN..,
            )
            .map_err(|_| {
                OpenError::Corrupt(
                    "decryption failed: the manifest was altered, damaged, or moved from \
                     another name"
                        .into(),
                )
            })?
            .len();
        sealed.truncate(n);
        Ok(sealed)
    }
}

/// Seals an encoded chunk with a session data key:
/// `SRENC003 ‖ data key id ‖ nonce ‖ ciphertext ‖ tag ‖ XXH3-128(all before)`.
/// The associated data is the header (magic, data key id, nonce) followed
/// by the object's key.
pub(crate) fn seal_chunk(
    dek: &DataKey,
    object_key: &str,
    plain: &[u8],
) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![0u8; plain.len() + ENVELOPE_OVERHEAD];
    seal_chunk_into(dek, object_key, plain, &mut out)?;
    Ok(out)
}

/// [`seal_chunk`] into `out`, which must be exactly
/// `plain.len() + ENVELOPE_OVERHEAD` bytes long (a caller's buffer: the
/// local store seals straight into its direct-I/O staging buffer).
pub(crate) fn seal_chunk_into(
    dek: &DataKey,
    object_key: &str,
    plain: &[u8],
    out: &mut [u8],
) -> Result<(), StoreError> {
    if out.len() != plain.len() + ENVELOPE_OVERHEAD {
        return Err(StoreError::Task(format!(
            "sealing a {}-byte chunk needs {} bytes, not {}",
            plain.len(),
            plain.len() + ENVELOPE_OVERHEAD,
            out.len()
        )));
    }
    out[ENVELOPE_BODY_START..][..plain.len()].copy_from_slice(plain);
    seal_chunk_in_place(dek, object_key, out)
}

/// Where the chunk object starts in a sealed envelope: the room a caller
/// leaves before an object it seals in place.
pub const ENVELOPE_BODY_START: usize = CHUNK_HEADER_LEN;

/// [`seal_chunk`] of the chunk object already at
/// `out[ENVELOPE_BODY_START..out.len() - (ENVELOPE_OVERHEAD - ENVELOPE_BODY_START)]`,
/// in place: the header and trailer are written around it (the target
/// receives an upload into such a buffer and seals it there).
pub(crate) fn seal_chunk_in_place(
    dek: &DataKey,
    object_key: &str,
    out: &mut [u8],
) -> Result<(), StoreError> {
    if out.len() < ENVELOPE_OVERHEAD {
        return Err(StoreError::Task(format!(
            "a sealed chunk takes at least {ENVELOPE_OVERHEAD} bytes, not {}",
            out.len()
        )));
    }
    let body_len = out.len() - ENVELOPE_OVERHEAD;
    let nonce = random_bytes::<NONCE_LEN>("draw a random nonce")?;
    let (header, rest) = out.split_at_mut(CHUNK_HEADER_LEN);
    header[..8].copy_from_slice(ENVELOPE_MAGIC);
    header[8..8 + DATA_KEY_ID_LEN].copy_from_slice(&dek.id);
    header[8 + DATA_KEY_ID_LEN..].copy_from_slice(&nonce);
    let mut aad = header.to_vec();
    aad.extend_from_slice(object_key.as_bytes());
    let (body, trailer) = rest.split_at_mut(body_len);
    let tag = dek
        .key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad[..]),
            body,
        )
        .map_err(|_| StoreError::Crypto {
            op: "encrypt a chunk",
        })?;
    trailer[..TAG_LEN].copy_from_slice(tag.as_ref());
    let sealed = out.len() - CHECKSUM_LEN;
    let sum = envelope_checksum(&out[..sealed]);
    out[sealed..].copy_from_slice(&sum);
    Ok(())
}

/// Checks a stored chunk object's envelope and checksum without any key
/// (what `verify` and crash recovery can do without the recovery key).
/// Returns the id of the data key it was sealed with.
pub(crate) fn check_chunk_envelope(stored: &[u8]) -> Result<[u8; DATA_KEY_ID_LEN], OpenError> {
    envelope_parts(stored).map(|(id, _)| id)
}

/// The checksum of envelope version 3: XXH3-128 of everything before it,
/// little-endian. It only has to catch damage (see FORMAT.md), and costs a
/// fraction of a cryptographic hash.
fn envelope_checksum(body: &[u8]) -> [u8; CHECKSUM_LEN] {
    xxhash_rust::xxh3::xxh3_128(body).to_le_bytes()
}

/// [`check_chunk_envelope`], also returning the checksum's length (by
/// envelope version).
fn envelope_parts(stored: &[u8]) -> Result<([u8; DATA_KEY_ID_LEN], usize), OpenError> {
    if let Some(v) = newer_version(stored, ENVELOPE_MAGIC) {
        return Err(OpenError::Newer(v));
    }
    let v2 = stored.len() >= 8 && &stored[..8] == ENVELOPE_MAGIC_V2;
    let checksum_len = if v2 { CHECKSUM_LEN_V2 } else { CHECKSUM_LEN };
    let overhead = CHUNK_HEADER_LEN + TAG_LEN + checksum_len;
    if stored.len() < overhead {
        return Err(OpenError::Corrupt(format!(
            "encrypted object is {} bytes, shorter than the {overhead}-byte envelope",
            stored.len()
        )));
    }
    if !v2 && &stored[..8] != ENVELOPE_MAGIC {
        return Err(OpenError::Corrupt(
            "not an encrypted chunk (bad envelope magic) in an encrypted store".into(),
        ));
    }
    let body = stored.len() - checksum_len;
    let intact = if v2 {
        blake3::hash(&stored[..body]).as_bytes()[..] == stored[body..]
    } else {
        envelope_checksum(&stored[..body])[..] == stored[body..]
    };
    if !intact {
        return Err(OpenError::Corrupt(
            "its checksum does not match: the object is damaged or truncated".into(),
        ));
    }
    let mut id = [0u8; DATA_KEY_ID_LEN];
    id.copy_from_slice(&stored[8..8 + DATA_KEY_ID_LEN]);
    Ok((id, checksum_len))
}

/// Opens a chunk object sealed by [`seal_chunk`] with its data key (the
/// caller found it by [`check_chunk_envelope`]'s id).
pub(crate) fn open_chunk(
    dek: &DataKey,
    object_key: &str,
    mut stored: Vec<u8>,
) -> Result<Vec<u8>, OpenError> {
    let n = open_chunk_in_place(dek, object_key, &mut stored)?;
    stored.truncate(n);
    Ok(stored)
}

/// [`open_chunk`] in the caller's buffer: decrypts `stored` where it lies
/// and returns the length of the encoded chunk, which then starts the
/// buffer.
pub(crate) fn open_chunk_in_place(
    dek: &DataKey,
    object_key: &str,
    stored: &mut [u8],
) -> Result<usize, OpenError> {
    let (id, checksum_len) = envelope_parts(stored)?;
    if id != dek.id {
        return Err(OpenError::Corrupt("sealed with another data key".into()));
    }
    let sealed_len = stored.len() - checksum_len;
    let mut aad = stored[..CHUNK_HEADER_LEN].to_vec();
    aad.extend_from_slice(object_key.as_bytes());
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&stored[8 + DATA_KEY_ID_LEN..CHUNK_HEADER_LEN]);
    let n = dek
        .key
        .open_within(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad[..]),
            &mut stored[..sealed_len],
            CHUNK_HEADER_LEN..,
        )
        .map_err(|_| {
            OpenError::Corrupt(
                "decryption failed: the object was altered, or moved from another name".into(),
            )
        })?
        .len();
    Ok(n)
}

impl RecoveryKey {
    /// Whether this key is the private half of `credential`'s store.
    pub(crate) fn matches(&self, cipher: &Cipher) -> bool {
        self.key_id() == cipher.key_id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks are sealed with ring's AES-256-GCM since stores were first
    /// written with aws-lc's: each must open what the other sealed, or
    /// stores written before the switch would become unreadable.
    #[test]
    fn chunk_envelopes_are_the_same_with_ring_and_aws_lc() {
        use aws_lc_rs::aead as awslc;
        let raw = [0x5au8; KEY_LEN];
        let dek = DataKey {
            id: [7; DATA_KEY_ID_LEN],
            key: aead_key(&raw).unwrap(),
        };
        let lc_key =
            || awslc::LessSafeKey::new(awslc::UnboundKey::new(&awslc::AES_256_GCM, &raw).unwrap());
        let plain: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let object_key = "chunks/ab/abcdef";

        // Sealed here (ring), opened with aws-lc.
        let sealed = seal_chunk(&dek, object_key, &plain).unwrap();
        let mut aad = sealed[..CHUNK_HEADER_LEN].to_vec();
        aad.extend_from_slice(object_key.as_bytes());
        let nonce: [u8; NONCE_LEN] = sealed[8 + DATA_KEY_ID_LEN..CHUNK_HEADER_LEN]
            .try_into()
            .unwrap();
        let mut body = sealed[CHUNK_HEADER_LEN..sealed.len() - CHECKSUM_LEN].to_vec();
        let opened = lc_key()
            .open_in_place(
                awslc::Nonce::assume_unique_for_key(nonce),
                awslc::Aad::from(&aad[..]),
                &mut body,
            )
            .unwrap();
        assert_eq!(opened, &plain[..]);

        // Sealed with aws-lc (as stores written before were), opened here.
        let mut stored = sealed[..CHUNK_HEADER_LEN].to_vec();
        let mut ct = plain.clone();
        let tag = lc_key()
            .seal_in_place_separate_tag(
                awslc::Nonce::assume_unique_for_key(nonce),
                awslc::Aad::from(&aad[..]),
                &mut ct,
            )
            .unwrap();
        stored.extend_from_slice(&ct);
        stored.extend_from_slice(tag.as_ref());
        let sum = envelope_checksum(&stored);
        stored.extend_from_slice(&sum);
        assert_eq!(stored, sealed, "same key and nonce, same envelope");
        assert!(open_chunk(&dek, object_key, stored).is_ok_and(|p| p == plain));
    }

    #[test]
    fn recovery_key_file_round_trip() {
        let key = RecoveryKey::generate().unwrap();
        let text = key.to_file_bytes();
        let back = RecoveryKey::from_file_bytes(&text).unwrap();
        assert_eq!(back, key);
        assert_eq!(key.key_id().len(), 16);
        assert_ne!(key, RecoveryKey::generate().unwrap());
        let s = String::from_utf8(text.clone()).unwrap();
        assert!(s.starts_with("siterec-recovery-key/1\n"));
        let debug = format!("{key:?}");
        assert!(debug.contains(&key.key_id()), "{debug}");
        assert!(!debug.contains(&BASE64.encode(key.private)), "{debug}");

        // The credential has the same id and no private key.
        let cred = key.credential();
        assert_eq!(cred.key_id(), key.key_id());
        let ctext = cred.to_file_bytes();
        assert!(!contains(&ctext, BASE64.encode(key.private).as_bytes()));
        assert_eq!(StoreCredential::from_file_bytes(&ctext).unwrap(), cred);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("recovery.key");
        key.write_file(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(RecoveryKey::read_file(&path).unwrap(), key);
        let other = RecoveryKey::generate().unwrap();
        assert!(other.write_file(&path).is_err(), "never overwritten");
        assert_eq!(RecoveryKey::read_file(&path).unwrap(), key);
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn damaged_key_files_are_refused() {
        let key = RecoveryKey::from_parts([7; 32], [9; 32]).unwrap();
        let id = key.key_id();
        let p = BASE64.encode([7u8; 32]);
        let n = BASE64.encode([9u8; 32]);
        let short = BASE64.encode([7u8; 31]);
        let flipped = BASE64.encode([6u8; 32]);
        let h = RECOVERY_KEY_HEADER;
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "newline"),
            (
                format!("siterec-recovery-key/2\n{id}\n{p}\n{n}\n"),
                "first line",
            ),
            (
                format!("siterec-store-key/1\n{id}\n{p}\n{n}\n"),
                "first line",
            ),
            (format!("{h}\n{id}\n{p}\n{n}"), "newline"),
            (format!("{h}\n{id}\n{p}\n"), "4 lines"),
            (format!("{h}\n{id}\n{p}\n{n}\nextra\n"), "4 lines"),
            (format!("{h}\n{id}\n{p}!\n{n}\n"), "base64"),
            (format!("{h}\n{id}\n{short}\n{n}\n"), "31 bytes"),
            (format!("{h}\n{id}\n{flipped}\n{n}\n"), "damaged"),
            (format!("{h}\n0000000000000000\n{p}\n{n}\n"), "damaged"),
            (format!("{h}\r\n{id}\r\n{p}\r\n{n}\r\n"), "first line"),
        ];
        for (text, expect) in cases {
            let err = RecoveryKey::from_file_bytes(text.as_bytes()).unwrap_err();
            assert!(
                matches!(err, StoreError::InvalidKeyFile { .. }),
                "{text:?}: {err}"
            );
            assert!(err.to_string().contains(expect), "{text:?}: {err}");
            assert!(!err.to_string().contains(&p), "error shows the key: {err}");
        }
        // A credential is not a recovery key, and the reverse.
        assert!(RecoveryKey::from_file_bytes(&key.credential().to_file_bytes()).is_err());
        assert!(StoreCredential::from_file_bytes(&key.to_file_bytes()).is_err());
    }

    #[test]
    fn data_keys_open_only_with_the_recovery_key() {
        let key = RecoveryKey::generate().unwrap();
        let cipher = Cipher::new(&key.credential()).unwrap();
        let (dek, name, sealed) = DataKey::generate(cipher.public()).unwrap();
        assert_eq!(&sealed[..8], DATA_KEY_MAGIC);
        assert_eq!(name, data_key_object(&dek.id));
        let chunk = seal_chunk(&dek, "chunks/ab/x", b"hello world").unwrap();
        assert_eq!(&chunk[..8], ENVELOPE_MAGIC);
        assert_eq!(chunk.len(), 11 + ENVELOPE_OVERHEAD);
        assert_eq!(check_chunk_envelope(&chunk).ok(), Some(dek.id));

        let opened = DataKey::open(&key, dek.id, &sealed).unwrap();
        assert_eq!(
            open_chunk(&opened, "chunks/ab/x", chunk.clone())
                .ok()
                .unwrap(),
            b"hello world"
        );
        // Another recovery key, another name for the key object, one
        // flipped bit: refused.
        let other = RecoveryKey::generate().unwrap();
        assert!(DataKey::open(&other, dek.id, &sealed).is_err());
        assert!(DataKey::open(&key, [0; 8], &sealed).is_err());
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x10;
            assert!(DataKey::open(&key, dek.id, &bad).is_err(), "byte {i}");
        }
        assert!(open_chunk(&opened, "chunks/ab/y", chunk.clone()).is_err());
        for i in 0..chunk.len() {
            let mut bad = chunk.clone();
            bad[i] ^= 0x10;
            assert!(check_chunk_envelope(&bad).is_err(), "byte {i}: checksum");
            assert!(open_chunk(&opened, "chunks/ab/x", bad).is_err(), "byte {i}");
        }
        // Sealing into a buffer of the wrong length is refused, whatever
        // the buffer held.
        for len in [chunk.len() - 1, chunk.len() + 1] {
            let mut out = vec![0xEE; len];
            assert!(seal_chunk_into(&dek, "chunks/ab/x", b"hello world", &mut out).is_err());
        }
        let mut newer = chunk.clone();
        newer[7] = b'4';
        assert!(matches!(
            check_chunk_envelope(&newer),
            Err(OpenError::Newer(4))
        ));
        // Envelope version 2 (BLAKE3 checksum), as earlier versions wrote
        // it, still opens; damage in it is still found.
        let mut v2 = chunk[..chunk.len() - CHECKSUM_LEN].to_vec();
        v2[..8].copy_from_slice(ENVELOPE_MAGIC_V2);
        let v2_key = "chunks/ab/v2";
        let mut aad = v2[..CHUNK_HEADER_LEN].to_vec();
        aad.extend_from_slice(v2_key.as_bytes());
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&v2[8 + DATA_KEY_ID_LEN..CHUNK_HEADER_LEN]);
        v2.truncate(CHUNK_HEADER_LEN);
        v2.extend_from_slice(b"hello world");
        let tag = dek
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad[..]),
                &mut v2[CHUNK_HEADER_LEN..],
            )
            .unwrap();
        v2.extend_from_slice(tag.as_ref());
        let sum = blake3::hash(&v2);
        v2.extend_from_slice(sum.as_bytes());
        assert_eq!(v2.len(), 11 + ENVELOPE_OVERHEAD + 16);
        assert_eq!(check_chunk_envelope(&v2).ok(), Some(dek.id));
        assert_eq!(
            open_chunk(&opened, v2_key, v2.clone()).ok().unwrap(),
            b"hello world"
        );
        for i in 0..v2.len() {
            let mut bad = v2.clone();
            bad[i] ^= 0x10;
            assert!(check_chunk_envelope(&bad).is_err(), "v2 byte {i}");
            assert!(open_chunk(&opened, v2_key, bad).is_err(), "v2 byte {i}");
        }
        assert_ne!(
            seal_chunk(&dek, "k", b"a").unwrap(),
            seal_chunk(&dek, "k", b"a").unwrap()
        );
        // Shared secrets agree both ways (sanity of the X25519 use).
        let t = TransportKey::generate().unwrap();
        assert_eq!(
            x25519_agree(&key.private, &t.public).unwrap(),
            x25519_agree(&t.private, &key.public).unwrap()
        );
    }

    #[test]
    fn transport_seal_opens_only_with_its_key() {
        let agent = TransportKey::generate().unwrap();
        let back = TransportKey::from_file_bytes(&agent.to_file_bytes()).unwrap();
        assert_eq!(back.public_key_base64(), agent.public_key_base64());
        let secret = RecoveryKey::generate().unwrap().to_file_bytes();
        let sealed = seal_for_transport(&agent.public_key_base64(), &secret).unwrap();
        assert_eq!(&sealed[..8], TRANSPORT_MAGIC);
        assert!(!contains(&sealed, &secret[30..60]));
        assert_eq!(back.open(&sealed).unwrap(), secret);
        assert!(TransportKey::generate().unwrap().open(&sealed).is_err());
        let mut bad = sealed.clone();
        bad[50] ^= 1;
        assert!(agent.open(&bad).is_err());
        assert!(seal_for_transport("not base64!", b"x").is_err());
        assert!(seal_for_transport(&BASE64.encode([1u8; 5]), b"x").is_err());
    }
}
