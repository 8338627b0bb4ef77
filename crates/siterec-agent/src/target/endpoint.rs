//! The data endpoint: the routes source agents ship chunks and commit
//! points to, and its errors.

use super::*;

impl Target {
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route(
                "/data/v1/items/{item}/chunks/{id}",
                put(put_chunk).head(head_chunk),
            )
            .route("/data/v1/items/{item}/chunks", post(put_chunk_batch))
            .route("/data/v1/items/{item}/chunks/have", post(have_chunks))
            .route("/data/v1/items/{item}/points", post(commit_point))
            .route(
                "/data/v1/items/{item}/points/{point}",
                axum::routing::head(head_point),
            )
            .with_state(self.clone())
    }
}

/// An error of the data endpoint: status plus a [`WireError`] body.
pub struct DataError {
    pub(super) status: StatusCode,
    pub(super) code: &'static str,
    pub(super) message: String,
}

impl DataError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        DataError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for DataError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(WireError {
                code: self.code.into(),
                message: self.message,
            }),
        )
            .into_response()
    }
}

impl From<StoreError> for DataError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::CorruptChunk { .. }
            | StoreError::ZeroChunk { .. }
            | StoreError::InvalidName { .. }
            | StoreError::InvalidManifest { .. }
            | StoreError::CorruptManifest { .. } => {
                DataError::new(StatusCode::BAD_REQUEST, "Rejected", e.to_string())
            }
            StoreError::PointConflict { .. } => {
                DataError::new(StatusCode::CONFLICT, "PointConflict", e.to_string())
            }
            other => {
                tracing::error!("store: {other}");
                DataError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "StoreError",
                    other.to_string(),
                )
            }
        }
    }
}

pub(super) fn parse_id(item: &str, id: &str) -> Result<ChunkId, DataError> {
    siterec_core::names::check_name("item", item)
        .map_err(|e| DataError::new(StatusCode::BAD_REQUEST, "BadName", e.to_string()))?;
    id.parse()
        .map_err(|e| DataError::new(StatusCode::BAD_REQUEST, "BadChunkId", format!("{e}")))
}

pub(super) async fn head_chunk(
    State(t): State<Arc<Target>>,
    Extension(peer): Extension<PeerIdentity>,
    UrlPath((item, id)): UrlPath<(String, String)>,
) -> Result<StatusCode, DataError> {
    t.check_peer(&peer, &item)?;
    let id = parse_id(&item, &id)?;
    // Vouching for a chunk protects it from gc until the item's next commit.
    t.remember(&item, id);
    Ok(if t.store.has_chunk(id).await? {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    })
}

/// Most chunk ids one `POST chunks/have` may ask about (a batch's worth).
pub(super) const MAX_HAVE_IDS: usize = 1024;

/// `POST chunks/have`: the body is chunk ids (32 bytes each); the answer is
/// one byte per id, 1 if stored (and then vouched for, as `HEAD` does),
/// else 0. A resynchronizing source asks this for a batch of small chunks
/// instead of one `HEAD` each.
pub(super) async fn have_chunks(
    State(t): State<Arc<Target>>,
    Extension(peer): Extension<PeerIdentity>,
    UrlPath(item): UrlPath<String>,
    body: Bytes,
) -> Result<Vec<u8>, DataError> {
    t.check_peer(&peer, &item)?;
    siterec_core::names::check_name("item", &item)
        .map_err(|e| DataError::new(StatusCode::BAD_REQUEST, "BadName", e.to_string()))?;
    if !body.len().is_multiple_of(32) || body.len() / 32 > MAX_HAVE_IDS {
        return Err(DataError::new(
            StatusCode::BAD_REQUEST,
            "BadIds",
            format!(
                "the body must be at most {MAX_HAVE_IDS} chunk ids of 32 bytes each, got {} bytes",
                body.len()
            ),
        ));
    }
    let ids: Vec<ChunkId> = body
        .chunks_exact(32)
        .map(|c| {
            let mut b = [0u8; 32];
            b.copy_from_slice(c);
            ChunkId(b)
        })
        .collect();
    let have = t.store.has_chunks(&ids).await?;
    for (id, h) in ids.iter().zip(&have) {
        if *h {
            t.remember(&item, *id);
        }
    }
    Ok(have.into_iter().map(u8::from).collect())
}

/// Whether the target has committed a point (the source asks after an
/// offline export).
pub(super) async fn head_point(
    State(t): State<Arc<Target>>,
    Extension(peer): Extension<PeerIdentity>,
    UrlPath((item, point)): UrlPath<(String, String)>,
) -> Result<StatusCode, DataError> {
    t.check_peer(&peer, &item)?;
    Ok(match t.store.read_manifest(&item, &point).await {
        Ok(_) => StatusCode::OK,
        Err(StoreError::PointNotFound { .. }) => StatusCode::NOT_FOUND,
        Err(e) => return Err(e.into()),
    })
}

/// Longest chunk object one `PUT chunks/{id}` may carry (the source sends
/// 1 MiB blocks; as much as a batch may carry).
pub(super) const MAX_CHUNK_UPLOAD: usize = 2 << 20;

/// `PUT chunks/{id}`: the body is gathered straight into the buffer the
/// store checks, seals and writes it from (see `ChunkUpload`).
pub(super) async fn put_chunk(
    State(t): State<Arc<Target>>,
    Extension(peer): Extension<PeerIdentity>,
    UrlPath((item, id)): UrlPath<(String, String)>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<StatusCode, DataError> {
    use http_body_util::BodyExt;
    t.check_peer(&peer, &item)?;
    let id = parse_id(&item, &id)?;
    let too_large = || {
        DataError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "TooLarge",
            format!(
                "chunk {id}: a chunk object may be at most {MAX_CHUNK_UPLOAD} bytes; send smaller blocks"
            ),
        )
    };
    let expected = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if expected.is_some_and(|n| n > MAX_CHUNK_UPLOAD) {
        return Err(too_large());
    }
    let mut up = t
        .store
        .chunk_upload(expected.unwrap_or(1 << 20), MAX_CHUNK_UPLOAD);
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            DataError::new(
                StatusCode::BAD_REQUEST,
                "Rejected",
                format!("chunk {id}: reading the request body: {e}"),
            )
        })?;
        if let Ok(data) = frame.into_data() {
            up.extend_from_slice(&data).map_err(|_| too_large())?;
        }
    }
    remember_chunk(&t, &item, id, up.object());
    let stored = t.store.put_chunk_upload(id, up).await;
    match stored.map_err(store_error)? {
        true => Ok(StatusCode::CREATED),
        false => Ok(StatusCode::OK),
    }
}

/// Keeps chunk `id` (received as `object`), and a delta's base, from
/// garbage collection until the item's next commit.
pub(super) fn remember_chunk(t: &Target, item: &str, id: ChunkId, object: &[u8]) {
    t.remember(item, id);
    if let Ok(Some(base)) = siterec_store::delta_base(id, object) {
        t.remember(item, base);
    }
}

/// A store error of a chunk upload: a delta whose base is not here is a
/// 409 `MissingBase`.
pub(super) fn store_error(e: StoreError) -> DataError {
    match e {
        e @ StoreError::MissingChunk { .. } => {
            DataError::new(StatusCode::CONFLICT, "MissingBase", e.to_string())
        }
        e => e.into(),
    }
}

/// Stores one chunk of a batch, as `PUT chunks/{id}` would.
pub(super) async fn store_chunk(
    t: &Target,
    item: &str,
    id: ChunkId,
    bytes: Bytes,
) -> Result<bool, DataError> {
    remember_chunk(t, item, id, &bytes);
    // No copy when the body is one buffer only this request holds.
    t.store
        .put_encoded_chunk(id, Vec::from(bytes))
        .await
        .map_err(store_error)
}

/// Chunks of one batch stored at the same time.
pub(super) const BATCH_WRITES: usize = 8;

/// Stores a batch of chunks (see [`crate::batch`]), each as `PUT
/// chunks/{id}` would; answers how many were new. The chunks before a
/// failing one stay stored (they are valid; an unreferenced one is
/// collected later).
pub(super) async fn put_chunk_batch(
    State(t): State<Arc<Target>>,
    Extension(peer): Extension<PeerIdentity>,
    UrlPath(item): UrlPath<String>,
    body: Bytes,
) -> Result<Response, DataError> {
    t.check_peer(&peer, &item)?;
    let chunks = crate::batch::decode(&body)
        .map_err(|m| DataError::new(StatusCode::BAD_REQUEST, "Rejected", m))?;
    // Chunks are stored several at a time: each is a small file write.
    let mut stored = 0u64;
    let mut set: tokio::task::JoinSet<Result<bool, DataError>> = tokio::task::JoinSet::new();
    let mut outcome = |r: Result<Result<bool, DataError>, tokio::task::JoinError>| match r {
        Ok(r) => {
            stored += u64::from(r?);
            Ok(())
        }
        Err(e) => Err(DataError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal",
            format!("storing a chunk of the batch: {e}"),
        )),
    };
    for (id, range) in &chunks {
        while set.len() >= BATCH_WRITES {
            if let Some(r) = set.join_next().await {
                outcome(r)?;
            }
        }
        let (t, item, id, bytes) = (t.clone(), item.clone(), *id, body.slice(range.clone()));
        set.spawn(async move { store_chunk(&t, &item, id, bytes).await });
    }
    while let Some(r) = set.join_next().await {
        outcome(r)?;
    }
    Ok(Json(serde_json::json!({"chunks": chunks.len(), "stored": stored})).into_response())
}

pub(super) async fn commit_point(
    State(t): State<Arc<Target>>,
    Extension(peer): Extension<PeerIdentity>,
    UrlPath(item): UrlPath<String>,
    body: Bytes,
) -> Result<Response, DataError> {
    t.check_peer(&peer, &item)?;
    let manifest = Manifest::decode(&body)?;
    if manifest.item != item {
        return Err(DataError::new(
            StatusCode::BAD_REQUEST,
            "Rejected",
            format!("manifest is for item '{}', not '{item}'", manifest.item),
        ));
    }
    match t.store.commit_point(&manifest).await {
        Ok(()) => {
            if let Ok(mut m) = t.in_flight.lock() {
                m.remove(&item);
            }
            Ok(
                Json(serde_json::json!({"item": item, "pointId": manifest.point_id}))
                    .into_response(),
            )
        }
        Err(StoreError::MissingChunk { .. }) => {
            let ids: Vec<ChunkId> = manifest.referenced_chunks().into_iter().collect();
            let present = t.store.has_chunks(&ids).await?;
            let missing: Vec<String> = ids
                .iter()
                .zip(&present)
                .filter(|(_, p)| !**p)
                .map(|(id, _)| id.to_hex())
                .collect();
            let body = CommitRefused {
                message: format!(
                    "{} chunk(s) referenced by the point are not in the store",
                    missing.len()
                ),
                missing_chunks: missing,
            };
            Ok((StatusCode::CONFLICT, Json(body)).into_response())
        }
        Err(e) => Err(e.into()),
    }
}
