//! Accounts: sign-in and sign-up, users and their roles, passwords, personal access tokens.

use super::{ApiError, ApiResult, Body, Paging, Shared, SignedIn};
use crate::auth::{self, MIN_PASSWORD};
use crate::models::{created, updated, PersonalAccessToken, Role, User};
use crate::store::{now, Value};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignIn {
    name: String,
    password: String,
}

#[derive(Debug, Serialize)]
struct SignedInAnswer {
    token: String,
    expire: String,
}

async fn signin(
    State(state): State<Shared>,
    Body(req): Body<SignIn>,
) -> ApiResult<Json<SignedInAnswer>> {
    let refused = || ApiError::unauthorized("incorrect name or password");
    let user = auth::user_by_name(&state.store, &req.name)
        .await?
        .ok_or_else(refused)?;
    if !auth::verify_password(&req.password, &user.password_hash) {
        return Err(refused());
    }
    if user.state != "enable" {
        return Err(ApiError::forbidden("the user is disabled"));
    }
    let (token, exp) = state.jwt.issue(&user);
    Ok(Json(SignedInAnswer {
        token,
        expire: crate::models::rfc3339(exp),
    }))
}

async fn refresh(
    State(state): State<Shared>,
    SignedIn(caller): SignedIn,
) -> ApiResult<Json<SignedInAnswer>> {
    let user = auth::user_by_id(&state.store, caller.user_id)
        .await?
        .ok_or_else(|| ApiError::unauthorized("the token's user no longer exists"))?;
    let (token, exp) = state.jwt.issue(&user);
    Ok(Json(SignedInAnswer {
        token,
        expire: crate::models::rfc3339(exp),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignUp {
    name: String,
    password: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    phone: String,
    #[serde(default)]
    avatar: String,
    #[serde(default)]
    location: String,
    #[serde(default)]
    bio: String,
}

fn password_ok(field: &'static str, password: &str) -> ApiResult<()> {
    if password.chars().count() < MIN_PASSWORD || password.len() > 1024 {
        return Err(ApiError::bad_request(format!(
            "invalid field {field}: must be {MIN_PASSWORD} to 1024 characters"
        )));
    }
    Ok(())
}

fn username_ok(name: &str) -> ApiResult<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(ApiError::bad_request(
            "invalid field name: 1 to 64 of letters, digits, '-', '_', '.'",
        ));
    }
    Ok(())
}

/// Sign-up makes a guest (read-only) account.
async fn signup(State(state): State<Shared>, Body(req): Body<SignUp>) -> ApiResult<Json<User>> {
    username_ok(&req.name)?;
    password_ok("password", &req.password)?;
    let mut fields = vec![
        ("name", req.name.into()),
        ("email", req.email.into()),
        ("phone", req.phone.into()),
        ("avatar", req.avatar.into()),
        ("location", req.location.into()),
        ("bio", req.bio.into()),
        ("password_hash", auth::hash_password(&req.password).into()),
        ("state", "enable".into()),
        ("role", Role::Guest.as_str().into()),
    ];
    fields.extend(created());
    let id = state.store.insert("users", &fields).await?;
    user(&state, id).await.map(Json)
}

async fn user(state: &Shared, id: i64) -> ApiResult<User> {
    auth::user_by_id(&state.store, id)
        .await?
        .ok_or_else(|| ApiError::not_found("user", id))
}

async fn list_users(
    State(state): State<Shared>,
    SignedIn(caller): SignedIn,
    Query(paging): Query<Paging>,
) -> ApiResult<(HeaderMap, Json<Vec<User>>)> {
    caller.must_be_root()?;
    paging.check()?;
    let total = state.store.count("users", "1 = 1", &[]).await?;
    let rows = state
        .store
        .page("users", "1 = 1", &[], paging.page, paging.per_page)
        .await?;
    Ok((
        paging.headers("/api/v1/users", total),
        Json(rows.iter().map(User::from_row).collect()),
    ))
}

/// Root, or the user themself.
fn self_or_root(caller: &super::Caller, id: i64) -> ApiResult<()> {
    if caller.user_id == id || caller.role == Role::Root {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "only root or the user themself may do this",
        ))
    }
}

async fn get_user(
    State(state): State<Shared>,
    SignedIn(caller): SignedIn,
    Path(id): Path<i64>,
) -> ApiResult<Json<User>> {
    self_or_root(&caller, id)?;
    user(&state, id).await.map(Json)
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct UpdateUser {
    email: Option<String>,
    phone: Option<String>,
    avatar: Option<String>,
    location: Option<String>,
    bio: Option<String>,
    /// Root only: `enable` or `disable`.
    state: Option<String>,
}

async fn update_user(
    State(state): State<Shared>,
    SignedIn(caller): SignedIn,
    Path(id): Path<i64>,
    Body(req): Body<UpdateUser>,
) -> ApiResult<Json<User>> {
    self_or_root(&caller, id)?;
    let mut fields = vec![updated()];
    for (name, v) in [
        ("email", req.email),
        ("phone", req.phone),
        ("avatar", req.avatar),
        ("location", req.location),
        ("bio", req.bio),
    ] {
        if let Some(v) = v {
            fields.push((name, v.into()));
        }
    }
    if let Some(s) = req.state {
        caller.must_be_root()?;
        if s != "enable" && s != "disable" {
            return Err(ApiError::bad_request(
                "invalid field state: enable or disable",
            ));
        }
        fields.push(("state", s.into()));
    }
    if !state.store.update("users", id, &fields).await? {
        return Err(ApiError::not_found("user", id));
    }
    user(&state, id).await.map(Json)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetPassword {
    #[serde(default)]
    old_password: String,
    new_password: String,
}

/// A user changes their password with the old one; root may reset anyone's.
async fn reset_password(
    State(state): State<Shared>,
    SignedIn(caller): SignedIn,
    Path(id): Path<i64>,
    Body(req): Body<ResetPassword>,
) -> ApiResult<StatusCode> {
    self_or_root(&caller, id)?;
    password_ok("new_password", &req.new_password)?;
    let target = user(&state, id).await?;
    // Root may reset another user's password; everyone else proves the old one.
    let must_prove = caller.role != Role::Root || caller.user_id == id;
    if must_prove && !auth::verify_password(&req.old_password, &target.password_hash) {
        return Err(ApiError::bad_request(
            "invalid field old_password: incorrect",
        ));
    }
    state
        .store
        .update(
            "users",
            id,
            &[
                (
                    "password_hash",
                    auth::hash_password(&req.new_password).into(),
                ),
                updated(),
            ],
        )
        .await?;
    Ok(StatusCode::OK)
}

async fn user_roles(
    State(state): State<Shared>,
    SignedIn(caller): SignedIn,
    Path(id): Path<i64>,
) -> ApiResult<Json<Vec<String>>> {
    self_or_root(&caller, id)?;
    Ok(Json(vec![user(&state, id).await?.role]))
}

async fn set_role(
    state: &Shared,
    caller: &super::Caller,
    id: i64,
    role: Role,
) -> ApiResult<StatusCode> {
    caller.must_be_root()?;
    if !state
        .store
        .update("users", id, &[("role", role.as_str().into()), updated()])
        .await?
    {
        return Err(ApiError::not_found("user", id));
    }
    Ok(StatusCode::OK)
}

fn parse_role(role: &str) -> ApiResult<Role> {
    Role::parse(role).ok_or_else(|| ApiError::bad_request("invalid field role: root or guest"))
}

// ---- personal access tokens ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    name: String,
    #[serde(default)]
    bio: String,
    #[serde(default = "default_scopes")]
    scopes: Vec<String>,
    /// RFC 3339; absent: one year from now.
    #[serde(default)]
    expired_at: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    user_id: Option<i64>,
}

fn default_scopes() -> Vec<String> {
    vec!["job".into(), "cluster".into()]
}

const SCOPES: [&str; 2] = ["job", "cluster"];

fn scopes_ok(scopes: &[String]) -> ApiResult<()> {
    if scopes.is_empty() || scopes.iter().any(|s| !SCOPES.contains(&s.as_str())) {
        return Err(ApiError::bad_request(
            "invalid field scopes: one or more of job, cluster",
        ));
    }
    Ok(())
}

fn parse_time(field: &'static str, text: &str) -> ApiResult<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp())
        .map_err(|e| ApiError::bad_request(format!("invalid field {field}: {e}")))
}

fn token_state_ok(s: &str) -> ApiResult<()> {
    if s != "active" && s != "inactive" {
        return Err(ApiError::bad_request(
            "invalid field state: active or inactive",
        ));
    }
    Ok(())
}

async fn create_token(
    State(state): State<Shared>,
    SignedIn(caller): SignedIn,
    Body(req): Body<CreateToken>,
) -> ApiResult<Json<PersonalAccessToken>> {
    if req.name.is_empty() || req.name.len() > 255 {
        return Err(ApiError::bad_request(
            "invalid field name: 1 to 255 characters",
        ));
    }
    scopes_ok(&req.scopes)?;
    let owner = req.user_id.unwrap_or(caller.user_id);
    self_or_root(&caller, owner)?;
    let expired_at = match &req.expired_at {
        Some(t) => {
            let t = parse_time("expired_at", t)?;
            if t <= now() {
                return Err(ApiError::bad_request(
                    "invalid field expired_at: must be in the future",
                ));
            }
            t
        }
        None => now() + 365 * 24 * 3600,
    };
    let token_state = req.state.unwrap_or_else(|| "active".into());
    token_state_ok(&token_state)?;
    let token = auth::random_token();
    let mut fields = vec![
        ("name", req.name.into()),
        ("bio", req.bio.into()),
        ("token_hash", auth::token_hash(&token).into()),
        (
            "scopes",
            serde_json::to_string(&req.scopes).expect("json").into(),
        ),
        ("state", token_state.into()),
        ("expired_at", expired_at.into()),
        ("user_id", owner.into()),
    ];
    fields.extend(created());
    let id = state
        .store
        .insert("personal_access_tokens", &fields)
        .await?;
    let mut answer = token_row(&state, id).await?;
    answer.token = Some(token);
    Ok(Json(answer))
}

async fn token_row(state: &Shared, id: i64) -> ApiResult<PersonalAccessToken> {
    state
        .store
        .fetch_optional(
            "SELECT * FROM personal_access_tokens WHERE id = ?",
            &[id.into()],
        )
        .await?
        .map(|r| PersonalAccessToken::from_row(&r))
        .ok_or_else(|| ApiError::not_found("personal access token", id))
}

async fn own_token(
    state: &Shared,
    caller: &super::Caller,
    id: i64,
) -> ApiResult<PersonalAccessToken> {
    let token = token_row(state, id).await?;
    if token.user_id != caller.user_id && caller.role != Role::Root {
        // Someone else's token does not exist as far as this caller may know.
        return Err(ApiError::not_found("personal access token", id));
    }
    Ok(token)
}

async fn list_tokens(
    State(state): State<Shared>,
    SignedIn(caller): SignedIn,
    Query(paging): Query<Paging>,
) -> ApiResult<(HeaderMap, Json<Vec<PersonalAccessToken>>)> {
    paging.check()?;
    let (where_sql, values): (&str, Vec<Value>) = if caller.role == Role::Root {
        ("1 = 1", vec![])
    } else {
        ("user_id = ?", vec![caller.user_id.into()])
    };
    let total = state
        .store
        .count("personal_access_tokens", where_sql, &values)
        .await?;
    let rows = state
        .store
        .page(
            "personal_access_tokens",
            where_sql,
            &values,
            paging.page,
            paging.per_page,
        )
        .await?;
    Ok((
        paging.headers("/api/v1/personal-access-tokens", total),
        Json(rows.iter().map(PersonalAccessToken::from_row).collect()),
    ))
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct UpdateToken {
    bio: Option<String>,
    scopes: Option<Vec<String>>,
    state: Option<String>,
    expired_at: Option<String>,
}

async fn update_token(
    State(state): State<Shared>,
    SignedIn(caller): SignedIn,
    Path(id): Path<i64>,
    Body(req): Body<UpdateToken>,
) -> ApiResult<Json<PersonalAccessToken>> {
    own_token(&state, &caller, id).await?;
    let mut fields = vec![updated()];
    if let Some(b) = req.bio {
        fields.push(("bio", b.into()));
    }
    if let Some(s) = req.scopes {
        scopes_ok(&s)?;
        fields.push(("scopes", serde_json::to_string(&s).expect("json").into()));
    }
    if let Some(s) = req.state {
        token_state_ok(&s)?;
        fields.push(("state", s.into()));
    }
    if let Some(t) = req.expired_at {
        fields.push(("expired_at", parse_time("expired_at", &t)?.into()));
    }
    state
        .store
        .update("personal_access_tokens", id, &fields)
        .await?;
    token_row(&state, id).await.map(Json)
}

async fn delete_token(
    State(state): State<Shared>,
    SignedIn(caller): SignedIn,
    Path(id): Path<i64>,
) -> ApiResult<StatusCode> {
    own_token(&state, &caller, id).await?;
    state.store.delete("personal_access_tokens", id).await?;
    Ok(StatusCode::OK)
}

pub(super) fn routes(r: Router<Shared>) -> Router<Shared> {
    r.route("/api/v1/users/signin", post(signin))
        .route("/api/v1/users/signup", post(signup))
        .route("/api/v1/users/signout", post(|| async { StatusCode::OK }))
        .route("/api/v1/users/refresh_token", post(refresh))
        .route("/api/v1/users", get(list_users))
        .route("/api/v1/users/{id}", get(get_user).patch(update_user))
        .route("/api/v1/users/{id}/reset_password", post(reset_password))
        .route("/api/v1/users/{id}/roles", get(user_roles))
        .route(
            "/api/v1/users/{id}/roles/{role}",
            put(
                |State(s): State<Shared>,
                 SignedIn(c): SignedIn,
                 Path((id, role)): Path<(i64, String)>| async move {
                    set_role(&s, &c, id, parse_role(&role)?).await
                },
            )
            .delete(
                |State(s): State<Shared>,
                 SignedIn(c): SignedIn,
                 Path((id, role)): Path<(i64, String)>| async move {
                    parse_role(&role)?;
                    set_role(&s, &c, id, Role::Guest).await
                },
            ),
        )
        .route(
            "/api/v1/personal-access-tokens",
            get(list_tokens).post(create_token),
        )
        .route(
            "/api/v1/personal-access-tokens/{id}",
            get(
                |State(s): State<Shared>, SignedIn(c): SignedIn, Path(id): Path<i64>| async move {
                    own_token(&s, &c, id).await.map(Json)
                },
            )
            .patch(update_token)
            .delete(delete_token),
        )
}
