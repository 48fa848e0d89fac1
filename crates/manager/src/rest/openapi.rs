//! The OpenAPI 3 document of the REST and open APIs (served at `/swagger/doc.json`, where
//! upstream's manager serves its Swagger document, and shown by the Swagger UI at
//! `/swagger/`). Built from the same resource table the router is built from, so the CRUD
//! routes cannot drift from it; a test sends a request to every documented operation and
//! checks that the router answers it.

use serde_json::{json, Map, Value};

/// `$ref` to a component schema.
fn r(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn int() -> Value {
    json!({"type": "integer", "format": "int64"})
}

fn text() -> Value {
    json!({"type": "string"})
}

fn array(items: Value) -> Value {
    json!({"type": "array", "items": items})
}

fn object(properties: &[(&str, Value)], required: &[&str]) -> Value {
    let mut props = Map::new();
    for (k, v) in properties {
        props.insert((*k).to_string(), v.clone());
    }
    let mut o = json!({"type": "object", "properties": props});
    if !required.is_empty() {
        o["required"] = json!(required);
    }
    o
}

/// Answers every operation may give besides its success.
fn errors(secured: bool) -> Value {
    let err = |d: &str| json!({"description": d, "content": {"application/json": {"schema": r("Error")}}});
    let mut m = Map::new();
    m.insert(
        "400".into(),
        err("invalid input; the message names the field"),
    );
    if secured {
        m.insert("401".into(), err("missing or invalid token"));
        m.insert(
            "403".into(),
            err("the caller may not do this (role, scope, inactive or expired token)"),
        );
    }
    m.insert("404".into(), err("no such ID"));
    Value::Object(m)
}

fn ok(schema: Option<Value>, description: &str) -> Value {
    match schema {
        Some(s) => {
            json!({"description": description, "content": {"application/json": {"schema": s}}})
        }
        None => json!({"description": description}),
    }
}

fn paged(schema: Value) -> Value {
    json!({
        "description": "a page, oldest first",
        "headers": {
            "Link": {"description": "first, prev, next and last pages", "schema": {"type": "string"}},
            "Total-Page": {"description": "number of pages", "schema": {"type": "integer"}},
            "Total-Count": {"description": "number of items", "schema": {"type": "integer"}},
        },
        "content": {"application/json": {"schema": array(schema)}},
    })
}

/// Who may call: a sign-in token (`/api/v1`), a personal access token (`/oapi/v1`), or
/// anyone.
#[derive(Clone, Copy)]
enum Auth {
    None,
    SignedIn,
    Token,
}

struct Op<'a> {
    tag: &'a str,
    summary: &'a str,
    auth: Auth,
    body: Option<Value>,
    params: Vec<Value>,
    success: Value,
}

fn operation(op: Op<'_>) -> Value {
    let mut responses = errors(!matches!(op.auth, Auth::None));
    responses["200"] = op.success;
    let mut o = json!({
        "tags": [op.tag],
        "summary": op.summary,
        "responses": responses,
    });
    match op.auth {
        Auth::None => o["security"] = json!([]),
        Auth::SignedIn => o["security"] = json!([{"signIn": []}]),
        Auth::Token => {
            o["security"] = json!([{"personalAccessToken": []}, {"accessTokenQuery": []}])
        }
    }
    if let Some(b) = op.body {
        o["requestBody"] =
            json!({"required": true, "content": {"application/json": {"schema": b}}});
    }
    if !op.params.is_empty() {
        o["parameters"] = Value::Array(op.params);
    }
    o
}

fn path_id(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": {"type": "integer", "format": "int64"}})
}

fn query(name: &str, schema: Value, description: &str) -> Value {
    json!({"name": name, "in": "query", "required": false, "schema": schema, "description": description})
}

fn paging() -> Vec<Value> {
    vec![
        query(
            "page",
            json!({"type": "integer", "minimum": 1, "default": 1}),
            "page number",
        ),
        query(
            "per_page",
            json!({"type": "integer", "minimum": 1, "maximum": 1000, "default": 10}),
            "items per page",
        ),
    ]
}

/// The five routes of a CRUD resource.
fn crud(paths: &mut Map<String, Value>, path: &str, tag: &str, schema: &str, filters: &[&str]) {
    let mut list_params = paging();
    for f in filters {
        list_params.push(query(f, text(), "equals"));
    }
    paths.insert(
        format!("/api/v1/{path}"),
        json!({
            "get": operation(Op { tag, summary: "list", auth: Auth::SignedIn, body: None, params: list_params, success: paged(r(schema)) }),
            "post": operation(Op { tag, summary: "create (root)", auth: Auth::SignedIn, body: Some(r(&format!("Create{schema}"))), params: vec![], success: ok(Some(r(schema)), "created") }),
        }),
    );
    paths.insert(
        format!("/api/v1/{path}/{{id}}"),
        json!({
            "get": operation(Op { tag, summary: "get one", auth: Auth::SignedIn, body: None, params: vec![path_id("id")], success: ok(Some(r(schema)), "found") }),
            "patch": operation(Op { tag, summary: "update (root)", auth: Auth::SignedIn, body: Some(r(&format!("Update{schema}"))), params: vec![path_id("id")], success: ok(Some(r(schema)), "updated") }),
            "delete": operation(Op { tag, summary: "delete (root)", auth: Auth::SignedIn, body: None, params: vec![path_id("id")], success: ok(None, "deleted") }),
        }),
    );
}

/// The CRUD resources: (path, tag, schema, list filters). The router mounts the same.
pub const RESOURCES: &[(&str, &str, &str, &[&str])] = &[
    (
        "scheduler-clusters",
        "scheduler clusters",
        "SchedulerCluster",
        &[],
    ),
    (
        "seed-peer-clusters",
        "seed peer clusters",
        "SeedPeerCluster",
        &[],
    ),
    (
        "schedulers",
        "schedulers",
        "Scheduler",
        &["scheduler_cluster_id", "state", "hostname", "ip"],
    ),
    (
        "seed-peers",
        "seed peers",
        "SeedPeer",
        &["seed_peer_cluster_id", "state", "hostname", "ip"],
    ),
    (
        "peers",
        "peers",
        "Peer",
        &["scheduler_cluster_id", "state", "hostname", "ip"],
    ),
    ("applications", "applications", "Application", &[]),
    ("configs", "configs", "Config", &[]),
];

fn schemas() -> Value {
    let stamps = [
        (
            "created_at",
            json!({"type": "string", "format": "date-time"}),
        ),
        (
            "updated_at",
            json!({"type": "string", "format": "date-time"}),
        ),
    ];
    let with_stamps = |props: &[(&str, Value)]| {
        let mut all: Vec<(&str, Value)> = props.to_vec();
        all.extend(stamps.iter().cloned());
        object(&all, &[])
    };
    let cluster_config = object(
        &[
            (
                "candidate_parent_limit",
                json!({"type": "integer", "minimum": 1, "maximum": 20}),
            ),
            (
                "filter_parent_limit",
                json!({"type": "integer", "minimum": 10, "maximum": 1000}),
            ),
            ("job_rate_limit", json!({"type": "integer", "minimum": 1})),
        ],
        &[],
    );
    let client_config = object(
        &[
            (
                "load_limit",
                json!({"type": "integer", "minimum": 1, "maximum": 2000}),
            ),
            ("block_list", json!({"type": "object"})),
        ],
        &[],
    );
    let scopes = object(
        &[
            ("idc", text()),
            ("location", text()),
            ("cidrs", array(text())),
            ("hostnames", array(text())),
        ],
        &[],
    );
    let priority = object(
        &[
            (
                "value",
                json!({"type": "integer", "minimum": 0, "maximum": 6}),
            ),
            (
                "urls",
                array(object(
                    &[("regex", text()), ("value", json!({"type": "integer"}))],
                    &[],
                )),
            ),
        ],
        &[],
    );
    let preheat_args = object(
        &[
            ("type", json!({"type": "string", "enum": ["image", "file"]})),
            (
                "url",
                json!({"type": "string", "description": "image: the manifest URL; file: a file URL"}),
            ),
            ("urls", array(text())),
            (
                "piece_length",
                json!({"type": "integer", "minimum": 4194304, "maximum": 67108864}),
            ),
            ("tag", text()),
            ("application", text()),
            (
                "filtered_query_params",
                json!({"type": "string", "description": "&-separated query parameters left out of the task ID"}),
            ),
            (
                "headers",
                json!({"type": "object", "additionalProperties": {"type": "string"}, "description": "write-only: shown back as ***"}),
            ),
            ("username", text()),
            (
                "password",
                json!({"type": "string", "description": "write-only"}),
            ),
            (
                "platform",
                json!({"type": "string", "default": "linux/amd64"}),
            ),
            (
                "scope",
                json!({"type": "string", "enum": ["single_seed_peer", "all_seed_peers", "all_peers", ""], "default": "single_seed_peer"}),
            ),
            ("ips", array(text())),
            (
                "percentage",
                json!({"type": "integer", "minimum": 1, "maximum": 100}),
            ),
            (
                "count",
                json!({"type": "integer", "minimum": 1, "maximum": 200}),
            ),
            (
                "concurrent_task_count",
                json!({"type": "integer", "minimum": 1, "maximum": 100, "default": 8}),
            ),
            (
                "concurrent_peer_count",
                json!({"type": "integer", "minimum": 1, "maximum": 1000, "default": 500}),
            ),
            (
                "timeout",
                json!({"description": "nanoseconds (as Go marshals a time.Duration) or a duration string such as 30m; 0: the manager's job.timeout", "oneOf": [{"type": "integer"}, {"type": "string"}]}),
            ),
            (
                "enable_task_id_based_blob_digest",
                json!({"type": "boolean", "default": true}),
            ),
        ],
        &["type"],
    );
    let task_args = object(
        &[
            (
                "task_id",
                json!({"type": "string", "pattern": "^[0-9a-f]{64}$"}),
            ),
            ("url", text()),
            ("tag", text()),
            ("application", text()),
            ("filtered_query_params", text()),
            ("piece_length", json!({"type": "integer"})),
            ("content_for_calculating_task_id", text()),
            (
                "enable_task_id_based_blob_digest",
                json!({"type": "boolean", "default": true}),
            ),
            (
                "timeout",
                json!({"oneOf": [{"type": "integer"}, {"type": "string"}]}),
            ),
        ],
        &[],
    );
    let cluster_props = || {
        vec![
            ("name", text()),
            ("bio", text()),
            ("config", r("SchedulerClusterConfig")),
            ("client_config", r("ClientConfig")),
            ("seed_client_config", r("ClientConfig")),
            ("scopes", r("Scopes")),
            ("is_default", json!({"type": "boolean"})),
            ("seed_peer_cluster_id", int()),
        ]
    };
    let mut sc = vec![("id", int())];
    sc.extend(cluster_props());
    let mut m = Map::new();
    m.insert("Error".into(), object(&[("message", text())], &["message"]));
    m.insert("SchedulerClusterConfig".into(), cluster_config);
    m.insert("ClientConfig".into(), client_config);
    m.insert("Scopes".into(), scopes);
    m.insert("Priority".into(), priority);
    m.insert("SchedulerCluster".into(), with_stamps(&sc));
    m.insert(
        "CreateSchedulerCluster".into(),
        object(&cluster_props(), &["name"]),
    );
    m.insert(
        "UpdateSchedulerCluster".into(),
        object(&cluster_props(), &[]),
    );
    m.insert(
        "SeedPeerCluster".into(),
        with_stamps(&[
            ("id", int()),
            ("name", text()),
            ("bio", text()),
            ("config", json!({"type": "object"})),
            ("scheduler_cluster_id", int()),
        ]),
    );
    m.insert(
        "CreateSeedPeerCluster".into(),
        object(
            &[
                ("name", text()),
                ("bio", text()),
                ("config", json!({"type": "object"})),
                ("scheduler_cluster_id", int()),
            ],
            &["name"],
        ),
    );
    m.insert(
        "UpdateSeedPeerCluster".into(),
        object(
            &[
                ("name", text()),
                ("bio", text()),
                ("config", json!({"type": "object"})),
                ("scheduler_cluster_id", int()),
            ],
            &[],
        ),
    );
    m.insert(
        "Scheduler".into(),
        with_stamps(&[
            ("id", int()),
            ("hostname", text()),
            ("idc", text()),
            ("location", text()),
            ("ip", text()),
            ("port", int()),
            (
                "state",
                json!({"type": "string", "enum": ["active", "inactive"]}),
            ),
            ("features", array(text())),
            ("scheduler_cluster_id", int()),
        ]),
    );
    m.insert(
        "CreateScheduler".into(),
        object(
            &[
                ("hostname", text()),
                ("ip", text()),
                ("port", int()),
                ("idc", text()),
                ("location", text()),
                ("scheduler_cluster_id", int()),
            ],
            &["hostname", "ip", "port", "scheduler_cluster_id"],
        ),
    );
    m.insert(
        "UpdateScheduler".into(),
        object(
            &[
                ("idc", text()),
                ("location", text()),
                ("ip", text()),
                ("port", int()),
                ("scheduler_cluster_id", int()),
            ],
            &[],
        ),
    );
    m.insert(
        "SeedPeer".into(),
        with_stamps(&[
            ("id", int()),
            ("hostname", text()),
            (
                "type",
                json!({"type": "string", "enum": ["super", "strong", "weak"]}),
            ),
            ("idc", text()),
            ("location", text()),
            ("ip", text()),
            ("port", int()),
            ("download_port", int()),
            ("object_storage_port", int()),
            ("state", text()),
            ("seed_peer_cluster_id", int()),
        ]),
    );
    m.insert(
        "CreateSeedPeer".into(),
        object(
            &[
                ("hostname", text()),
                ("type", text()),
                ("ip", text()),
                ("port", int()),
                ("download_port", int()),
                ("object_storage_port", int()),
                ("idc", text()),
                ("location", text()),
                ("seed_peer_cluster_id", int()),
            ],
            &[
                "hostname",
                "ip",
                "port",
                "download_port",
                "seed_peer_cluster_id",
            ],
        ),
    );
    m.insert(
        "UpdateSeedPeer".into(),
        object(
            &[
                ("type", text()),
                ("idc", text()),
                ("location", text()),
                ("ip", text()),
                ("port", int()),
                ("download_port", int()),
                ("seed_peer_cluster_id", int()),
            ],
            &[],
        ),
    );
    m.insert(
        "Peer".into(),
        with_stamps(&[
            ("id", int()),
            ("hostname", text()),
            ("type", text()),
            ("idc", text()),
            ("location", text()),
            ("ip", text()),
            ("port", int()),
            ("download_port", int()),
            ("state", text()),
            ("os", text()),
            ("platform", text()),
            ("version", text()),
            ("git_commit", text()),
            ("scheduler_cluster_id", int()),
        ]),
    );
    m.insert(
        "CreatePeer".into(),
        object(
            &[
                ("hostname", text()),
                ("type", text()),
                ("ip", text()),
                ("port", int()),
                ("download_port", int()),
                ("idc", text()),
                ("location", text()),
                ("os", text()),
                ("platform", text()),
                ("version", text()),
                ("git_commit", text()),
                ("scheduler_cluster_id", int()),
            ],
            &["hostname", "ip", "port", "download_port"],
        ),
    );
    m.insert("UpdatePeer".into(), object(&[("state", text())], &[]));
    m.insert(
        "Application".into(),
        with_stamps(&[
            ("id", int()),
            ("name", text()),
            ("url", text()),
            ("bio", text()),
            ("priority", r("Priority")),
            ("user_id", int()),
        ]),
    );
    m.insert(
        "CreateApplication".into(),
        object(
            &[
                ("name", text()),
                ("url", text()),
                ("bio", text()),
                ("priority", r("Priority")),
                ("user_id", int()),
            ],
            &["name"],
        ),
    );
    m.insert(
        "UpdateApplication".into(),
        object(
            &[
                ("name", text()),
                ("url", text()),
                ("bio", text()),
                ("priority", r("Priority")),
                ("user_id", int()),
            ],
            &[],
        ),
    );
    m.insert(
        "Config".into(),
        with_stamps(&[
            ("id", int()),
            ("name", text()),
            ("value", text()),
            ("bio", text()),
            ("user_id", int()),
        ]),
    );
    m.insert(
        "CreateConfig".into(),
        object(
            &[
                ("name", text()),
                ("value", text()),
                ("bio", text()),
                ("user_id", int()),
            ],
            &["name", "value"],
        ),
    );
    m.insert(
        "UpdateConfig".into(),
        object(
            &[
                ("name", text()),
                ("value", text()),
                ("bio", text()),
                ("user_id", int()),
            ],
            &[],
        ),
    );
    m.insert(
        "User".into(),
        with_stamps(&[
            ("id", int()),
            ("name", text()),
            ("email", text()),
            ("avatar", text()),
            ("phone", text()),
            ("bio", text()),
            ("location", text()),
            (
                "state",
                json!({"type": "string", "enum": ["enable", "disable"]}),
            ),
            ("role", json!({"type": "string", "enum": ["root", "guest"]})),
        ]),
    );
    m.insert(
        "SignIn".into(),
        object(
            &[("name", text()), ("password", text())],
            &["name", "password"],
        ),
    );
    m.insert(
        "SignedIn".into(),
        object(
            &[
                (
                    "token",
                    json!({"type": "string", "description": "a JWT for Authorization: Bearer"}),
                ),
                ("expire", json!({"type": "string", "format": "date-time"})),
            ],
            &["token"],
        ),
    );
    m.insert(
        "SignUp".into(),
        object(
            &[
                ("name", text()),
                ("password", json!({"type": "string", "minLength": 8})),
                ("email", text()),
                ("phone", text()),
                ("avatar", text()),
                ("location", text()),
                ("bio", text()),
            ],
            &["name", "password"],
        ),
    );
    m.insert(
        "UpdateUser".into(),
        object(
            &[
                ("email", text()),
                ("phone", text()),
                ("avatar", text()),
                ("location", text()),
                ("bio", text()),
                (
                    "state",
                    json!({"type": "string", "enum": ["enable", "disable"]}),
                ),
            ],
            &[],
        ),
    );
    m.insert(
        "ResetPassword".into(),
        object(
            &[
                ("old_password", text()),
                ("new_password", json!({"type": "string", "minLength": 8})),
            ],
            &["new_password"],
        ),
    );
    m.insert("PersonalAccessToken".into(), with_stamps(&[("id", int()), ("name", text()), ("bio", text()), ("scopes", array(json!({"type": "string", "enum": ["job", "cluster"]}))), ("state", json!({"type": "string", "enum": ["active", "inactive"]})), ("expired_at", json!({"type": "string", "format": "date-time"})), ("user_id", int()), ("token", json!({"type": "string", "description": "only in the answer that created it; stored as a hash"}))]));
    m.insert(
        "CreatePersonalAccessToken".into(),
        object(
            &[
                ("name", text()),
                ("bio", text()),
                ("scopes", array(text())),
                (
                    "expired_at",
                    json!({"type": "string", "format": "date-time"}),
                ),
                ("state", text()),
            ],
            &["name"],
        ),
    );
    m.insert(
        "UpdatePersonalAccessToken".into(),
        object(
            &[
                ("bio", text()),
                ("scopes", array(text())),
                ("state", text()),
                (
                    "expired_at",
                    json!({"type": "string", "format": "date-time"}),
                ),
            ],
            &[],
        ),
    );
    m.insert("PreheatArgs".into(), preheat_args);
    m.insert("TaskArgs".into(), task_args);
    m.insert("CreateJob".into(), object(
            &[
                ("type", json!({"type": "string", "enum": ["preheat", "get_task", "delete_task"]})),
                ("bio", text()),
                ("args", json!({"oneOf": [r("PreheatArgs"), r("TaskArgs")]})),
                ("scheduler_cluster_ids", json!({"type": "array", "items": int(), "nullable": true, "description": "null or empty: every cluster"})),
            ],
            &["type", "args"],
        ));
    m.insert("UpdateJob".into(), object(&[("bio", text())], &[]));
    m.insert("Job".into(), with_stamps(&[
            ("id", int()),
            ("task_id", text()),
            ("bio", text()),
            ("type", text()),
            ("state", json!({"type": "string", "enum": ["PENDING", "SUCCESS", "FAILURE"]})),
            ("args", json!({"type": "object"})),
            ("result", json!({"type": "object", "description": "{state, job_states: [{task_name, state, error, results: [{success_tasks, failure_tasks, scheduler_cluster_id} | {peers, scheduler_cluster_id}]}]}"})),
            ("scheduler_cluster_ids", array(int())),
            ("user_id", int()),
        ]));
    Value::Object(m)
}

/// The whole document.
pub fn document() -> Value {
    let mut paths = Map::new();
    paths.insert(
        "/healthy".into(),
        json!({"get": operation(Op { tag: "health", summary: "the manager is up", auth: Auth::None, body: None, params: vec![], success: ok(None, "OK") })}),
    );
    for (path, tag, schema, filters) in RESOURCES {
        crud(&mut paths, path, tag, schema, filters);
    }
    let attach = |tag: &str, summary: &str| json!({"put": operation(Op { tag, summary, auth: Auth::SignedIn, body: None, params: vec![path_id("id"), path_id("member")], success: ok(None, "attached") })});
    paths.insert(
        "/api/v1/scheduler-clusters/{id}/schedulers/{member}".into(),
        attach(
            "scheduler clusters",
            "put a scheduler in the cluster (root)",
        ),
    );
    paths.insert(
        "/api/v1/seed-peer-clusters/{id}/seed-peers/{member}".into(),
        attach(
            "seed peer clusters",
            "put a seed peer in the cluster (root)",
        ),
    );
    paths.insert(
        "/api/v1/seed-peer-clusters/{id}/scheduler-clusters/{member}".into(),
        attach(
            "seed peer clusters",
            "link a scheduler cluster to the seed peer cluster (root)",
        ),
    );
    let users = "users";
    paths.insert("/api/v1/users/signin".into(), json!({"post": operation(Op { tag: users, summary: "sign in: a JWT", auth: Auth::None, body: Some(r("SignIn")), params: vec![], success: ok(Some(r("SignedIn")), "signed in") })}));
    paths.insert("/api/v1/users/signup".into(), json!({"post": operation(Op { tag: users, summary: "sign up as a guest", auth: Auth::None, body: Some(r("SignUp")), params: vec![], success: ok(Some(r("User")), "created") })}));
    paths.insert("/api/v1/users/signout".into(), json!({"post": operation(Op { tag: users, summary: "sign out (tokens expire on their own)", auth: Auth::None, body: None, params: vec![], success: ok(None, "signed out") })}));
    paths.insert("/api/v1/users/refresh_token".into(), json!({"post": operation(Op { tag: users, summary: "a fresh JWT", auth: Auth::SignedIn, body: None, params: vec![], success: ok(Some(r("SignedIn")), "refreshed") })}));
    paths.insert("/api/v1/users".into(), json!({"get": operation(Op { tag: users, summary: "list users", auth: Auth::SignedIn, body: None, params: paging(), success: paged(r("User")) })}));
    paths.insert(
        "/api/v1/users/{id}".into(),
        json!({
            "get": operation(Op { tag: users, summary: "get a user", auth: Auth::SignedIn, body: None, params: vec![path_id("id")], success: ok(Some(r("User")), "found") }),
            "patch": operation(Op { tag: users, summary: "update a user (self or root)", auth: Auth::SignedIn, body: Some(r("UpdateUser")), params: vec![path_id("id")], success: ok(Some(r("User")), "updated") }),
        }),
    );
    paths.insert("/api/v1/users/{id}/reset_password".into(), json!({"post": operation(Op { tag: users, summary: "change a password (the old one, or root)", auth: Auth::SignedIn, body: Some(r("ResetPassword")), params: vec![path_id("id")], success: ok(None, "changed") })}));
    paths.insert("/api/v1/users/{id}/roles".into(), json!({"get": operation(Op { tag: users, summary: "a user's roles", auth: Auth::SignedIn, body: None, params: vec![path_id("id")], success: ok(Some(array(text())), "roles") })}));
    let role = json!({"name": "role", "in": "path", "required": true, "schema": {"type": "string", "enum": ["root", "guest"]}});
    paths.insert(
        "/api/v1/users/{id}/roles/{role}".into(),
        json!({
            "put": operation(Op { tag: users, summary: "give a role (root)", auth: Auth::SignedIn, body: None, params: vec![path_id("id"), role.clone()], success: ok(None, "given") }),
            "delete": operation(Op { tag: users, summary: "take a role back (root)", auth: Auth::SignedIn, body: None, params: vec![path_id("id"), role], success: ok(None, "taken") }),
        }),
    );
    let tokens = "personal access tokens";
    paths.insert(
        "/api/v1/personal-access-tokens".into(),
        json!({
            "get": operation(Op { tag: tokens, summary: "list (own; root: all)", auth: Auth::SignedIn, body: None, params: paging(), success: paged(r("PersonalAccessToken")) }),
            "post": operation(Op { tag: tokens, summary: "create; the token is shown once", auth: Auth::SignedIn, body: Some(r("CreatePersonalAccessToken")), params: vec![], success: ok(Some(r("PersonalAccessToken")), "created") }),
        }),
    );
    paths.insert(
        "/api/v1/personal-access-tokens/{id}".into(),
        json!({
            "get": operation(Op { tag: tokens, summary: "get one", auth: Auth::SignedIn, body: None, params: vec![path_id("id")], success: ok(Some(r("PersonalAccessToken")), "found") }),
            "patch": operation(Op { tag: tokens, summary: "update", auth: Auth::SignedIn, body: Some(r("UpdatePersonalAccessToken")), params: vec![path_id("id")], success: ok(Some(r("PersonalAccessToken")), "updated") }),
            "delete": operation(Op { tag: tokens, summary: "revoke", auth: Auth::SignedIn, body: None, params: vec![path_id("id")], success: ok(None, "revoked") }),
        }),
    );
    for (prefix, auth) in [("/api/v1", Auth::SignedIn), ("/oapi/v1", Auth::Token)] {
        let mut list = paging();
        list.push(query(
            "state",
            json!({"type": "string", "enum": ["PENDING", "SUCCESS", "FAILURE"]}),
            "only jobs in this state",
        ));
        list.push(query("type", text(), "only jobs of this type"));
        paths.insert(
            format!("{prefix}/jobs"),
            json!({
                "get": operation(Op { tag: "jobs", summary: "list jobs", auth, body: None, params: list, success: paged(r("Job")) }),
                "post": operation(Op { tag: "jobs", summary: "create a job (preheat, get_task, delete_task); answered 200", auth, body: Some(r("CreateJob")), params: vec![], success: ok(Some(r("Job")), "created, PENDING") }),
            }),
        );
        paths.insert(
            format!("{prefix}/jobs/{{id}}"),
            json!({
                "get": operation(Op { tag: "jobs", summary: "a job: PENDING until it ends in SUCCESS or FAILURE", auth, body: None, params: vec![path_id("id")], success: ok(Some(r("Job")), "found") }),
                "patch": operation(Op { tag: "jobs", summary: "update a job's bio", auth, body: Some(r("UpdateJob")), params: vec![path_id("id")], success: ok(Some(r("Job")), "updated") }),
                "delete": operation(Op { tag: "jobs", summary: "delete a job", auth, body: None, params: vec![path_id("id")], success: ok(None, "deleted") }),
            }),
        );
    }
    paths.insert(
        "/oapi/v1/clusters".into(),
        json!({"get": operation(Op { tag: "scheduler clusters", summary: "the scheduler clusters (scope cluster)", auth: Auth::Token, body: None, params: paging(), success: paged(r("SchedulerCluster")) })}),
    );
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Dragonfly manager",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The control plane's REST API (/api/v1: sign-in tokens, roles root and guest) and open API (/oapi/v1: personal access tokens with scopes), as upstream's manager serves them.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "signIn": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "personalAccessToken": {"type": "http", "scheme": "bearer"},
                "accessTokenQuery": {"type": "apiKey", "in": "query", "name": "access_token"},
            },
            "schemas": schemas(),
        },
    })
}

/// Every (method, path) the document names, paths with `{...}` parameters as written.
pub fn operations(doc: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(paths) = doc["paths"].as_object() {
        for (path, item) in paths {
            if let Some(methods) = item.as_object() {
                for method in methods.keys() {
                    out.push((method.to_uppercase(), path.clone()));
                }
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reference_resolves() {
        let doc = document();
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for part in text.split("#/components/schemas/").skip(1) {
            let name: String = part.chars().take_while(|c| c.is_alphanumeric()).collect();
            assert!(
                schemas.contains_key(&name),
                "{name} is referenced but not defined"
            );
        }
        assert!(operations(&doc).len() > 50);
    }
}
