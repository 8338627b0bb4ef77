//! Tests of encrypted stores on a [`crate::LocalDir`] backend.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use crate::store_tests::{CS, image, manifest, random, read_back, texty, upload_disk};
use crate::*;

async fn open(dir: &Path, key: Option<StoreKey>) -> Result<Store, StoreError> {
    let backend: Arc<dyn Backend> = Arc::new(LocalDir::new(dir)?);
    Store::open_or_create_with_key(backend, key).await
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
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn encrypted_round_trip_hides_names_and_data() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate().unwrap();
    let store = open(dir.path(), Some(key.clone())).await.unwrap();
    assert!(store.is_encrypted());
    assert_eq!(store.key_id(), Some(key.key_id()));
    assert_eq!(store.info().version, STORE_FORMAT_VERSION_ENCRYPTED);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(STORE_INFO_KEY)).unwrap()).unwrap();
    assert_eq!(json["version"], 2);
    assert_eq!(json["encryption"]["algorithm"], "AES-256-GCM");
    assert_eq!(json["encryption"]["keyId"], key.key_id().as_str());
    assert_eq!(json["encryption"]["nameKey"], "blake3-keyed");

    let img = image();
    let disk = upload_disk(&store, "disk0", &img).await;
    let disk2 = upload_disk(&store, "disk1", &texty(3 * CS as usize, 7)).await;
    let m = manifest("vm-1", "p1", vec![disk, disk2]);
    store.commit_point(&m).await.unwrap();
    store.commit_point(&m).await.unwrap(); // idempotent despite new nonces
    assert_eq!(read_back(&store, &m, 0, 3).await, img);
    assert_eq!(store.read_manifest("vm-1", "p1").await.unwrap(), m);
    store.sync().await.unwrap();
    drop(store);

    let store = open(dir.path(), Some(key.clone())).await.unwrap();
    assert!(store.last_recovery().is_none());
    assert_eq!(store.list_points(None).await.unwrap().len(), 1);
    assert_eq!(read_back(&store, &m, 0, 1).await, img);
    assert_eq!(read_back(&store, &m, 1, 2).await, texty(3 * CS as usize, 7));
    let report = store.verify().await.unwrap();
    assert!(report.all_ok(), "{report:?}");
    assert_eq!(report.chunks_checked, m.referenced_chunks().len() as u64);

    // Nothing on disk reveals chunk ids or the text of the disks: neither
    // names nor contents (the manifest is encrypted too).
    let ids = m.referenced_chunks();
    let files = snapshot(dir.path());
    let chunk_files: Vec<&String> = files.keys().filter(|k| k.starts_with("chunks/")).collect();
    assert_eq!(chunk_files.len(), ids.len());
    let text = b"of a text-like disk";
    for (name, bytes) in &files {
        for id in &ids {
            assert!(!name.contains(&id.to_hex()), "{name} names chunk {id}");
            assert!(
                !contains(bytes, id.as_bytes()),
                "{name} holds chunk id {id}"
            );
        }
        assert!(!contains(bytes, text), "{name} holds plaintext");
        if name.starts_with("chunks/") || name.starts_with("points/") {
            assert_eq!(&bytes[..8], ENVELOPE_MAGIC, "{name}");
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

    // put_encoded_chunk keeps its contract: verified, deduplicated.
    let enc = encode_chunk(&texty(5000, 3), true);
    let other = encode_chunk(&texty(5000, 4), true);
    assert!(matches!(
        store.put_encoded_chunk(other.id, enc.bytes.clone()).await,
        Err(StoreError::CorruptChunk { .. })
    ));
    assert!(
        store
            .put_encoded_chunk(enc.id, enc.bytes.clone())
            .await
            .unwrap()
    );
    assert!(!store.put_encoded_chunk(enc.id, enc.bytes).await.unwrap());
    assert_eq!(store.get_chunk(enc.id).await.unwrap(), texty(5000, 3));
    assert!(store.has_chunk(enc.id).await.unwrap());
    assert!(!store.has_chunk(other.id).await.unwrap());
    let zero = encode_chunk(&[0u8; 100], false);
    assert!(matches!(
        store.put_encoded_chunk(zero.id, zero.bytes).await,
        Err(StoreError::ZeroChunk { .. })
    ));
}

#[tokio::test]
async fn key_mismatches_are_refused_without_touching_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate().unwrap();
    let store = open(dir.path(), Some(key.clone())).await.unwrap();
    // Leave the unsynced marker behind, as after a crash: a refused open
    // must not even run the recovery scan.
    store.put_plain_chunk(random(5000), true).await.unwrap();
    drop(store);
    let before = snapshot(dir.path());
    assert!(before.contains_key(UNSYNCED_MARKER_KEY));

    let err = open(dir.path(), None).await.unwrap_err();
    match &err {
        StoreError::KeyRequired { key_id } => assert_eq!(*key_id, key.key_id()),
        other => panic!("{other}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("encrypted") && text.contains("key file") && text.contains(&key.key_id()),
        "{text}"
    );
    assert!(Store::open_local(dir.path()).await.is_err());

    let wrong = StoreKey::generate().unwrap();
    let err = open(dir.path(), Some(wrong.clone())).await.unwrap_err();
    match &err {
        StoreError::WrongKey { expected, got } => {
            assert_eq!(*expected, key.key_id());
            assert_eq!(*got, wrong.key_id());
        }
        other => panic!("{other}"),
    }
    assert_eq!(
        snapshot(dir.path()),
        before,
        "a refused open wrote something"
    );

    // A plain store refuses a key, clearly.
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = open(plain_dir.path(), None).await.unwrap();
    plain.put_plain_chunk(random(5000), true).await.unwrap();
    drop(plain);
    let before = snapshot(plain_dir.path());
    let err = open(plain_dir.path(), Some(key.clone())).await.unwrap_err();
    assert!(matches!(err, StoreError::NotEncrypted), "{err}");
    assert!(err.to_string().contains("not encrypted"), "{err}");
    assert_eq!(snapshot(plain_dir.path()), before);

    // The right key still opens it (and recovers from the "crash").
    let store = open(dir.path(), Some(key)).await.unwrap();
    let rec = store.last_recovery().unwrap();
    assert_eq!(rec.chunks_checked, 1);
    assert!(rec.objects_removed.is_empty());
}

#[tokio::test]
async fn tampering_with_encrypted_objects_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Some(StoreKey::generate().unwrap()))
        .await
        .unwrap();
    let img = image();
    let disk = upload_disk(&store, "disk0", &img).await;
    let m = manifest("vm-1", "p1", vec![disk]);
    store.commit_point(&m).await.unwrap();
    let path_of = |id: &ChunkId| dir.path().join(store.chunk_object_key(id));

    // One flipped byte.
    let victim = m.disks[0].chunks[2].unwrap();
    let mut bytes = std::fs::read(path_of(&victim)).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(path_of(&victim), &bytes).unwrap();
    let err = store.get_chunk(victim).await.unwrap_err();
    assert!(
        matches!(err, StoreError::CorruptChunk { id, .. } if id == victim),
        "{err}"
    );
    let report = store.verify().await.unwrap();
    assert!(!report.all_ok());
    assert_eq!(report.points[0].damaged_chunks, [victim]);

    // Two valid encrypted chunks swapped: each decrypts only under its name.
    let a = m.disks[0].chunks[0].unwrap();
    let b = m.disks[0].chunks[4].unwrap();
    let (pa, pb) = (path_of(&a), path_of(&b));
    let (ba, bb) = (std::fs::read(&pa).unwrap(), std::fs::read(&pb).unwrap());
    std::fs::write(&pa, &bb).unwrap();
    std::fs::write(&pb, &ba).unwrap();
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
    std::fs::write(&pa, encode_chunk(&img[..CS as usize], true).bytes).unwrap();
    assert!(matches!(
        store.get_chunk(a).await,
        Err(StoreError::CorruptChunk { .. })
    ));

    // The manifest: one flipped bit, or another point's manifest.
    let mkey = dir.path().join(manifest_key("vm-1", "p1").unwrap());
    let good = std::fs::read(&mkey).unwrap();
    let mut bad = good.clone();
    bad[30] ^= 0x80;
    std::fs::write(&mkey, &bad).unwrap();
    assert!(matches!(
        store.read_manifest("vm-1", "p1").await,
        Err(StoreError::CorruptManifest { .. })
    ));
    std::fs::write(&mkey, &good).unwrap();
    store.read_manifest("vm-1", "p1").await.unwrap();
    let other_dir = dir.path().join("points/vm-1/p2.manifest");
    std::fs::write(&other_dir, &good).unwrap();
    assert!(matches!(
        store.read_manifest("vm-1", "p2").await,
        Err(StoreError::CorruptManifest { .. })
    ));
}

#[tokio::test]
async fn gc_and_recovery_on_an_encrypted_store() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate().unwrap();
    let store = open(dir.path(), Some(key.clone())).await.unwrap();
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
    assert_eq!(read_back(&store, &m2, 0, 4).await, img2);
    assert!(store.verify().await.unwrap().all_ok());

    // Crash recovery maps names back correctly: a torn chunk goes, the
    // others (whose names it can only check by decrypting) stay.
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
    std::fs::write(dir.path().join(&torn_key), b"").unwrap();
    let store = open(dir.path(), Some(key)).await.unwrap();
    let rec = store.last_recovery().unwrap();
    assert_eq!(rec.chunks_checked, m2.referenced_chunks().len() as u64 + 2);
    assert_eq!(rec.objects_removed, [torn_key]);
    assert!(rec.chunks_removed.is_empty());
    assert!(store.has_chunk(good).await.unwrap());
    assert!(!store.has_chunk(torn).await.unwrap());
    assert!(store.verify().await.unwrap().all_ok());
}
