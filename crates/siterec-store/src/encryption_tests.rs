//! Tests of encrypted stores (format version 3) on a [`crate::LocalDir`]
//! backend: the recovery agent writes with the credential, only the
//! recovery key reads data.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use base64::Engine;

use crate::store_tests::{
    CS, delta_manifest, image, manifest, random, read_back, texty, upload_disk,
};
use crate::*;

/// Opens with the credential of `key` (what the recovery agent does).
async fn open(dir: &Path, key: Option<&RecoveryKey>) -> Result<Store, StoreError> {
    let backend: Arc<dyn Backend> = Arc::new(LocalDir::new(dir)?);
    Store::open_or_create_with_credential(backend, key.map(RecoveryKey::credential)).await
}

/// Every file under `dir`, by path relative to it, with its content.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    // The pack files are in there as they are; each chunk object in them
    // is added under its key too.
    let objects = LocalDir::new(dir).unwrap();
    for key in objects.packed_keys() {
        let (path, at, len) = objects.locate(&key).unwrap().unwrap();
        let mut bytes = vec![0u8; len];
        std::os::unix::fs::FileExt::read_exact_at(
            &std::fs::File::open(path).unwrap(),
            &mut bytes,
            at,
        )
        .unwrap();
        out.insert(key, bytes);
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The private key of a recovery key, from its file (line 3, base64).
fn private_key_bytes(key: &RecoveryKey) -> Vec<u8> {
    let text = String::from_utf8(key.to_file_bytes()).unwrap();
    let line = text.lines().nth(2).unwrap();
    base64::engine::general_purpose::STANDARD
        .decode(line)
        .unwrap()
}

#[tokio::test]
async fn encrypted_round_trip_hides_names_and_data() {
    let dir = tempfile::tempdir().unwrap();
    let key = RecoveryKey::generate().unwrap();
    let writer = open(dir.path(), Some(&key)).await.unwrap();
    assert!(writer.is_encrypted());
    assert!(!writer.can_read_data());
    assert_eq!(writer.key_id(), Some(key.key_id()));
    assert_eq!(writer.info().version, 3);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(STORE_INFO_KEY)).unwrap()).unwrap();
    assert_eq!(json["version"], 3);
    assert_eq!(json["encryption"]["algorithm"], "AES-256-GCM");
    assert_eq!(json["encryption"]["keyWrap"], "X25519-BLAKE3-AES-256-GCM");
    assert_eq!(json["encryption"]["keyId"], key.key_id().as_str());
    assert_eq!(json["encryption"]["nameKey"], "blake3-keyed");
    assert_eq!(
        json["encryption"]["publicKey"],
        key.credential().public_key_base64().as_str()
    );

    let img = image();
    let disk = upload_disk(&writer, "disk0", &img).await;
    let disk2 = upload_disk(&writer, "disk1", &texty(3 * CS as usize, 7)).await;
    let m = manifest("vm-1", "p1", vec![disk, disk2]);
    writer.commit_point(&m).await.unwrap();
    writer.commit_point(&m).await.unwrap(); // idempotent despite new nonces
    assert_eq!(writer.read_manifest("vm-1", "p1").await.unwrap(), m);
    let reader = writer.with_recovery_key(&key).unwrap();
    assert!(reader.can_read_data());
    assert_eq!(read_back(&reader, &m, 0, 3).await, img);
    writer.sync().await.unwrap();
    drop((writer, reader));

    // Another session (a restart): a new data key; both read back.
    let writer = open(dir.path(), Some(&key)).await.unwrap();
    assert!(writer.last_recovery().is_none());
    let extra = writer
        .put_plain_chunk(texty(7000, 9), true)
        .await
        .unwrap()
        .unwrap();
    let reader = writer.with_recovery_key(&key).unwrap();
    assert_eq!(writer.list_points(None).await.unwrap().len(), 1);
    assert_eq!(read_back(&reader, &m, 0, 1).await, img);
    assert_eq!(
        read_back(&reader, &m, 1, 2).await,
        texty(3 * CS as usize, 7)
    );
    assert_eq!(reader.get_chunk(extra).await.unwrap(), texty(7000, 9));
    for handle in [&writer, &reader] {
        let report = handle.verify().await.unwrap();
        assert!(report.all_ok(), "{report:?}");
        assert_eq!(report.chunks_checked, m.referenced_chunks().len() as u64);
    }

    // Nothing on disk reveals chunk ids, the text of the disks, or the
    // recovery key: neither names nor contents.
    let ids = m.referenced_chunks();
    let files = snapshot(dir.path());
    let chunk_files: Vec<&String> = files.keys().filter(|k| k.starts_with("chunks/")).collect();
    assert_eq!(chunk_files.len(), ids.len() + 1);
    let key_files: Vec<&String> = files.keys().filter(|k| k.starts_with("keys/")).collect();
    assert_eq!(key_files.len(), 2, "one data key per writer session");
    let text = b"of a text-like disk";
    let private = private_key_bytes(&key);
    let private_b64 = base64::engine::general_purpose::STANDARD.encode(&private);
    for (name, bytes) in &files {
        for id in &ids {
            assert!(!name.contains(&id.to_hex()), "{name} names chunk {id}");
            assert!(
                !contains(bytes, id.as_bytes()),
                "{name} holds chunk id {id}"
            );
        }
        assert!(!contains(bytes, text), "{name} holds plaintext");
        assert!(!contains(bytes, &private), "{name} holds the private key");
        assert!(!contains(bytes, private_b64.as_bytes()), "{name}");
        if name.starts_with("chunks/") {
            assert_eq!(&bytes[..8], ENVELOPE_MAGIC, "{name}");
        } else if name.starts_with("points/") {
            assert_eq!(&bytes[..8], MANIFEST_ENVELOPE_MAGIC, "{name}");
        } else if name.starts_with("keys/") {
            assert_eq!(&bytes[..8], DATA_KEY_MAGIC, "{name}");
        }
    }
    // (The same data in a plain store does show the text: the check above
    // is not vacuous.)
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = open(plain_dir.path(), None).await.unwrap();
    upload_disk(&plain, "disk0", &img).await;
    assert!(
        snapshot(plain_dir.path())
            .values()
            .any(|b| contains(b, text))
    );

    // put_encoded_chunk keeps its contract without the recovery key:
    // verified, deduplicated.
    let enc = encode_chunk(&texty(5000, 3), true);
    let other = encode_chunk(&texty(5000, 4), true);
    assert!(matches!(
        writer.put_encoded_chunk(other.id, enc.bytes.clone()).await,
        Err(StoreError::CorruptChunk { .. })
    ));
    assert!(
        writer
            .put_encoded_chunk(enc.id, enc.bytes.clone())
            .await
            .unwrap()
    );
    assert!(!writer.put_encoded_chunk(enc.id, enc.bytes).await.unwrap());
    assert_eq!(reader.get_chunk(enc.id).await.unwrap(), texty(5000, 3));
    assert!(writer.has_chunk(enc.id).await.unwrap());
    assert!(!writer.has_chunk(other.id).await.unwrap());
    let zero = encode_chunk(&[0u8; 100], false);
    assert!(matches!(
        writer.put_encoded_chunk(zero.id, zero.bytes).await,
        Err(StoreError::ZeroChunk { .. })
    ));
}

#[tokio::test]
async fn keys_are_required_and_mismatches_refused_without_touching_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let key = RecoveryKey::generate().unwrap();
    let store = open(dir.path(), Some(&key)).await.unwrap();
    let id = store
        .put_plain_chunk(random(5000), true)
        .await
        .unwrap()
        .unwrap();

    // No data without the recovery key.
    let err = store.get_chunk(id).await.unwrap_err();
    match &err {
        StoreError::RecoveryKeyRequired { key_id } => assert_eq!(*key_id, key.key_id()),
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("recovery key file"), "{err}");
    // Another store's recovery key: WrongKey, naming the expected id.
    let wrong = RecoveryKey::generate().unwrap();
    let err = store.with_recovery_key(&wrong).unwrap_err();
    match &err {
        StoreError::WrongKey { expected, got } => {
            assert_eq!(*expected, key.key_id());
            assert_eq!(*got, wrong.key_id());
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains(&key.key_id()), "{err}");
    // Leave the unsynced marker behind, as after a crash: a refused open
    // must not even run the recovery scan.
    drop(store);
    let before = snapshot(dir.path());
    assert!(before.contains_key(UNSYNCED_MARKER_KEY));

    let err = open(dir.path(), None).await.unwrap_err();
    match &err {
        StoreError::CredentialRequired { key_id } => assert_eq!(*key_id, key.key_id()),
        other => panic!("{other}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("encrypted") && text.contains("credential") && text.contains(&key.key_id()),
        "{text}"
    );
    assert!(Store::open_local(dir.path()).await.is_err());
    let err = open(dir.path(), Some(&wrong)).await.unwrap_err();
    assert!(matches!(err, StoreError::WrongKey { .. }), "{err}");
    assert_eq!(
        snapshot(dir.path()),
        before,
        "a refused open wrote something"
    );

    // A plain store refuses a credential and a recovery key, clearly.
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = open(plain_dir.path(), None).await.unwrap();
    plain.put_plain_chunk(random(5000), true).await.unwrap();
    assert!(matches!(
        plain.with_recovery_key(&key),
        Err(StoreError::NotEncrypted)
    ));
    drop(plain);
    let before = snapshot(plain_dir.path());
    let err = open(plain_dir.path(), Some(&key)).await.unwrap_err();
    assert!(matches!(err, StoreError::NotEncrypted), "{err}");
    assert!(err.to_string().contains("not encrypted"), "{err}");
    assert_eq!(snapshot(plain_dir.path()), before);

    // The right credential still opens it (and recovers from the "crash"
    // without the recovery key), and the recovery key reads the chunk.
    let store = open(dir.path(), Some(&key)).await.unwrap();
    let rec = store.last_recovery().unwrap();
    assert_eq!(rec.chunks_checked + rec.chunks_known_whole, 1);
    assert!(rec.objects_removed.is_empty());
    let reader = store.with_recovery_key(&key).unwrap();
    assert_eq!(reader.get_chunk(id).await.unwrap().len(), 5000);
}

#[tokio::test]
async fn a_version_2_store_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(STORE_INFO_KEY),
        br#"{"format":"siterec-store","version":2,"created_at":"2025-01-01T00:00:00Z","chunk_layout":"chunks/<hex[0..2]>/<hex>","encryption":{"algorithm":"AES-256-GCM","keyId":"0011223344556677","nameKey":"blake3-keyed"}}"#,
    )
    .unwrap();
    let before = snapshot(dir.path());
    for key in [None, Some(RecoveryKey::generate().unwrap())] {
        let err = open(dir.path(), key.as_ref()).await.unwrap_err();
        assert!(
            matches!(err, StoreError::RetiredVersion { found: 2 }),
            "{err}"
        );
        assert!(err.to_string().contains("create a new store"), "{err}");
    }
    assert_eq!(snapshot(dir.path()), before);
}

#[tokio::test]
async fn tampering_with_encrypted_objects_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let key = RecoveryKey::generate().unwrap();
    let writer = open(dir.path(), Some(&key)).await.unwrap();
    let store = writer.with_recovery_key(&key).unwrap();
    let img = image();
    let disk = upload_disk(&writer, "disk0", &img).await;
    let m = manifest("vm-1", "p1", vec![disk]);
    writer.commit_point(&m).await.unwrap();
    // Where an object lies, and its bytes there.
    let at = |id: &ChunkId| {
        LocalDir::new(dir.path())
            .unwrap()
            .locate(&store.chunk_object_key(id))
            .unwrap()
            .unwrap()
    };
    let read_at = |(path, off, len): &(std::path::PathBuf, u64, usize)| {
        let mut bytes = vec![0u8; *len];
        std::os::unix::fs::FileExt::read_exact_at(
            &std::fs::File::open(path).unwrap(),
            &mut bytes,
            *off,
        )
        .unwrap();
        bytes
    };
    let write_at = |(path, off, _): &(std::path::PathBuf, u64, usize), bytes: &[u8]| {
        std::os::unix::fs::FileExt::write_all_at(
            &std::fs::OpenOptions::new().write(true).open(path).unwrap(),
            bytes,
            *off,
        )
        .unwrap();
    };

    // One flipped byte: reading with the key and verifying without it
    // both find it.
    let victim = m.disks[0].chunks[2].unwrap();
    let place = at(&victim);
    let mut bytes = read_at(&place);
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    write_at(&place, &bytes);
    let err = store.get_chunk(victim).await.unwrap_err();
    assert!(
        matches!(err, StoreError::CorruptChunk { id, .. } if id == victim),
        "{err}"
    );
    for handle in [&store, &writer] {
        let report = handle.verify().await.unwrap();
        assert!(!report.all_ok());
        assert_eq!(report.points[0].damaged_chunks, [victim]);
    }

    // Two valid encrypted chunks swapped: each decrypts only under its
    // name (their checksums are intact: only the key can tell).
    let a = m.disks[0].chunks[0].unwrap();
    let b = m.disks[0].chunks[4].unwrap();
    let (ka, kb) = (store.chunk_object_key(&a), store.chunk_object_key(&b));
    let backend = store.backend();
    let ba = backend.get(&ka).await.unwrap().unwrap();
    let bb = backend.get(&kb).await.unwrap().unwrap();
    backend.put(&ka, bb).await.unwrap();
    backend.put(&kb, ba).await.unwrap();
    for id in [a, b] {
        let err = store.get_chunk(id).await.unwrap_err();
        assert!(
            matches!(err, StoreError::CorruptChunk { id: got, .. } if got == id),
            "{err}"
        );
    }
    let report = store.verify().await.unwrap();
    let damaged: HashSet<ChunkId> = report.points[0].damaged_chunks.iter().copied().collect();
    assert_eq!(damaged, HashSet::from([victim, a, b]));

    // A plaintext chunk object dropped in place of an encrypted one.
    backend
        .put(&ka, encode_chunk(&img[..CS as usize], true).bytes)
        .await
        .unwrap();
    assert!(matches!(
        store.get_chunk(a).await,
        Err(StoreError::CorruptChunk { .. })
    ));
    assert!(matches!(
        writer.check_chunk(a).await,
        Err(StoreError::CorruptChunk { .. })
    ));

    // A lost data key: the chunks sealed with it are reported, not read.
    let keys: Vec<String> = snapshot(dir.path())
        .into_keys()
        .filter(|k| k.starts_with("keys/"))
        .collect();
    assert_eq!(keys.len(), 1);
    let saved = std::fs::read(dir.path().join(&keys[0])).unwrap();
    std::fs::remove_file(dir.path().join(&keys[0])).unwrap();
    let fresh = writer.with_recovery_key(&key).unwrap(); // no cached data keys
    let err = fresh.get_chunk(b).await.unwrap_err();
    assert!(err.to_string().contains("data key"), "{err}");
    assert!(writer.check_chunk(b).await.is_err());
    std::fs::write(dir.path().join(&keys[0]), saved).unwrap();

    // The manifest: one flipped bit, or another point's manifest.
    let mkey = dir.path().join(manifest_key("vm-1", "p1").unwrap());
    let good = std::fs::read(&mkey).unwrap();
    let mut bad = good.clone();
    bad[30] ^= 0x80;
    std::fs::write(&mkey, &bad).unwrap();
    assert!(matches!(
        writer.read_manifest("vm-1", "p1").await,
        Err(StoreError::CorruptManifest { .. })
    ));
    std::fs::write(&mkey, &good).unwrap();
    writer.read_manifest("vm-1", "p1").await.unwrap();
    let other_dir = dir.path().join("points/vm-1/p2.manifest");
    std::fs::write(&other_dir, &good).unwrap();
    assert!(matches!(
        writer.read_manifest("vm-1", "p2").await,
        Err(StoreError::CorruptManifest { .. })
    ));
}

/// Delta chunks are put and checked with the credential alone (their base
/// must exist by object name) and rebuilt on their base with the key, the
/// base sealed in an earlier writer session (another data key), through
/// the backend's blocking calls and without them.
#[tokio::test]
async fn delta_chunks_round_trip_in_an_encrypted_store() {
    for async_only in [false, true] {
        for upload in [false, true] {
            delta_chunks_round_trip(async_only, upload).await;
        }
    }
}

async fn delta_chunks_round_trip(async_only: bool, upload: bool) {
    use crate::store_tests::put_object;
    let dir = tempfile::tempdir().unwrap();
    let key = RecoveryKey::generate().unwrap();
    let open = |key: &RecoveryKey| {
        let local = LocalDir::new(dir.path()).unwrap();
        let backend: Arc<dyn Backend> = if async_only {
            Arc::new(crate::store_tests::AsyncOnly(local))
        } else {
            Arc::new(local)
        };
        Store::open_or_create_with_credential(backend, Some(key.credential()))
    };
    let first = open(&key).await.unwrap();
    let v1 = texty(CS as usize, 1);
    let base = encode_chunk(&v1, true);
    let mut v2 = v1.clone();
    v2[4096..8192].copy_from_slice(&random(4096));
    let target = ChunkId::of(&v2);
    let pages: Vec<(u16, &[u8])> = vec![(1, &v2[4096..8192])];
    let delta = encode_delta_chunk(target, v2.len() as u32, base.id, &pages, true);
    assert!(matches!(
        put_object(&first, delta.id, &delta.bytes, upload).await,
        Err(StoreError::MissingChunk { id, .. }) if id == base.id
    ));
    assert!(
        put_object(&first, base.id, &base.bytes, upload)
            .await
            .unwrap()
    );
    first.sync().await.unwrap();
    drop(first);
    let writer = open(&key).await.unwrap();
    assert!(
        put_object(&writer, delta.id, &delta.bytes, upload)
            .await
            .unwrap()
    );
    let m = delta_manifest(delta.id, base.id);
    writer.commit_point(&m).await.unwrap();
    assert!(matches!(
        writer.get_chunk(delta.id).await,
        Err(StoreError::RecoveryKeyRequired { .. })
    ));
    let data_keys = snapshot(dir.path())
        .keys()
        .filter(|k| k.starts_with("keys/"))
        .count();
    assert_eq!(data_keys, 2, "the two sessions seal with two data keys");
    // A whole chunk big enough to be written with direct I/O, sealed
    // where it was received when sent as an upload.
    let big = random(300_001);
    let big_enc = encode_chunk(&big, true);
    assert!(
        put_object(&writer, big_enc.id, &big_enc.bytes, upload)
            .await
            .unwrap()
    );
    let reader = writer.with_recovery_key(&key).unwrap();
    assert_eq!(reader.get_chunk(big_enc.id).await.unwrap(), big);
    assert_eq!(reader.get_chunk(delta.id).await.unwrap(), v2);
    assert_eq!(read_back(&reader, &m, 0, 2).await, v2);
    let report = writer.gc(&HashSet::new()).await.unwrap();
    assert_eq!(
        report.chunks_deleted, 1,
        "only the unreferenced big chunk: {report:?}"
    );
    assert!(writer.verify().await.unwrap().all_ok());
    assert!(reader.verify().await.unwrap().all_ok());
    // Neither the delta's nor the base's object is named by its id.
    for id in [delta.id, base.id, target] {
        assert!(
            !snapshot(dir.path())
                .keys()
                .any(|k| k.contains(&id.to_hex()))
        );
    }
}

#[tokio::test]
async fn gc_and_recovery_on_an_encrypted_store() {
    let dir = tempfile::tempdir().unwrap();
    let key = RecoveryKey::generate().unwrap();
    let store = open(dir.path(), Some(&key)).await.unwrap();
    let img1 = image();
    let mut img2 = img1.clone();
    img2[CS as usize * 2..CS as usize * 3].copy_from_slice(&random(CS as usize));
    let d1 = upload_disk(&store, "disk0", &img1).await;
    let d2 = upload_disk(&store, "disk0", &img2).await;
    let m1 = manifest("vm-1", "p1", vec![d1.clone()]);
    let m2 = manifest("vm-1", "p2", vec![d2.clone()]);
    store.commit_point(&m1).await.unwrap();
    store.commit_point(&m2).await.unwrap();
    let orphan = store
        .put_plain_chunk(texty(5000, 20), true)
        .await
        .unwrap()
        .unwrap();
    let in_flight = store
        .put_plain_chunk(texty(5000, 21), true)
        .await
        .unwrap()
        .unwrap();
    let referenced: HashSet<ChunkId> = m1
        .referenced_chunks()
        .union(&m2.referenced_chunks())
        .copied()
        .collect();
    let names = |s: &Store, ids: &HashSet<ChunkId>| -> HashSet<String> {
        ids.iter().map(|id| s.chunk_object_key(id)).collect()
    };
    let listed = || -> HashSet<String> {
        snapshot(dir.path())
            .into_keys()
            .filter(|k| k.starts_with("chunks/"))
            .collect()
    };

    // gc runs with the credential alone.
    let report = store.gc(&HashSet::from([in_flight])).await.unwrap();
    assert_eq!(report.points, 2);
    assert_eq!(report.chunks_deleted, 1);
    assert_eq!(report.chunks_kept, 5);
    let mut expected = referenced.clone();
    expected.insert(in_flight);
    assert_eq!(listed(), names(&store, &expected));
    assert!(!store.has_chunk(orphan).await.unwrap());

    store.delete_point("vm-1", "p1").await.unwrap();
    let report = store.gc(&HashSet::new()).await.unwrap();
    assert_eq!(report.chunks_deleted, 2);
    assert_eq!(listed(), names(&store, &m2.referenced_chunks()));
    let reader = store.with_recovery_key(&key).unwrap();
    assert_eq!(read_back(&reader, &m2, 0, 4).await, img2);
    assert!(store.verify().await.unwrap().all_ok());
    // Data keys are never collected (one small object per session).
    assert_eq!(
        snapshot(dir.path())
            .keys()
            .filter(|k| k.starts_with("keys/"))
            .count(),
        1
    );
}

#[tokio::test]
async fn crash_recovery_without_the_recovery_key() {
    for packs in [false, true] {
        crash_recovery_without_the_recovery_key_in(packs).await;
    }
}

/// Crash recovery without the recovery key: a torn chunk goes (its
/// checksum fails, or the pack's scan stops at it), the others stay.
async fn crash_recovery_without_the_recovery_key_in(packs: bool) {
    let dir = tempfile::tempdir().unwrap();
    let key = RecoveryKey::generate().unwrap();
    let open = || async {
        let backend = crate::store_tests::local_layout(dir.path(), packs);
        Store::open_or_create_with_credential(Arc::new(backend), Some(key.credential()))
            .await
            .unwrap()
    };
    let store = open().await;
    let committed = store
        .put_plain_chunk(texty(9000, 3), true)
        .await
        .unwrap()
        .unwrap();
    store.sync().await.unwrap();
    let good = store
        .put_plain_chunk(texty(9000, 1), true)
        .await
        .unwrap()
        .unwrap();
    let torn = store
        .put_plain_chunk(texty(9000, 2), true)
        .await
        .unwrap()
        .unwrap();
    let torn_key = store.chunk_object_key(&torn);
    drop(store);
    let (path, at, len) = LocalDir::new(dir.path())
        .unwrap()
        .locate(&torn_key)
        .unwrap()
        .unwrap();
    if packs {
        // Its second half never reached the disk.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; len / 2], at + len as u64 / 2)
            .unwrap();
    } else {
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    }
    let store = open().await;
    let rec = store.last_recovery().unwrap();
    if packs {
        // Opening stopped at the torn entry: recovery never saw it, nor
        // read the two whole ones.
        assert_eq!(rec.chunks_checked, 0);
        assert_eq!(rec.chunks_known_whole, 2);
        assert!(rec.objects_removed.is_empty());
    } else {
        assert_eq!(rec.chunks_checked, 3);
        assert_eq!(rec.objects_removed, [torn_key]);
    }
    assert!(rec.chunks_removed.is_empty());
    assert!(store.has_chunk(committed).await.unwrap());
    assert!(store.has_chunk(good).await.unwrap());
    assert!(!store.has_chunk(torn).await.unwrap());
    assert!(store.verify().await.unwrap().all_ok());
    let reader = store.with_recovery_key(&key).unwrap();
    assert_eq!(reader.get_chunk(good).await.unwrap(), texty(9000, 1));
    assert_eq!(reader.get_chunk(committed).await.unwrap(), texty(9000, 3));
}
