//! The REST API (`/api/v1`, sign-in tokens and roles) and the open API (`/oapi/v1`,
//! personal access tokens with scopes), as upstream's manager serves them, plus
//! `GET /healthy`.
//!
//! Statuses: invalid input 400 with a message naming the field; a missing or bad token
//! 401; a caller without the permission 403; an unknown ID 404; a name already taken 409.

mod jobs;
pub mod openapi;
pub mod resources;
mod users;

use crate::auth::{self, Jwt};
use crate::models::Role;
use crate::store::{Store, StoreError, Value};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use resources::{FieldError, Resource};
use serde::Deserialize;
use std::sync::Arc;

/// What the handlers share.
pub struct AppState {
    pub store: Store,
    pub jwt: Jwt,
    pub jobs: Arc<crate::jobs::Jobs>,
}

pub type Shared = Arc<AppState>;

/// An error the API answers with: a status and a message.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(what: &str, id: i64) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, format!("{what} {id} not found"))
    }
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, message)
    }
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => {
                ApiError::new(StatusCode::CONFLICT, format!("already exists: {m}"))
            }
            other => {
                tracing::warn!(err = %other, "store error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string())
            }
        }
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::bad_request(format!("invalid field {}: {}", e.field, e.message))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "message": self.message })),
        )
            .into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// A JSON body; malformed JSON or a wrong field type is a 400 naming what failed.
pub struct Body<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for Body<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
    }
}

/// Who is calling, once authenticated.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user_id: i64,
    pub role: Role,
    /// Scopes of the personal access token used (`None`: signed in with a JWT).
    pub scopes: Option<Vec<String>>,
}

impl Caller {
    /// Root may write anything; others get 403.
    pub fn must_be_root(&self) -> ApiResult<()> {
        if self.role == Role::Root {
            Ok(())
        } else {
            Err(ApiError::forbidden("this needs the root role"))
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// `/api/v1` callers: a valid sign-in token (JWT) in `Authorization: Bearer`.
pub struct SignedIn(pub Caller);

impl FromRequestParts<Shared> for SignedIn {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        let token = bearer(&parts.headers)
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer token"))?;
        let claims = state
            .jwt
            .check(token)
            .ok_or_else(|| ApiError::unauthorized("invalid or expired token"))?;
        let user = auth::user_by_id(&state.store, claims.sub)
            .await?
            .ok_or_else(|| ApiError::unauthorized("the token's user no longer exists"))?;
        if user.state != "enable" {
            return Err(ApiError::forbidden("the user is disabled"));
        }
        let role = Role::parse(&user.role).unwrap_or(Role::Guest);
        // Reading is every signed-in user's right; writing is root's.
        let caller = Caller {
            user_id: user.id,
            role,
            scopes: None,
        };
        Ok(SignedIn(caller))
    }
}

/// `/oapi/v1` callers: a personal access token (`Authorization: Bearer` or
/// `?access_token=`) whose scopes include the resource in the path.
pub struct OpenApi(pub Caller);

impl FromRequestParts<Shared> for OpenApi {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        let from_query = parts.uri.query().and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "access_token")
                .map(|(_, v)| v.into_owned())
        });
        let token = bearer(&parts.headers)
            .map(str::to_string)
            .or(from_query)
            .ok_or_else(|| ApiError::unauthorized("missing personal access token"))?;
        let grant = auth::token_grant(&state.store, &token)
            .await?
            .ok_or_else(|| ApiError::unauthorized("unknown personal access token"))?;
        if !grant.active {
            return Err(ApiError::forbidden("the personal access token is inactive"));
        }
        if grant.expired {
            return Err(ApiError::forbidden("the personal access token has expired"));
        }
        // The scope is the resource after /oapi/v1/, singular (jobs -> job).
        let resource = parts
            .uri
            .path()
            .trim_start_matches("/oapi/v1/")
            .split('/')
            .next()
            .unwrap_or("");
        let scope = resource.trim_end_matches('s');
        if !grant.scopes.iter().any(|s| s == scope) {
            return Err(ApiError::forbidden(format!(
                "the personal access token has no {scope:?} scope"
            )));
        }
        let user = auth::user_by_id(&state.store, grant.user_id)
            .await?
            .ok_or_else(|| ApiError::unauthorized("the token's user no longer exists"))?;
        Ok(OpenApi(Caller {
            user_id: user.id,
            role: Role::parse(&user.role).unwrap_or(Role::Guest),
            scopes: Some(grant.scopes),
        }))
    }
}

/// `page` and `per_page` as upstream takes them.
#[derive(Debug, Deserialize)]
pub struct Paging {
    #[serde(default = "one")]
    pub page: u64,
    #[serde(default = "ten")]
    pub per_page: u64,
}

fn one() -> u64 {
    1
}
fn ten() -> u64 {
    10
}

impl Paging {
    pub fn check(&self) -> ApiResult<()> {
        if self.page == 0 {
            return Err(ApiError::bad_request(
                "invalid field page: must be at least 1",
            ));
        }
        if !(1..=1000).contains(&self.per_page) {
            return Err(ApiError::bad_request(
                "invalid field per_page: must be 1 to 1000",
            ));
        }
        Ok(())
    }

    /// Upstream's pagination headers: `Link` (first, prev, next, last) and `Total-Page`.
    pub fn headers(&self, path: &str, total: i64) -> HeaderMap {
        let pages = ((total as u64).div_ceil(self.per_page)).max(1);
        let link = |page: u64, rel: &str| {
            format!(
                "<{path}?page={page}&per_page={}>; rel=\"{rel}\"",
                self.per_page
            )
        };
        let mut links = vec![link(1, "first")];
        if self.page > 1 {
            links.push(link(self.page - 1, "prev"));
        }
        if self.page < pages {
            links.push(link(self.page + 1, "next"));
        }
        links.push(link(pages, "last"));
        let mut h = HeaderMap::new();
        h.insert(
            "Link",
            HeaderValue::from_str(&links.join(", ")).expect("ascii"),
        );
        h.insert("Total-Page", HeaderValue::from(pages));
        h.insert("Total-Count", HeaderValue::from(total as u64));
        h
    }
}

/// Where-clause and values for the allowed filters found in the query.
fn filters<R: Resource>(query: &std::collections::HashMap<String, String>) -> (String, Vec<Value>) {
    let mut clauses = vec!["1 = 1".to_string()];
    let mut values = Vec::new();
    for name in R::FILTERS {
        if let Some(v) = query.get(*name) {
            clauses.push(format!("{name} = ?"));
            values.push(match v.parse::<i64>() {
                Ok(i) if name.ends_with("_id") => Value::Int(i),
                _ => Value::Str(v.clone()),
            });
        }
    }
    (clauses.join(" AND "), values)
}

async fn list<R: Resource>(
    State(state): State<Shared>,
    SignedIn(_): SignedIn,
    Query(paging): Query<Paging>,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> ApiResult<(HeaderMap, Json<Vec<R>>)> {
    paging.check()?;
    let (where_sql, values) = filters::<R>(&query);
    let total = state.store.count(R::TABLE, &where_sql, &values).await?;
    let rows = state
        .store
        .page(R::TABLE, &where_sql, &values, paging.page, paging.per_page)
        .await?;
    Ok((
        paging.headers(&format!("/api/v1/{}", R::PATH), total),
        Json(rows.iter().map(R::from_row).collect()),
    ))
}

pub async fn fetch<R: Resource>(store: &Store, id: i64) -> ApiResult<R> {
    store
        .fetch_optional(
            &format!("SELECT * FROM {} WHERE id = ?", R::TABLE),
            &[id.into()],
        )
        .await?
        .map(|r| R::from_row(&r))
        .ok_or_else(|| ApiError::not_found(R::PATH.trim_end_matches('s'), id))
}

async fn get_one<R: Resource>(
    State(state): State<Shared>,
    SignedIn(_): SignedIn,
    Path(id): Path<i64>,
) -> ApiResult<Json<R>> {
    Ok(Json(fetch::<R>(&state.store, id).await?))
}

async fn create<R: Resource>(
    State(state): State<Shared>,
    SignedIn(caller): SignedIn,
    Body(req): Body<R::Create>,
) -> ApiResult<Json<R>> {
    caller.must_be_root()?;
    let fields = R::create(req)?;
    let id = state.store.insert(R::TABLE, &fields).await?;
    Ok(Json(fetch::<R>(&state.store, id).await?))
}

async fn update<R: Resource>(
    State(state): State<Shared>,
    SignedIn(caller): SignedIn,
    Path(id): Path<i64>,
    Body(req): Body<R::Update>,
) -> ApiResult<Json<R>> {
    caller.must_be_root()?;
    let fields = R::update(req)?;
    if !state.store.update(R::TABLE, id, &fields).await? {
        return Err(ApiError::not_found(R::PATH.trim_end_matches('s'), id));
    }
    Ok(Json(fetch::<R>(&state.store, id).await?))
}

async fn delete<R: Resource>(
    State(state): State<Shared>,
    SignedIn(caller): SignedIn,
    Path(id): Path<i64>,
) -> ApiResult<StatusCode> {
    caller.must_be_root()?;
    if !state.store.delete(R::TABLE, id).await? {
        return Err(ApiError::not_found(R::PATH.trim_end_matches('s'), id));
    }
    Ok(StatusCode::OK)
}

/// The five CRUD routes of a resource.
fn crud<R: Resource>(router: Router<Shared>) -> Router<Shared> {
    let base = format!("/api/v1/{}", R::PATH);
    router.route(&base, get(list::<R>).post(create::<R>)).route(
        &format!("{base}/{{id}}"),
        get(get_one::<R>).patch(update::<R>).delete(delete::<R>),
    )
}

/// Attaches a component to a cluster: `PUT /api/v1/<clusters>/{id}/<members>/{member}`.
async fn attach(
    state: &Shared,
    caller: &Caller,
    table: &str,
    column: &str,
    member: i64,
    cluster: i64,
) -> ApiResult<StatusCode> {
    caller.must_be_root()?;
    let fields = [(column, Value::Int(cluster)), crate::models::updated()];
    if !state.store.update(table, member, &fields).await? {
        return Err(ApiError::not_found(table.trim_end_matches('s'), member));
    }
    Ok(StatusCode::OK)
}

/// `GET /oapi/v1/clusters`: the scheduler clusters, for tools holding a personal access
/// token with the `cluster` scope.
async fn open_clusters(
    State(state): State<Shared>,
    OpenApi(_): OpenApi,
    Query(paging): Query<Paging>,
) -> ApiResult<(HeaderMap, Json<Vec<crate::models::SchedulerCluster>>)> {
    paging.check()?;
    let total = state
        .store
        .count("scheduler_clusters", "1 = 1", &[])
        .await?;
    let rows = state
        .store
        .page(
            "scheduler_clusters",
            "1 = 1",
            &[],
            paging.page,
            paging.per_page,
        )
        .await?;
    Ok((
        paging.headers("/oapi/v1/clusters", total),
        Json(
            rows.iter()
                .map(crate::models::SchedulerCluster::from_row)
                .collect(),
        ),
    ))
}

async fn healthy() -> &'static str {
    "OK"
}

/// Every route of the REST and open APIs.
pub fn router(state: Shared) -> Router {
    use crate::models::*;
    let mut r: Router<Shared> = Router::new().route("/healthy", get(healthy));
    r = crud::<SchedulerCluster>(r);
    r = crud::<SeedPeerCluster>(r);
    r = crud::<Scheduler>(r);
    r = crud::<SeedPeer>(r);
    r = crud::<Peer>(r);
    r = crud::<Application>(r);
    r = crud::<Config>(r);
    r = r
        .route(
            "/api/v1/scheduler-clusters/{id}/schedulers/{member}",
            axum::routing::put(
                |State(s): State<Shared>,
                 SignedIn(c): SignedIn,
                 Path((id, member)): Path<(i64, i64)>| async move {
                    attach(&s, &c, "schedulers", "scheduler_cluster_id", member, id).await
                },
            ),
        )
        .route(
            "/api/v1/seed-peer-clusters/{id}/seed-peers/{member}",
            axum::routing::put(
                |State(s): State<Shared>,
                 SignedIn(c): SignedIn,
                 Path((id, member)): Path<(i64, i64)>| async move {
                    attach(&s, &c, "seed_peers", "seed_peer_cluster_id", member, id).await
                },
            ),
        )
        .route(
            "/api/v1/seed-peer-clusters/{id}/scheduler-clusters/{member}",
            axum::routing::put(
                |State(s): State<Shared>,
                 SignedIn(c): SignedIn,
                 Path((id, member)): Path<(i64, i64)>| async move {
                    attach(
                        &s,
                        &c,
                        "scheduler_clusters",
                        "seed_peer_cluster_id",
                        member,
                        id,
                    )
                    .await
                },
            ),
        );
    r = users::routes(r);
    r = jobs::routes(r);
    r = r.route("/oapi/v1/clusters", get(open_clusters));
    // Swagger UI at /swagger/ (vendored assets: nothing is fetched), the document at
    // /swagger/doc.json as upstream's manager serves it.
    let ui = utoipa_swagger_ui::SwaggerUi::new("/swagger")
        .external_url_unchecked("/swagger/doc.json", openapi::document());
    r = r.merge(ui);
    r.fallback(|method: Method, uri: axum::http::Uri| async move {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no route for {method} {uri}"),
        )
    })
    .with_state(state)
}
