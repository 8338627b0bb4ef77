//! The backend conformance suite: what every [`Backend`] must do, written
//! once against `Arc<dyn Backend>` and run on each implementation
//! ([`LocalDir`] always; [`AzureBlob`] on Azurite and [`S3`] on moto, both
//! started by [`crate::test_servers`]).
//!
//! [`backend_suite`] exercises the trait directly; [`store_suite`] runs the
//! whole [`Store`] flow on top of the backend. Each expects an empty
//! backend (a fresh directory, container or bucket).

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use crate::store_tests::{image, manifest, random, read_back, texty, upload_disk};
use crate::test_servers::{Azurite, Moto, TEST_PAGE_SIZE};
use crate::*;

/// Objects in the "many small objects" test; with the page size of 100
/// the object-store tests configure, listing them takes 5 or 6 requests.
const MANY: usize = 500;
/// Size of the large object.
const LARGE: usize = 8 << 20;
/// Concurrent requests in the bulk tests.
const PARALLEL: usize = 32;

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

async fn list_sorted(b: &Arc<dyn Backend>, prefix: &str) -> Vec<String> {
    sorted(b.list(prefix).await.unwrap())
}

/// Runs `f(i)` for `i` in `0..n`, at most [`PARALLEL`] at once.
async fn for_each_parallel<F, Fut>(n: usize, f: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut set = JoinSet::new();
    for i in 0..n {
        if set.len() >= PARALLEL {
            set.join_next().await.unwrap().unwrap();
        }
        set.spawn(f(i));
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
}

/// Every backend-level property, on an empty backend.
pub(crate) async fn backend_suite(b: Arc<dyn Backend>) {
    let name = b.describe();
    assert!(!name.is_empty());
    assert!(b.list("").await.unwrap().is_empty(), "{name}: not empty");

    basics(&b).await;
    listing(&b).await;
    invalid_keys(&b).await;
    durability_calls(&b).await;
    large_object(&b).await;
    many_small_objects(&b).await;
    concurrent_puts(&b).await;
    chunk_keys(&b).await;

    // Everything the suite wrote was deleted again, by the sub-tests.
    assert!(
        b.list("").await.unwrap().is_empty(),
        "{name}: leftovers {:?}",
        b.list("").await.unwrap()
    );
}

/// Keys shaped like chunk keys ([`LocalDir`] keeps those in packs):
/// small and large objects, replaced, listed, deleted, across barriers.
async fn chunk_keys(b: &Arc<dyn Backend>) {
    let keys: Vec<String> = (0..6u8).map(|i| chunk_key(&ChunkId::of(&[i]))).collect();
    let value = |i: usize| -> Vec<u8> {
        let len = [0, 1, 5000, 64 * 1024, 300_001, 1 << 20][i];
        (0..len).map(|j| (j * 7 + i) as u8).collect()
    };
    for (i, k) in keys.iter().enumerate() {
        assert!(!b.exists(k).await.unwrap());
        b.put(k, value(i)).await.unwrap();
    }
    b.barrier().await.unwrap();
    for (i, k) in keys.iter().enumerate() {
        assert!(b.exists(k).await.unwrap());
        assert_eq!(b.get(k).await.unwrap().unwrap(), value(i), "{k}");
    }
    let mut expected = keys.clone();
    expected.sort();
    assert_eq!(list_sorted(b, "chunks/").await, expected);
    assert_eq!(list_sorted(b, "").await, expected);
    let one = &keys[0][..9]; // "chunks/xy"
    let under: Vec<String> = expected
        .iter()
        .filter(|k| k.starts_with(one))
        .cloned()
        .collect();
    assert_eq!(list_sorted(b, one).await, under);
    // Replaced by a value of another size, then deleted.
    b.put(&keys[4], value(2)).await.unwrap();
    assert_eq!(b.get(&keys[4]).await.unwrap().unwrap(), value(2));
    b.delete(&keys[4]).await.unwrap();
    b.delete(&keys[4]).await.unwrap();
    assert!(!b.exists(&keys[4]).await.unwrap());
    assert_eq!(b.get(&keys[4]).await.unwrap(), None);
    b.barrier().await.unwrap();
    assert_eq!(b.list("chunks/").await.unwrap().len(), keys.len() - 1);
    for k in &keys {
        b.delete(k).await.unwrap();
    }
    b.barrier().await.unwrap();
    b.compact().await.unwrap();
    assert!(b.list("chunks/").await.unwrap().is_empty());
}

async fn basics(b: &Arc<dyn Backend>) {
    // Missing keys.
    assert_eq!(b.get("basic/k").await.unwrap(), None);
    assert!(!b.exists("basic/k").await.unwrap());

    // Round trip, overwrite (also with something shorter), empty objects.
    b.put("basic/k", b"first value".to_vec()).await.unwrap();
    assert!(b.exists("basic/k").await.unwrap());
    assert_eq!(
        b.get("basic/k").await.unwrap().as_deref(),
        Some(&b"first value"[..])
    );
    b.put("basic/k", b"2nd".to_vec()).await.unwrap();
    assert_eq!(
        b.get("basic/k").await.unwrap().as_deref(),
        Some(&b"2nd"[..])
    );
    b.put("basic/empty", Vec::new()).await.unwrap();
    assert_eq!(b.get("basic/empty").await.unwrap(), Some(Vec::new()));
    assert!(b.exists("basic/empty").await.unwrap());
    let binary: Vec<u8> = (0..=255u8).collect();
    b.put("basic/binary", binary.clone()).await.unwrap();
    assert_eq!(b.get("basic/binary").await.unwrap(), Some(binary));

    // A key that is a prefix of another ("directory") is not an object.
    b.put("basic/dir/leaf", b"x".to_vec()).await.unwrap();
    assert!(!b.exists("basic/dir").await.unwrap());
    assert_eq!(b.get("basic/dir").await.unwrap(), None);

    // Delete is idempotent, also for keys that never existed.
    b.delete("basic/k").await.unwrap();
    assert!(!b.exists("basic/k").await.unwrap());
    assert_eq!(b.get("basic/k").await.unwrap(), None);
    b.delete("basic/k").await.unwrap();
    b.delete("basic/never-existed").await.unwrap();
    b.delete("basic/dir").await.unwrap(); // not an object: nothing happens
    assert!(b.exists("basic/dir/leaf").await.unwrap());

    for k in ["basic/empty", "basic/binary", "basic/dir/leaf"] {
        b.delete(k).await.unwrap();
    }
    assert!(b.list("basic/").await.unwrap().is_empty());
}

async fn listing(b: &Arc<dyn Backend>) {
    let keys = [
        "l/a/b/c1",
        "l/a/b/c2",
        "l/a/bc",
        "l/a/d/e/f",
        "l/ab",
        "l/top",
        "l/x.manifest",
    ];
    for k in keys {
        b.put(k, k.as_bytes().to_vec()).await.unwrap();
    }
    let all: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    assert_eq!(list_sorted(b, "").await, all);
    assert_eq!(list_sorted(b, "l/").await, all);
    assert_eq!(
        list_sorted(b, "l/a/").await,
        ["l/a/b/c1", "l/a/b/c2", "l/a/bc", "l/a/d/e/f"]
    );
    assert_eq!(list_sorted(b, "l/a/b/").await, ["l/a/b/c1", "l/a/b/c2"]);
    // A plain string prefix, not a directory: "l/a/b" also matches "l/a/bc".
    assert_eq!(
        list_sorted(b, "l/a/b").await,
        ["l/a/b/c1", "l/a/b/c2", "l/a/bc"]
    );
    assert_eq!(
        list_sorted(b, "l/a").await,
        ["l/a/b/c1", "l/a/b/c2", "l/a/bc", "l/a/d/e/f", "l/ab"]
    );
    // Nested prefixes, and a prefix equal to a whole key.
    assert_eq!(list_sorted(b, "l/a/d/").await, ["l/a/d/e/f"]);
    assert_eq!(list_sorted(b, "l/a/d/e/").await, ["l/a/d/e/f"]);
    assert_eq!(list_sorted(b, "l/a/d/e/f").await, ["l/a/d/e/f"]);
    assert_eq!(list_sorted(b, "l/t").await, ["l/top"]);
    assert_eq!(list_sorted(b, "l/x.").await, ["l/x.manifest"]);
    // Empty results.
    assert!(b.list("l/nothing/").await.unwrap().is_empty());
    assert!(b.list("l/a/b/c3").await.unwrap().is_empty());
    assert!(b.list("nothing").await.unwrap().is_empty());
    assert!(b.list("l/a/d/e/f/").await.unwrap().is_empty());

    for k in keys {
        b.delete(k).await.unwrap();
    }
    assert!(b.list("l/").await.unwrap().is_empty());
}

/// Keys and prefixes every backend refuses, through the shared validation,
/// before any request is made.
async fn invalid_keys(b: &Arc<dyn Backend>) {
    let bad_keys = [
        "",
        "/abs",
        "a/../b",
        "..",
        ".",
        "a/./b",
        "a//b",
        "a/",
        "a b",
        "a\\b",
        "é",
        "a/.hidden",
        ".srtmp-123",
        "a\0b",
        "a?b",
        "a#b",
        "a%2Fb",
        "a+b",
        "a\nb",
    ];
    let long = "k".repeat(1025);
    let mut all_bad: Vec<&str> = bad_keys.to_vec();
    all_bad.push(&long);
    for bad in all_bad {
        let invalid = |r: Result<(), StoreError>| matches!(r, Err(StoreError::InvalidKey { .. }));
        assert!(invalid(b.put(bad, b"no".to_vec()).await), "put {bad:?}");
        assert!(
            invalid(b.put_durable(bad, b"no".to_vec()).await),
            "put_durable {bad:?}"
        );
        assert!(invalid(b.get(bad).await.map(|_| ())), "get {bad:?}");
        assert!(invalid(b.exists(bad).await.map(|_| ())), "exists {bad:?}");
        assert!(invalid(b.delete(bad).await), "delete {bad:?}");
    }
    let long_component = format!("x/{}/y", "k".repeat(256));
    assert!(matches!(
        b.put(&long_component, b"no".to_vec()).await,
        Err(StoreError::InvalidKey { .. })
    ));
    // 1024 characters, in components of up to 255, is the maximum.
    let longest = [
        "a".repeat(255),
        "a".repeat(255),
        "a".repeat(255),
        "b".repeat(254),
        "c".into(),
    ]
    .join("/");
    assert_eq!(longest.len(), 1024);
    b.put(&longest, b"ok".to_vec()).await.unwrap();
    assert_eq!(b.get(&longest).await.unwrap().as_deref(), Some(&b"ok"[..]));
    assert_eq!(b.list("aaa").await.unwrap(), std::slice::from_ref(&longest));
    b.delete(&longest).await.unwrap();

    for bad in ["../", "/", "/a", "a//", "a b/", ".hidden/", "a/../"] {
        assert!(
            matches!(b.list(bad).await, Err(StoreError::InvalidKey { .. })),
            "list {bad:?}"
        );
    }
    assert!(
        b.list("").await.unwrap().is_empty(),
        "a refused key was written"
    );
}

/// What can be observed of `put_durable` and `barrier`: they succeed, and
/// objects written either way read back (also after deletes and barriers).
async fn durability_calls(b: &Arc<dyn Backend>) {
    b.barrier().await.unwrap(); // on an empty backend
    b.put_durable("dur/marker", b"1".to_vec()).await.unwrap();
    assert_eq!(
        b.get("dur/marker").await.unwrap().as_deref(),
        Some(&b"1"[..])
    );
    b.put_durable("dur/marker", b"22".to_vec()).await.unwrap();
    assert_eq!(
        b.get("dur/marker").await.unwrap().as_deref(),
        Some(&b"22"[..])
    );
    b.put("dur/nested/deeper/plain", b"p".to_vec())
        .await
        .unwrap();
    b.barrier().await.unwrap();
    assert!(b.exists("dur/nested/deeper/plain").await.unwrap());
    b.delete("dur/marker").await.unwrap();
    b.barrier().await.unwrap();
    assert!(!b.exists("dur/marker").await.unwrap());
    assert_eq!(list_sorted(b, "dur/").await, ["dur/nested/deeper/plain"]);
    // Nothing was interrupted: no leftovers to remove.
    assert_eq!(b.remove_stale_temp(Duration::ZERO).await.unwrap(), 0);
    b.delete("dur/nested/deeper/plain").await.unwrap();
}

async fn large_object(b: &Arc<dyn Backend>) {
    let data = random(LARGE);
    b.put("big/object", data.clone()).await.unwrap();
    let back = b.get("big/object").await.unwrap().unwrap();
    assert_eq!(back.len(), LARGE);
    assert!(back == data, "large object differs");
    // Overwritten by a smaller one: nothing of the old one remains.
    b.put("big/object", data[..1000].to_vec()).await.unwrap();
    assert_eq!(
        b.get("big/object").await.unwrap().as_deref(),
        Some(&data[..1000])
    );
    b.delete("big/object").await.unwrap();
}

async fn many_small_objects(b: &Arc<dyn Backend>) {
    let key = |i: usize| format!("many/{:02x}/obj-{i:04}", i % 7);
    let backend = Arc::clone(b);
    for_each_parallel(MANY, move |i| {
        let b = Arc::clone(&backend);
        async move {
            b.put(&key(i), i.to_le_bytes().to_vec()).await.unwrap();
        }
    })
    .await;
    let expected: BTreeSet<String> = (0..MANY).map(key).collect();
    let listed = b.list("many/").await.unwrap();
    assert_eq!(listed.len(), MANY, "listing lost or duplicated keys");
    assert_eq!(listed.iter().cloned().collect::<BTreeSet<_>>(), expected);
    assert_eq!(b.list("").await.unwrap().len(), MANY);
    assert_eq!(
        b.list("many/03/").await.unwrap().len(),
        (0..MANY).filter(|i| i % 7 == 3).count()
    );
    for i in [0, 1, MANY / 2, MANY - 1] {
        assert_eq!(
            b.get(&key(i)).await.unwrap(),
            Some(i.to_le_bytes().to_vec())
        );
    }

    let backend = Arc::clone(b);
    for_each_parallel(MANY, move |i| {
        let b = Arc::clone(&backend);
        async move {
            b.delete(&key(i)).await.unwrap();
        }
    })
    .await;
    assert!(b.list("many/").await.unwrap().is_empty());
}

async fn concurrent_puts(b: &Arc<dyn Backend>) {
    // Many writers, one key: the result is one whole value.
    let value = |i: usize| vec![i as u8; 64 * 1024 + i];
    let backend = Arc::clone(b);
    for_each_parallel(16, move |i| {
        let b = Arc::clone(&backend);
        async move {
            b.put("race/same", value(i)).await.unwrap();
        }
    })
    .await;
    let got = b.get("race/same").await.unwrap().unwrap();
    assert!(
        (0..16).any(|i| got == value(i)),
        "concurrent puts mixed their data ({} bytes)",
        got.len()
    );

    // Many writers, distinct keys, mixing put and put_durable, with
    // concurrent readers of keys already written.
    let backend = Arc::clone(b);
    for_each_parallel(64, move |i| {
        let b = Arc::clone(&backend);
        async move {
            let key = format!("race/k{i}");
            if i % 2 == 0 {
                b.put(&key, value(i % 16)).await.unwrap();
            } else {
                b.put_durable(&key, value(i % 16)).await.unwrap();
            }
            assert_eq!(b.get(&key).await.unwrap(), Some(value(i % 16)));
            b.list("race/").await.unwrap();
        }
    })
    .await;
    b.barrier().await.unwrap();
    assert_eq!(b.list("race/").await.unwrap().len(), 65);
    for k in b.list("race/").await.unwrap() {
        b.delete(&k).await.unwrap();
    }
}

/// The whole [`Store`] flow on an empty backend: create, upload, commit,
/// read back, reopen, verify, gc, and detection of corrupt objects
/// (damaged through the backend itself, so it works on every backend).
///
/// With a recovery key, the same flow on an encrypted store (written with
/// the credential, read with the recovery key), plus checks that chunk
/// object names are not the plaintext ids, that the credential alone reads
/// no data but verifies integrity, and that the keys are required.
pub(crate) async fn store_suite(b: Arc<dyn Backend>, key: Option<RecoveryKey>) {
    // `open` gives the handle the suite reads through: with the recovery
    // key in an encrypted store.
    let credential = key.as_ref().map(RecoveryKey::credential);
    let open_writer = |b: &Arc<dyn Backend>| {
        Store::open_or_create_with_credential(Arc::clone(b), credential.clone())
    };
    let open = |b: &Arc<dyn Backend>| {
        let (w, key) = (open_writer(b), key.clone());
        async move {
            let s = w.await?;
            match &key {
                Some(k) => s.with_recovery_key(k),
                None => Ok(s),
            }
        }
    };
    let store = open(&b).await.unwrap();
    assert!(b.exists(STORE_INFO_KEY).await.unwrap());
    assert_eq!(store.is_encrypted(), key.is_some());
    assert_eq!(
        store.info().version,
        if key.is_some() {
            STORE_FORMAT_VERSION_ENCRYPTED
        } else {
            STORE_FORMAT_VERSION_PLAIN
        }
    );

    // Upload and commit two points sharing most chunks.
    let img1 = image();
    let mut img2 = img1.clone();
    let cs = crate::store_tests::CS as usize;
    img2[2 * cs..3 * cs].copy_from_slice(&random(cs));
    let d1 = upload_disk(&store, "disk0", &img1).await;
    let d2 = upload_disk(&store, "disk0", &img2).await;
    let m1 = manifest("vm-1", "p1", vec![d1.clone()]);
    let m2 = manifest("vm-1", "p2", vec![d2.clone()]);
    store.commit_point(&m1).await.unwrap();
    store.commit_point(&m2).await.unwrap();
    store.commit_point(&m2).await.unwrap(); // idempotent retry
    assert!(
        !b.exists(UNSYNCED_MARKER_KEY).await.unwrap(),
        "commit's barrier clears the marker"
    );
    let mut other = m2.clone();
    other.created_at_unix_ms += 1;
    assert!(matches!(
        store.commit_point(&other).await,
        Err(StoreError::PointConflict { .. })
    ));

    // A commit referencing a missing chunk fails and publishes nothing.
    let missing = encode_chunk(&texty(CS_SMALL, 9), true).id;
    let bad = manifest(
        "vm-1",
        "p-missing",
        vec![DiskManifest {
            disk_id: "d".into(),
            size: CS_SMALL as u64,
            chunk_size: CS_SMALL as u32,
            chunks: vec![Some(missing)],
        }],
    );
    assert!(matches!(
        store.commit_point(&bad).await,
        Err(StoreError::MissingChunk { .. })
    ));

    let points = store.list_points(None).await.unwrap();
    assert_eq!(points.len(), 2);
    assert_eq!(store.list_points(Some("vm-1")).await.unwrap(), points);
    assert!(store.list_points(Some("vm-2")).await.unwrap().is_empty());
    assert_eq!(store.read_manifest("vm-1", "p1").await.unwrap(), m1);
    assert_eq!(read_back(&store, &m1, 0, 1).await, img1);
    assert_eq!(read_back(&store, &m2, 0, 8).await, img2);
    // 3 distinct chunks in img1 (blocks 0 and 3 are equal), 1 more in img2.
    let names = b.list("chunks/").await.unwrap();
    assert_eq!(names.len(), 4);
    let ids: HashSet<ChunkId> = m1
        .referenced_chunks()
        .union(&m2.referenced_chunks())
        .copied()
        .collect();
    for id in &ids {
        let hex = id.to_hex();
        let leaks = names.iter().any(|n| n.contains(&hex));
        assert_eq!(leaks, key.is_none(), "{hex} in {names:?}");
        assert!(names.contains(&store.chunk_object_key(id)));
    }
    if let Some(key) = &key {
        // Without the credential, nothing opens; with another, neither.
        let err = Store::open_or_create(Arc::clone(&b)).await.unwrap_err();
        assert!(
            matches!(err, StoreError::CredentialRequired { .. }),
            "{err}"
        );
        let other = RecoveryKey::generate().unwrap();
        let err = Store::open_or_create_with_credential(Arc::clone(&b), Some(other.credential()))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::WrongKey { .. }), "{err}");
        // The credential alone manages the store but reads no data, and
        // another store's recovery key is refused naming the right one.
        let writer = open_writer(&b).await.unwrap();
        assert!(!writer.can_read_data());
        let some = *ids.iter().next().unwrap();
        let err = writer.get_chunk(some).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::RecoveryKeyRequired { key_id } if *key_id == key.key_id()),
            "{err}"
        );
        assert!(err.to_string().contains("--encryption-key"), "{err}");
        let mut r = writer.read_disk(&m1, 0, 2).unwrap();
        assert!(matches!(
            r.next().await,
            Some(Err(StoreError::RecoveryKeyRequired { .. }))
        ));
        assert_eq!(writer.read_manifest("vm-1", "p1").await.unwrap(), m1);
        let err = writer.with_recovery_key(&other).unwrap_err();
        assert!(
            matches!(&err, StoreError::WrongKey { expected, .. } if *expected == key.key_id()),
            "{err}"
        );
        assert!(err.to_string().contains(&key.key_id()), "{err}");
        let report = writer.verify().await.unwrap();
        assert!(report.all_ok(), "{report:?}");
        assert_eq!(report.chunks_checked, 4);
    }
    let report = store.verify().await.unwrap();
    assert!(report.all_ok(), "{report:?}");
    assert_eq!(report.chunks_checked, 4);

    // Reopening finds everything; a clean sync means no recovery scan.
    store.sync().await.unwrap();
    drop(store);
    let store = open(&b).await.unwrap();
    assert!(store.last_recovery().is_none());
    assert_eq!(store.list_points(None).await.unwrap(), points);

    // gc: an orphan goes, an in-flight upload in `keep` stays.
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
    let report = store.gc(&HashSet::from([in_flight])).await.unwrap();
    assert_eq!(report.points, 2);
    assert_eq!(report.chunks_deleted, 1);
    assert_eq!(report.chunks_kept, 5);
    assert!(!store.has_chunk(orphan).await.unwrap());
    assert!(store.has_chunk(in_flight).await.unwrap());

    // Deleting p1 and collecting frees its unique chunk only.
    store.delete_point("vm-1", "p1").await.unwrap();
    let unique_to_p1 = d1.chunks[2].unwrap();
    let report = store.gc(&HashSet::new()).await.unwrap();
    assert_eq!(report.chunks_deleted, 2); // p1's third block and in_flight
    assert!(!store.has_chunk(unique_to_p1).await.unwrap());
    assert_eq!(read_back(&store, &m2, 0, 4).await, img2);
    assert!(store.verify().await.unwrap().all_ok());

    // A damaged chunk object is detected on read and by verify.
    let victim = m2.disks[0].chunks[2].unwrap();
    let victim_key = store.chunk_object_key(&victim);
    let mut bytes = b.get(&victim_key).await.unwrap().unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    b.put(&victim_key, bytes).await.unwrap();
    let err = store.get_chunk(victim).await.unwrap_err();
    assert!(
        matches!(err, StoreError::CorruptChunk { id, .. } if id == victim),
        "{err}"
    );
    let report = store.verify().await.unwrap();
    assert!(!report.all_ok());
    assert_eq!(report.points[0].damaged_chunks, [victim]);
    if key.is_some() {
        // Verify finds it without the recovery key too (checksum).
        let writer = open_writer(&b).await.unwrap();
        let report = writer.verify().await.unwrap();
        assert_eq!(report.points[0].damaged_chunks, [victim]);
        assert!(matches!(
            writer.check_chunk(victim).await,
            Err(StoreError::CorruptChunk { .. })
        ),);
    }

    // A missing one too.
    let gone = m2.disks[0].chunks[0].unwrap();
    b.delete(&store.chunk_object_key(&gone)).await.unwrap();
    assert!(store.get_chunk(gone).await.is_err());
    assert_eq!(
        store.verify().await.unwrap().points[0].damaged_chunks.len(),
        2
    );

    // A damaged manifest is detected and never returned.
    let mkey = manifest_key("vm-1", "p2").unwrap();
    let mut bytes = b.get(&mkey).await.unwrap().unwrap();
    bytes[20] ^= 0x80;
    b.put(&mkey, bytes).await.unwrap();
    assert!(matches!(
        store.read_manifest("vm-1", "p2").await,
        Err(StoreError::CorruptManifest { .. })
    ));
    let report = store.verify().await.unwrap();
    assert!(!report.all_ok());

    // Deleting the last point and collecting empties the chunk space.
    store.delete_point("vm-1", "p2").await.unwrap();
    store.gc(&HashSet::new()).await.unwrap();
    assert!(b.list("chunks/").await.unwrap().is_empty());
    assert!(b.list("points/").await.unwrap().is_empty());
}

const CS_SMALL: usize = 4096;

/// Puts 150 objects and checks that listing them takes two requests of
/// the configured page size, then removes them.
async fn check_paging<F, Fut>(b: &Arc<dyn Backend>, first_page: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = (usize, bool)>,
{
    let backend = Arc::clone(b);
    for_each_parallel(150, move |i| {
        let b = Arc::clone(&backend);
        async move { b.put(&format!("pg/{i:03}"), vec![1]).await.unwrap() }
    })
    .await;
    assert_eq!(first_page().await, (TEST_PAGE_SIZE, true));
    assert_eq!(b.list("pg/").await.unwrap().len(), 150);
    for k in b.list("pg/").await.unwrap() {
        b.delete(&k).await.unwrap();
    }
}

#[tokio::test]
async fn local_dir_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let config = BackendConfig::Local {
        path: dir.path().join("backend"),
    };
    backend_suite(open_backend(&config).await.unwrap()).await;
    let config = BackendConfig::Local {
        path: dir.path().join("store"),
    };
    store_suite(open_backend(&config).await.unwrap(), None).await;
    let config = BackendConfig::Local {
        path: dir.path().join("encrypted"),
    };
    let key = RecoveryKey::generate().unwrap();
    store_suite(open_backend(&config).await.unwrap(), Some(key)).await;
}

/// The layout of stores written before packs: a file per chunk object.
#[tokio::test]
async fn local_dir_without_packs_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let files = |name: &str| -> Arc<dyn Backend> {
        Arc::new(
            LocalDir::new(dir.path().join(name))
                .unwrap()
                .without_packs()
                .unwrap(),
        )
    };
    backend_suite(files("backend")).await;
    store_suite(files("store"), None).await;
    let key = RecoveryKey::generate().unwrap();
    store_suite(files("encrypted"), Some(key)).await;
    // No pack was made, and the chunks were files.
    assert!(!dir.path().join("store").join(".packs").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_blob_conformance() {
    let azurite = Azurite::start().await;

    // Opening a container that does not exist fails at once, clearly.
    let config = azurite.config("absent");
    let err = open_backend(&BackendConfig::Azure(config))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::MissingContainer { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("container \"absent\" does not exist in storage account devstoreaccount1")
            && text.contains("create it"),
        "{text}"
    );

    // A wrong key is refused at open time too.
    azurite.create_container("keyed").await;
    let mut config = azurite.config("keyed");
    config.key = Secret::new("d3JvbmcgYnV0IHZhbGlkIGJhc2U2NA==");
    let err = open_backend(&BackendConfig::Azure(config))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, StoreError::Backend { .. }),
        "wrong key: {err}"
    );

    // Paging really happens (the suite's 500 objects take 5 pages).
    azurite.create_container("paging").await;
    let az = AzureBlob::open(&azurite.config("paging")).await.unwrap();
    let b: Arc<dyn Backend> = Arc::new(az.clone());
    check_paging(&b, || az.first_page("pg/")).await;

    azurite.create_container("backend").await;
    let b = open_backend(&BackendConfig::Azure(azurite.config("backend")))
        .await
        .unwrap();
    assert!(
        b.describe().starts_with("azure:http://127.0.0.1:"),
        "{}",
        b.describe()
    );
    backend_suite(b).await;

    azurite.create_container("store").await;
    let b = open_backend(&BackendConfig::Azure(azurite.config("store")))
        .await
        .unwrap();
    store_suite(b, None).await;

    azurite.create_container("encrypted").await;
    let b = open_backend(&BackendConfig::Azure(azurite.config("encrypted")))
        .await
        .unwrap();
    store_suite(b, Some(RecoveryKey::generate().unwrap())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_conformance() {
    let moto = Moto::start().await;

    let err = open_backend(&BackendConfig::S3(moto.config("absent")))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::MissingContainer { .. }), "{err}");
    assert!(
        err.to_string().contains("bucket \"absent\" does not exist"),
        "{err}"
    );

    moto.create_bucket("paging").await;
    let s3 = S3::open(&moto.config("paging")).await.unwrap();
    let b: Arc<dyn Backend> = Arc::new(s3.clone());
    check_paging(&b, || s3.first_page("pg/")).await;

    moto.create_bucket("backend").await;
    let b = open_backend(&BackendConfig::S3(moto.config("backend")))
        .await
        .unwrap();
    assert!(
        b.describe().starts_with("s3:http://127.0.0.1:"),
        "{}",
        b.describe()
    );
    backend_suite(b).await;

    moto.create_bucket("store").await;
    let b = open_backend(&BackendConfig::S3(moto.config("store")))
        .await
        .unwrap();
    store_suite(b, None).await;
}

#[test]
fn backend_config_toml() {
    let text = r#"
        kind = "azure"
        account = "acct"
        container = "replica"
        key = "c2VjcmV0"
        endpoint = "http://127.0.0.1:10000/acct"
    "#;
    let c: BackendConfig = toml::from_str(text).unwrap();
    let BackendConfig::Azure(az) = &c else {
        panic!("{c:?}")
    };
    assert_eq!(az.account, "acct");
    assert_eq!(az.key.expose(), "c2VjcmV0");
    assert_eq!(az.list_page_size, None);
    assert!(
        !format!("{c:?}").contains("c2VjcmV0"),
        "Debug shows the key"
    );
    let back: BackendConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);

    let text = r#"
        kind = "s3"
        endpoint = "https://s3.example.net"
        bucket = "replica"
        access_key = "AKIDEXAMPLE"
        secret_key = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
    "#;
    let c: BackendConfig = toml::from_str(text).unwrap();
    let BackendConfig::S3(s3) = &c else {
        panic!("{c:?}")
    };
    assert_eq!(s3.region, "us-east-1");
    assert!(!format!("{c:?}").contains("EXAMPLEKEY"));
    let back: BackendConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);

    let c: BackendConfig = toml::from_str("kind = \"local\"\npath = \"/var/lib/siterec\"").unwrap();
    assert_eq!(
        c,
        BackendConfig::Local {
            path: "/var/lib/siterec".into()
        }
    );

    // Typos are errors, not silently ignored settings.
    assert!(
        toml::from_str::<BackendConfig>(
            "kind = \"s3\"\nbucket = \"b\"\naccess_key = \"a\"\nsecret_key = \"s\"\nregoin = \"x\""
        )
        .is_err()
    );
    assert!(toml::from_str::<BackendConfig>("kind = \"gcs\"").is_err());
}
