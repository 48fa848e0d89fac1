//! `/api/v1/jobs` (signed-in users; root writes) and `/oapi/v1/jobs` (personal access
//! tokens with the `job` scope: Harbor's preheat provider). Both create jobs with
//! `POST {type, args, scheduler_cluster_ids}` answered 200 with the job, and show a job's
//! state as PENDING, SUCCESS or FAILURE (the only states Harbor understands).

use super::{ApiError, ApiResult, Body, Caller, OpenApi, Paging, Shared, SignedIn};
use crate::jobs::{args, CreateError};
use crate::models::Job;
use crate::store::Value;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

/// A job as the API shows it: secrets in its args are write-only.
fn shown(mut job: Job) -> Job {
    job.args = args::redact(&job.args);
    job
}

impl From<CreateError> for ApiError {
    fn from(e: CreateError) -> Self {
        match e {
            CreateError::Invalid(f) => f.into(),
            CreateError::Store(s) => s.into(),
            CreateError::Queue(q) => {
                tracing::warn!(err = %q, "job queue error");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the job queue is unavailable: {q}"),
                )
            }
        }
    }
}

async fn create(state: &Shared, caller: &Caller, req: args::CreateJob) -> ApiResult<Json<Job>> {
    caller.must_be_root()?;
    let job = state.jobs.create(req, caller.user_id).await?;
    Ok(Json(shown(job)))
}

#[derive(Debug, Deserialize)]
struct JobFilters {
    state: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

async fn list(
    state: &Shared,
    paging: Paging,
    filters: JobFilters,
    path: &str,
) -> ApiResult<(HeaderMap, Json<Vec<Job>>)> {
    paging.check()?;
    let mut clauses = vec!["1 = 1"];
    let mut values: Vec<Value> = Vec::new();
    if let Some(s) = filters.state {
        if !["PENDING", "SUCCESS", "FAILURE"].contains(&s.as_str()) {
            return Err(ApiError::bad_request(
                "invalid field state: must be PENDING, SUCCESS or FAILURE",
            ));
        }
        clauses.push("state = ?");
        values.push(s.into());
    }
    if let Some(k) = filters.kind {
        clauses.push("kind = ?");
        values.push(k.into());
    }
    let where_sql = clauses.join(" AND ");
    let total = state.store.count("jobs", &where_sql, &values).await?;
    let rows = state
        .store
        .page("jobs", &where_sql, &values, paging.page, paging.per_page)
        .await?;
    Ok((
        paging.headers(path, total),
        Json(rows.iter().map(|r| shown(Job::from_row(r))).collect()),
    ))
}

async fn one(state: &Shared, id: i64) -> ApiResult<Json<Job>> {
    let job = state
        .jobs
        .job(id)
        .await?
        .ok_or_else(|| ApiError::not_found("job", id))?;
    Ok(Json(shown(job)))
}

#[derive(Debug, Deserialize)]
struct UpdateJob {
    bio: Option<String>,
}

async fn update(state: &Shared, caller: &Caller, id: i64, req: UpdateJob) -> ApiResult<Json<Job>> {
    caller.must_be_root()?;
    let mut fields = vec![crate::models::updated()];
    if let Some(bio) = req.bio {
        if bio.len() > 1024 {
            return Err(ApiError::bad_request(
                "invalid field bio: is longer than 1024 characters",
            ));
        }
        fields.push(("bio", bio.into()));
    }
    if !state.store.update("jobs", id, &fields).await? {
        return Err(ApiError::not_found("job", id));
    }
    one(state, id).await
}

async fn delete(state: &Shared, caller: &Caller, id: i64) -> ApiResult<StatusCode> {
    caller.must_be_root()?;
    if !state.store.delete("jobs", id).await? {
        return Err(ApiError::not_found("job", id));
    }
    Ok(StatusCode::OK)
}

pub fn routes(r: Router<Shared>) -> Router<Shared> {
    r.route(
        "/api/v1/jobs",
        get(|State(s): State<Shared>, SignedIn(_): SignedIn, Query(p): Query<Paging>, Query(f): Query<JobFilters>| async move {
            list(&s, p, f, "/api/v1/jobs").await
        })
        .post(|State(s): State<Shared>, SignedIn(c): SignedIn, Body(req): Body<args::CreateJob>| async move {
            create(&s, &c, req).await
        }),
    )
    .route(
        "/api/v1/jobs/{id}",
        get(|State(s): State<Shared>, SignedIn(_): SignedIn, Path(id): Path<i64>| async move { one(&s, id).await })
            .patch(|State(s): State<Shared>, SignedIn(c): SignedIn, Path(id): Path<i64>, Body(req): Body<UpdateJob>| async move {
                update(&s, &c, id, req).await
            })
            .delete(|State(s): State<Shared>, SignedIn(c): SignedIn, Path(id): Path<i64>| async move {
                delete(&s, &c, id).await
            }),
    )
    .route(
        "/oapi/v1/jobs",
        get(|State(s): State<Shared>, OpenApi(_): OpenApi, Query(p): Query<Paging>, Query(f): Query<JobFilters>| async move {
            list(&s, p, f, "/oapi/v1/jobs").await
        })
        .post(|State(s): State<Shared>, OpenApi(c): OpenApi, Body(req): Body<args::CreateJob>| async move {
            create(&s, &c, req).await
        }),
    )
    .route(
        "/oapi/v1/jobs/{id}",
        get(|State(s): State<Shared>, OpenApi(_): OpenApi, Path(id): Path<i64>| async move { one(&s, id).await })
            .patch(|State(s): State<Shared>, OpenApi(c): OpenApi, Path(id): Path<i64>, Body(req): Body<UpdateJob>| async move {
                update(&s, &c, id, req).await
            })
            .delete(|State(s): State<Shared>, OpenApi(c): OpenApi, Path(id): Path<i64>| async move {
                delete(&s, &c, id).await
            }),
    )
}
