//! The sessions API: create, continue, fork, inspect, download, upload, delete.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::StreamExt;
use performer::SamplingParams;
use performer_engine::{CompletionRequest, Event, SessionInfo, Target};
use serde::Deserialize;
use serde_json::json;

use crate::completions::{body_bytes, run, submit};
use crate::error::ApiError;
use crate::openai::parse;
use crate::{App, Tenant};

#[derive(Deserialize, Default)]
struct CreateBody {
    prompt: Option<String>,
}

fn created(info: &SessionInfo) -> Response {
    (
        StatusCode::CREATED,
        Json(json!({"id": info.id, "position": info.position, "state_bytes": info.state_bytes})),
    )
        .into_response()
}

fn full(info: &SessionInfo) -> Json<serde_json::Value> {
    Json(json!({
        "id": info.id,
        "object": "session",
        "position": info.position,
        "state_bytes": info.state_bytes,
        "created": info.created,
        "last_used": info.last_used,
    }))
}

/// Runs a blocking engine call (session table, store) off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> performer_engine::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            code: "internal_error",
            message: e.to_string(),
        })?
        .map_err(ApiError::from)
}

/// `POST /v1/sessions`: 201 `{"id","position","state_bytes"}`.
pub(crate) async fn create(
    State(app): State<Arc<App>>,
    Extension(tenant): Extension<Tenant>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body_bytes(body)?;
    let parsed: CreateBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        CreateBody::default()
    } else {
        parse(&bytes)?
    };
    let prompt = parsed.prompt.unwrap_or_default();
    let mut req = CompletionRequest::new(
        app.engine.model().tokenizer().encode(&prompt)?,
        0,
        SamplingParams::greedy(),
    );
    req.tenant = tenant.0;
    req.target = Target::NewSession;
    let (mut rx, _guard) = submit(&app, req).await?;
    while let Some(e) = rx.recv().await {
        match e {
            Event::Done {
                session: Some(info),
                ..
            } => return Ok(created(&info)),
            Event::Failed(e) => return Err(e.into()),
            _ => {}
        }
    }
    Err(performer_engine::Error::ShuttingDown.into())
}

/// `POST /v1/sessions/{id}/completions`.
pub(crate) async fn complete(
    State(app): State<Arc<App>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    run(&app, &tenant.0, Target::Session(id), body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/sessions/{id}/fork`: 201 with the new id.
pub(crate) async fn fork(
    State(app): State<Arc<App>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let engine = app.engine.clone();
    let info = blocking(move || engine.fork_session(&tenant.0, &id)).await?;
    Ok(created(&info))
}

/// `GET /v1/sessions/{id}`.
pub(crate) async fn info(
    State(app): State<Arc<App>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let engine = app.engine.clone();
    let info = blocking(move || engine.session_info(&tenant.0, &id)).await?;
    Ok(full(&info))
}

/// `GET /v1/sessions`: the tenant's sessions of this model, oldest first.
pub(crate) async fn list(
    State(app): State<Arc<App>>,
    Extension(tenant): Extension<Tenant>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let engine = app.engine.clone();
    let infos = blocking(move || engine.list_sessions(&tenant.0)).await?;
    let data: Vec<serde_json::Value> = infos.iter().map(|i| full(i).0).collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// `DELETE /v1/sessions/{id}`: 204.
pub(crate) async fn delete(
    State(app): State<Arc<App>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let engine = app.engine.clone();
    blocking(move || engine.delete_session(&tenant.0, &id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/sessions/{id}/state`: the snapshot bytes.
pub(crate) async fn download(
    State(app): State<Arc<App>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let engine = app.engine.clone();
    let bytes = blocking(move || engine.session_snapshot(&tenant.0, &id)).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// Reads an upload's body as it arrives, refusing it (413) as soon as it passes the cap, and
/// holding its bytes' worth of the global upload budget (503 `uploads_busy` when spent)
/// while it is read and decoded.
async fn read_upload(
    app: &App,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Vec<u8>, tokio::sync::OwnedSemaphorePermit), ApiError> {
    let cap = app.upload_cap;
    let too_large = || ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        kind: "invalid_request_error",
        code: "body_too_large",
        message: format!("a snapshot of this model is at most {cap} bytes"),
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > cap as u64) {
        return Err(too_large());
    }
    let total = app.options.max_upload_total;
    let want = declared
        .map_or(cap, |n| n as usize)
        .min(cap)
        .min(total)
        .max(1);
    let permit = app
        .uploading
        .clone()
        .try_acquire_many_owned(u32::try_from(want).unwrap_or(u32::MAX))
        .map_err(|_| ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "server_error",
            code: "uploads_busy",
            message: "too many snapshot uploads at once, retry later".into(),
        })?;
    let mut bytes = Vec::with_capacity(want.min(cap));
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request("invalid_body", e.to_string()))?;
        if bytes.len() + chunk.len() > cap {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok((bytes, permit))
}

/// `PUT /v1/sessions/{id}/state`: 201 when created, 200 when replaced.
pub(crate) async fn upload(
    State(app): State<Arc<App>>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (bytes, permit) = read_upload(&app, &headers, body).await?;
    let engine = app.engine.clone();
    let (existed, info) = blocking(move || {
        let _permit = permit;
        let existed = engine.session_info(&tenant.0, &id).is_ok();
        engine
            .put_session_snapshot(&tenant.0, &id, &bytes)
            .map(|info| (existed, info))
    })
    .await?;
    Ok(if existed {
        full(&info).into_response()
    } else {
        created(&info)
    })
}
