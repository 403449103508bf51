//! The admin API every service serves under `/admin`: its dead letters
//! (listed by consumer, status and failure group with cursor paging;
//! shown; redriven or discarded one, a list or a whole failure group),
//! its consumers with their lag (the progress of a rebuild), replay,
//! pause and resume,
//! and the audit trail of what operators did.
//!
//! Every route needs `Authorization: Bearer <token>`; without one, or with
//! a token the service does not know, the answer is 401 as problem+json.
//! Tokens are compared in constant time (their SHA-256 digests, so their
//! length does not show either) and never logged. Every action that
//! changes state is appended to the audit table (`tandem::audit`) in the
//! transaction that records it, under the name of the token used.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tandem::dead_letter::{self, Command, DeadLetter, Filter};
use tandem::Store;

use crate::builder::Reporter;
use crate::{page_limit, Problem, StrictJson, StrictQuery};

/// The shortest secret a token may have.
pub const MIN_SECRET_LEN: usize = 16;

/// One admin token: a name (what the audit trail records) and a secret
/// (kept only as its digest).
#[derive(Clone)]
struct Token {
    name: String,
    digest: [u8; 32],
}

/// The tokens a service accepts. Never printed: its `Debug` shows names
/// only.
#[derive(Clone, Default)]
pub struct AdminTokens(Arc<Vec<Token>>);

impl std::fmt::Debug for AdminTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|token| &token.name))
            .finish()
    }
}

/// Why a token specification was refused. The message never holds a
/// secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("admin token {position} is empty")]
    Empty { position: usize },
    #[error(
        "admin token {position} ({name}) is shorter than {MIN_SECRET_LEN} characters; use a long random secret"
    )]
    TooShort { position: usize, name: String },
    #[error("admin token {position} has an invalid name {name:?}: use letters, digits, - and _")]
    BadName { position: usize, name: String },
}

impl AdminTokens {
    /// No token: every admin route answers 401.
    pub fn none() -> Self {
        Self::default()
    }

    /// Parses `NAME:SECRET` entries separated by commas; an entry without
    /// a name is named `admin`. Secrets have at least [`MIN_SECRET_LEN`]
    /// characters.
    pub fn parse(spec: &str) -> Result<Self, TokenError> {
        let mut tokens = Vec::new();
        for (index, entry) in spec.split(',').enumerate() {
            let position = index + 1;
            let entry = entry.trim();
            if entry.is_empty() {
                return Err(TokenError::Empty { position });
            }
            let (name, secret) = match entry.split_once(':') {
                Some((name, secret)) => (name.trim(), secret.trim()),
                None => ("admin", entry),
            };
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(TokenError::BadName {
                    position,
                    name: name.chars().take(40).collect(),
                });
            }
            if secret.chars().count() < MIN_SECRET_LEN {
                return Err(TokenError::TooShort {
                    position,
                    name: name.to_owned(),
                });
            }
            tokens.push(Token {
                name: name.to_owned(),
                digest: Sha256::digest(secret.as_bytes()).into(),
            });
        }
        Ok(Self(Arc::new(tokens)))
    }

    /// Whether there is at least one token.
    pub fn is_configured(&self) -> bool {
        !self.0.is_empty()
    }

    /// The name of the token whose secret `presented` is, if any. Every
    /// token is compared, in constant time, whichever matches.
    pub fn name_of(&self, presented: &str) -> Option<String> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for token in self.0.iter() {
            if bool::from(token.digest.ct_eq(&digest)) {
                found = Some(token.name.clone());
            }
        }
        found
    }
}

/// Who is asking: the name of the token that authenticated the request.
#[derive(Debug, Clone)]
pub struct Actor(pub String);

/// A 401 problem naming the `Authorization` header, with the bearer
/// challenge.
pub fn unauthorized(detail: &str) -> Response {
    let mut response = Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
        .with_field("authorization")
        .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"tandem-admin\""),
    );
    response
}

impl AdminTokens {
    /// The name of the token in `headers`' `Authorization: Bearer`, or the
    /// 401 answer saying what is wrong (without echoing what was sent).
    pub fn check(&self, headers: &axum::http::HeaderMap) -> Result<String, &'static str> {
        if !self.is_configured() {
            return Err(
                "this service has no admin token; start it with --admin-token or TANDEM_ADMIN_TOKEN",
            );
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| {
                let (scheme, token) = value.split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then(|| token.trim().to_owned())
            })
            .ok_or("send Authorization: Bearer <admin token>")?;
        self.name_of(&presented)
            .ok_or("the admin token is not valid")
    }
}

async fn authenticate(
    State(tokens): State<AdminTokens>,
    mut request: Request,
    next: Next,
) -> Response {
    let name = match tokens.check(request.headers()) {
        Ok(name) => name,
        Err(detail) => {
            tracing::warn!(path = %request.uri().path(), detail, "admin request refused");
            return unauthorized(detail);
        }
    };
    request.extensions_mut().insert(Actor(name));
    next.run(request).await
}

struct AdminState<S: Store> {
    store: S,
    reporter: Reporter<S>,
}

impl<S: Store> Clone for AdminState<S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            reporter: self.reporter.clone(),
        }
    }
}

/// `router` with the admin routes, behind `tokens`.
pub(crate) fn with_admin<S: Store>(
    router: Router,
    store: S,
    reporter: Reporter<S>,
    tokens: AdminTokens,
) -> Router {
    let admin = Router::new()
        .route("/admin/dead-letters", get(list_dead_letters::<S>))
        .route("/admin/dead-letters/{id}", get(show_dead_letter::<S>))
        .route("/admin/dead-letters/redrive", post(redrive::<S>))
        .route("/admin/dead-letters/discard", post(discard::<S>))
        .route("/admin/failure-groups", get(failure_groups::<S>))
        .route("/admin/consumers", get(consumers::<S>))
        .route("/admin/consumers/{consumer}/replay", post(replay::<S>))
        .route("/admin/consumers/{consumer}/pause", post(pause::<S>))
        .route("/admin/consumers/{consumer}/resume", post(resume::<S>))
        .route("/admin/audit", get(audit::<S>))
        .with_state(AdminState { store, reporter })
        .route_layer(axum::middleware::from_fn_with_state(tokens, authenticate));
    router.merge(admin)
}

// ------------------------------------------------------------------ views

/// A dead letter as the admin API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterView {
    pub id: i64,
    pub consumer: String,
    pub topic: String,
    pub partition: i64,
    pub offset: i64,
    pub event_id: Option<String>,
    pub source: Option<String>,
    pub subject: Option<String>,
    pub sequence: Option<i64>,
    pub event_type: Option<String>,
    /// Why it was parked: decode, handler, gap, blocked or store.
    pub reason: String,
    pub error: String,
    pub attempts: i64,
    /// The failure group (see `/admin/failure-groups`).
    pub group: String,
    /// `parked`, `resolved` or `discarded`.
    pub status: String,
    /// RFC 3339.
    pub first_failed_at: String,
    /// RFC 3339.
    pub last_failed_at: String,
    /// The event as it came off the bus: JSON when it is JSON, else its
    /// bytes as (lossy) text. Only in a single letter's view.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub event: Option<serde_json::Value>,
}

fn rfc3339(micros: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .ok()
        .and_then(|at| {
            at.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

impl DeadLetterView {
    fn of(letter: DeadLetter, with_event: bool) -> Self {
        let group = dead_letter::failure_group(&letter);
        let event = with_event.then(|| {
            serde_json::from_slice(&letter.payload).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&letter.payload).into_owned())
            })
        });
        Self {
            id: letter.id,
            consumer: letter.consumer,
            topic: letter.topic,
            partition: letter.partition,
            offset: letter.offset,
            event_id: letter.event_id,
            source: letter.source,
            subject: letter.subject,
            sequence: letter.sequence,
            event_type: letter.event_type,
            reason: letter.reason,
            error: letter.error,
            attempts: letter.attempts,
            group,
            status: letter.status,
            first_failed_at: rfc3339(letter.first_failed_at_micros),
            last_failed_at: rfc3339(letter.last_failed_at_micros),
            event,
        }
    }
}

/// A page of dead letters; `nextCursor` asks for the next one.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterPage {
    pub items: Vec<DeadLetterView>,
    pub next_cursor: Option<String>,
}

/// The filter of a listing.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeadLetterQuery {
    /// Only this consumer's letters.
    pub consumer: Option<String>,
    /// `parked` (the default), `resolved`, `discarded` or `all`.
    pub status: Option<String>,
    /// Only this failure group's letters.
    pub group: Option<String>,
    /// The `nextCursor` of the page before.
    pub cursor: Option<String>,
    /// At most this many (1 to 500, default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

fn status_filter(status: Option<String>) -> Result<Option<String>, Problem> {
    match status.as_deref().unwrap_or("parked") {
        "all" => Ok(None),
        "parked" | "resolved" | "discarded" => Ok(Some(status.unwrap_or("parked".into()))),
        _ => Err(Problem::invalid(
            "status",
            "must be parked, resolved, discarded or all",
        )),
    }
}

fn cursor(cursor: Option<&str>) -> Result<Option<i64>, Problem> {
    cursor
        .map(|text| {
            text.parse::<i64>()
                .map_err(|_| Problem::invalid("cursor", "not a cursor this API gave"))
        })
        .transpose()
}

fn store_problem(error: tandem::StoreError) -> Problem {
    Problem::from_store(error, "service database")
}

#[utoipa::path(get, path = "/admin/dead-letters", tag = "admin",
    params(DeadLetterQuery),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "a page of dead letters, oldest first", body = DeadLetterPage),
        (status = 401, description = "no admin token, or an unknown one", body = Problem),
        (status = 422, description = "a filter is invalid", body = Problem),
    ))]
async fn list_dead_letters<S: Store>(
    State(state): State<AdminState<S>>,
    StrictQuery(query): StrictQuery<DeadLetterQuery>,
) -> Result<Json<DeadLetterPage>, Problem> {
    let limit = page_limit(query.limit, 100)? as usize;
    let filter = Filter {
        consumer: query.consumer,
        status: status_filter(query.status)?,
        group: query.group,
    };
    let after = cursor(query.cursor.as_deref())?;
    let letters = dead_letter::page(&state.store, filter, after, limit + 1)
        .await
        .map_err(store_problem)?;
    let more = letters.len() > limit;
    let items: Vec<DeadLetterView> = letters
        .into_iter()
        .take(limit)
        .map(|letter| DeadLetterView::of(letter, false))
        .collect();
    let next_cursor = if more {
        items.last().map(|last| last.id.to_string())
    } else {
        None
    };
    Ok(Json(DeadLetterPage { items, next_cursor }))
}

#[utoipa::path(get, path = "/admin/dead-letters/{id}", tag = "admin",
    params(("id" = i64, Path, description = "the dead letter's id")),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "the dead letter with its event", body = DeadLetterView),
        (status = 401, description = "no admin token, or an unknown one", body = Problem),
        (status = 404, description = "no such dead letter", body = Problem),
        (status = 422, description = "the id is not a number", body = Problem),
    ))]
async fn show_dead_letter<S: Store>(
    State(state): State<AdminState<S>>,
    Path(id): Path<String>,
) -> Result<Json<DeadLetterView>, Problem> {
    let id: i64 = id
        .parse()
        .map_err(|_| Problem::invalid("id", "a dead letter's id is a number"))?;
    let letter = dead_letter::get(&state.store, id)
        .await
        .map_err(store_problem)?
        .ok_or_else(|| Problem::not_found(format!("no dead letter {id}")))?;
    Ok(Json(DeadLetterView::of(letter, true)))
}

/// What a bulk action takes: a list of ids, or a failure group, or every
/// parked letter of a consumer. Exactly one of them.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selection {
    /// These dead letters.
    pub ids: Option<Vec<i64>>,
    /// Every parked letter of this failure group.
    pub group: Option<String>,
    /// Every parked letter of this consumer.
    pub consumer: Option<String>,
}

/// What a bulk action asked for.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Requested {
    /// The parked letters the consumers were asked to act on; the rest of
    /// a list was not parked (any more).
    pub requested: Vec<i64>,
}

/// Longest list one bulk action takes.
const MAX_SELECTION: usize = 100_000;

async fn bulk<S: Store>(
    state: AdminState<S>,
    actor: Actor,
    selection: Selection,
    command: Command,
    action: &'static str,
) -> Result<Json<Requested>, Problem> {
    let (filter, ids, target) = match selection {
        Selection {
            ids: Some(ids),
            group: None,
            consumer: None,
        } => {
            if ids.is_empty() || ids.len() > MAX_SELECTION {
                return Err(Problem::invalid(
                    "ids",
                    format!("give 1 to {MAX_SELECTION} ids"),
                ));
            }
            let target = format!("ids {}", describe_ids(&ids));
            (None, ids, target)
        }
        Selection {
            ids: None,
            group: Some(group),
            consumer,
        } => {
            let target = match &consumer {
                Some(consumer) => format!("group {group} of {consumer}"),
                None => format!("group {group}"),
            };
            let filter = Filter {
                consumer,
                status: Some("parked".into()),
                group: Some(group),
            };
            (Some(filter), Vec::new(), target)
        }
        Selection {
            ids: None,
            group: None,
            consumer: Some(consumer),
        } => {
            let target = format!("every parked letter of {consumer}");
            let filter = Filter {
                consumer: Some(consumer),
                status: Some("parked".into()),
                group: None,
            };
            (Some(filter), Vec::new(), target)
        }
        _ => {
            return Err(Problem::invalid(
                "body",
                "give exactly one of ids, group (optionally with consumer) or consumer",
            ))
        }
    };
    let requested = state
        .store
        .write(move |tx| {
            let ids = match &filter {
                Some(filter) => dead_letter::ids_in(tx, filter, MAX_SELECTION)?,
                None => ids,
            };
            let requested = dead_letter::request_in(tx, &ids, command)?;
            tandem::audit::record(
                tx,
                &actor.0,
                action,
                &target,
                &format!("ok: {} requested", requested.len()),
            )?;
            Ok(requested)
        })
        .await
        .map_err(store_problem)?;
    Ok(Json(Requested { requested }))
}

/// A list of ids for the audit trail: all of a short one, the count and
/// ends of a long one.
fn describe_ids(ids: &[i64]) -> String {
    if ids.len() <= 20 {
        ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
    } else {
        format!("{},…,{} ({} ids)", ids[0], ids[ids.len() - 1], ids.len())
    }
}

#[utoipa::path(post, path = "/admin/dead-letters/redrive", tag = "admin",
    request_body = Selection,
    security(("admin_token" = [])),
    responses(
        (status = 202, description = "the consumers were asked to handle these letters again", body = Requested),
        (status = 401, description = "no admin token, or an unknown one", body = Problem),
        (status = 422, description = "the selection is invalid", body = Problem),
    ))]
async fn redrive<S: Store>(
    State(state): State<AdminState<S>>,
    Extension(actor): Extension<Actor>,
    StrictJson(selection): StrictJson<Selection>,
) -> Result<(StatusCode, Json<Requested>), Problem> {
    let requested = bulk(
        state,
        actor,
        selection,
        Command::Redrive(None),
        "dead-letters.redrive",
    )
    .await?;
    Ok((StatusCode::ACCEPTED, requested))
}

#[utoipa::path(post, path = "/admin/dead-letters/discard", tag = "admin",
    request_body = Selection,
    security(("admin_token" = [])),
    responses(
        (status = 202, description = "the consumers were asked to give up on these letters", body = Requested),
        (status = 401, description = "no admin token, or an unknown one", body = Problem),
        (status = 422, description = "the selection is invalid", body = Problem),
    ))]
async fn discard<S: Store>(
    State(state): State<AdminState<S>>,
    Extension(actor): Extension<Actor>,
    StrictJson(selection): StrictJson<Selection>,
) -> Result<(StatusCode, Json<Requested>), Problem> {
    let requested = bulk(
        state,
        actor,
        selection,
        Command::Discard(None),
        "dead-letters.discard",
    )
    .await?;
    Ok((StatusCode::ACCEPTED, requested))
}

/// The filter of the failure groups.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct GroupQuery {
    /// Only this consumer's groups.
    pub consumer: Option<String>,
    /// `parked` (the default), `resolved`, `discarded` or `all`.
    pub status: Option<String>,
}

/// A failure group.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailureGroupView {
    pub group: String,
    pub consumer: String,
    pub event_type: Option<String>,
    pub reason: String,
    /// The error with its ids and numbers masked.
    pub error: String,
    pub count: u64,
    /// RFC 3339.
    pub first_seen: String,
    /// RFC 3339.
    pub last_seen: String,
}

#[utoipa::path(get, path = "/admin/failure-groups", tag = "admin",
    params(GroupQuery),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "the failure groups, largest first", body = Vec<FailureGroupView>),
        (status = 401, description = "no admin token, or an unknown one", body = Problem),
        (status = 422, description = "a filter is invalid", body = Problem),
    ))]
async fn failure_groups<S: Store>(
    State(state): State<AdminState<S>>,
    StrictQuery(query): StrictQuery<GroupQuery>,
) -> Result<Json<Vec<FailureGroupView>>, Problem> {
    let filter = Filter {
        consumer: query.consumer,
        status: status_filter(query.status)?,
        group: None,
    };
    let groups = dead_letter::groups(&state.store, filter)
        .await
        .map_err(store_problem)?;
    Ok(Json(
        groups
            .into_iter()
            .map(|group| FailureGroupView {
                group: group.group,
                consumer: group.consumer,
                event_type: group.event_type,
                reason: group.reason,
                error: group.error,
                count: group.count,
                first_seen: rfc3339(group.first_seen_micros),
                last_seen: rfc3339(group.last_seen_micros),
            })
            .collect(),
    ))
}

#[utoipa::path(get, path = "/admin/consumers", tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "the service's report: each consumer's health, lag (a rebuild's progress) and dead letters", body = Object),
        (status = 401, description = "no admin token, or an unknown one", body = Problem),
    ))]
async fn consumers<S: Store>(State(state): State<AdminState<S>>) -> Response {
    match state.reporter.report().await {
        Ok(report) => Json(report).into_response(),
        Err(error) => {
            tracing::warn!(%error, "cannot read the service's status");
            Problem::unavailable("the service's status cannot be read now").into_response()
        }
    }
}

#[utoipa::path(post, path = "/admin/consumers/{consumer}/replay", tag = "admin",
    params(("consumer" = String, Path, description = "the consumer's name")),
    security(("admin_token" = [])),
    responses(
        (status = 202, description = "the consumer was asked to rebuild its read model from the start of the log; follow its lag at /admin/consumers"),
        (status = 401, description = "no admin token, or an unknown one", body = Problem),
        (status = 404, description = "no such consumer here", body = Problem),
    ))]
async fn replay<S: Store>(
    State(state): State<AdminState<S>>,
    Extension(actor): Extension<Actor>,
    Path(consumer): Path<String>,
) -> Result<StatusCode, Problem> {
    let outcome = state
        .store
        .write(move |tx| {
            let result = dead_letter::request_replay_in(tx, &consumer);
            let note = match &result {
                Ok(()) => "ok: replay requested".to_owned(),
                Err(error) => format!("refused: {error}"),
            };
            tandem::audit::record(tx, &actor.0, "consumer.replay", &consumer, &note)?;
            Ok(result)
        })
        .await
        .map_err(store_problem)?;
    match outcome {
        Ok(()) => Ok(StatusCode::ACCEPTED),
        Err(error @ dead_letter::RequestError::UnknownConsumer { .. }) => {
            Err(Problem::not_found(error.to_string()).with_field("consumer"))
        }
        Err(dead_letter::RequestError::Store(error)) => Err(store_problem(error)),
    }
}

/// Whether a pause or resume changed anything.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PauseState {
    pub consumer: String,
    pub paused: bool,
    /// `false` when it already was in that state.
    pub changed: bool,
}

async fn set_paused<S: Store>(
    state: AdminState<S>,
    actor: Actor,
    consumer: String,
    pause: bool,
) -> Result<Json<PauseState>, Problem> {
    let known = state.reporter.consumers().contains(&consumer);
    let action = if pause {
        "consumer.pause"
    } else {
        "consumer.resume"
    };
    let target = consumer.clone();
    let changed = state
        .store
        .write(move |tx| {
            if !known {
                tandem::audit::record(
                    tx,
                    &actor.0,
                    action,
                    &target,
                    "refused: no such consumer in this service",
                )?;
                return Ok(None);
            }
            let changed = if pause {
                tandem::consumer::pauses::pause_in(tx, &target, &actor.0)?
            } else {
                tandem::consumer::pauses::resume_in(tx, &target)?
            };
            let note = match (pause, changed) {
                (true, true) => "ok: paused",
                (true, false) => "ok: was paused already",
                (false, true) => "ok: resumed",
                (false, false) => "ok: was not paused",
            };
            tandem::audit::record(tx, &actor.0, action, &target, note)?;
            Ok(Some(changed))
        })
        .await
        .map_err(store_problem)?;
    match changed {
        Some(changed) => Ok(Json(PauseState {
            consumer,
            paused: pause,
            changed,
        })),
        None => Err(
            Problem::not_found(format!("no consumer {consumer} in this service"))
                .with_field("consumer"),
        ),
    }
}

#[utoipa::path(post, path = "/admin/consumers/{consumer}/pause", tag = "admin",
    params(("consumer" = String, Path, description = "the consumer's name")),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "the consumer is paused: every instance leaves its group and applies nothing until resumed; its lag grows", body = PauseState),
        (status = 401, description = "no admin token, or an unknown one", body = Problem),
        (status = 404, description = "no such consumer in this service", body = Problem),
    ))]
async fn pause<S: Store>(
    State(state): State<AdminState<S>>,
    Extension(actor): Extension<Actor>,
    Path(consumer): Path<String>,
) -> Result<Json<PauseState>, Problem> {
    set_paused(state, actor, consumer, true).await
}

#[utoipa::path(post, path = "/admin/consumers/{consumer}/resume", tag = "admin",
    params(("consumer" = String, Path, description = "the consumer's name")),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "the consumer applies again, from where it stopped", body = PauseState),
        (status = 401, description = "no admin token, or an unknown one", body = Problem),
        (status = 404, description = "no such consumer in this service", body = Problem),
    ))]
async fn resume<S: Store>(
    State(state): State<AdminState<S>>,
    Extension(actor): Extension<Actor>,
    Path(consumer): Path<String>,
) -> Result<Json<PauseState>, Problem> {
    set_paused(state, actor, consumer, false).await
}

/// A page of the audit trail.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// The `nextCursor` of the page before.
    pub cursor: Option<String>,
    /// At most this many (1 to 500, default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

/// One recorded action.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditView {
    pub id: i64,
    /// RFC 3339.
    pub at: String,
    /// The name of the token used.
    pub actor: String,
    pub action: String,
    pub target: String,
    pub result: String,
}

/// A page of the audit trail, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditPage {
    pub items: Vec<AuditView>,
    pub next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/admin/audit", tag = "admin",
    params(AuditQuery),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "the audit trail, newest first", body = AuditPage),
        (status = 401, description = "no admin token, or an unknown one", body = Problem),
    ))]
async fn audit<S: Store>(
    State(state): State<AdminState<S>>,
    StrictQuery(query): StrictQuery<AuditQuery>,
) -> Result<Json<AuditPage>, Problem> {
    let limit = page_limit(query.limit, 100)?;
    let before = cursor(query.cursor.as_deref())?;
    let entries = tandem::audit::list(&state.store, before, limit + 1)
        .await
        .map_err(store_problem)?;
    let more = entries.len() > limit as usize;
    let items: Vec<AuditView> = entries
        .into_iter()
        .take(limit as usize)
        .map(|entry| AuditView {
            id: entry.id,
            at: rfc3339(entry.at_micros),
            actor: entry.actor,
            action: entry.action,
            target: entry.target,
            result: entry.result,
        })
        .collect();
    let next_cursor = if more {
        items.last().map(|last| last.id.to_string())
    } else {
        None
    };
    Ok(Json(AuditPage { items, next_cursor }))
}

/// The admin routes' part of a service's OpenAPI document, with the
/// bearer security scheme; merged into each service's `/openapi.json`
/// by [`crate::openapi::document`].
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        list_dead_letters,
        show_dead_letter,
        redrive,
        discard,
        failure_groups,
        consumers,
        replay,
        pause,
        resume,
        audit
    ),
    components(schemas(
        DeadLetterView,
        DeadLetterPage,
        Selection,
        Requested,
        PauseState,
        FailureGroupView,
        AuditView,
        AuditPage,
        Problem
    )),
    modifiers(&BearerScheme)
)]
pub struct AdminApi;

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An admin token: `tandem up` prints it (and keeps it in the data directory); `tandem serve` takes --admin-token or TANDEM_ADMIN_TOKEN.",
                    ))
                    .build(),
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_with_and_without_names_and_never_show_their_secrets() {
        let tokens = AdminTokens::parse("ops:0123456789abcdef0123,fedcba9876543210fedc").unwrap();
        assert_eq!(
            tokens.name_of("0123456789abcdef0123").as_deref(),
            Some("ops")
        );
        assert_eq!(
            tokens.name_of("fedcba9876543210fedc").as_deref(),
            Some("admin")
        );
        assert_eq!(tokens.name_of("0123456789abcdef012"), None);
        assert_eq!(tokens.name_of(""), None);
        let shown = format!("{tokens:?}");
        assert!(!shown.contains("0123456789"), "{shown}");
        assert_eq!(
            AdminTokens::parse("ops:short").unwrap_err(),
            TokenError::TooShort {
                position: 1,
                name: "ops".into()
            }
        );
        let error = AdminTokens::parse("a b:0123456789abcdef0123").unwrap_err();
        assert!(!error.to_string().contains("0123456789"), "{error}");
        assert!(AdminTokens::parse("x:0123456789abcdef,").is_err());
    }
}
