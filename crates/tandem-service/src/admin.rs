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
use crate::openapi::schema;
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
    /// An entry of the list is empty (two commas in a row, or a trailing
    /// one).
    #[error("admin token {position} is empty")]
    Empty {
        /// The entry's place in the list, from 1.
        position: usize,
    },
    /// The secret has fewer than [`MIN_SECRET_LEN`] characters.
    #[error(
        "admin token {position} ({name}) is shorter than {MIN_SECRET_LEN} characters; use a long random secret"
    )]
    TooShort {
        /// The entry's place in the list, from 1.
        position: usize,
        /// The token's name (never its secret).
        name: String,
    },
    /// The name is empty or holds something other than ASCII letters,
    /// digits, `-` and `_`.
    #[error("admin token {position} has an invalid name {name:?}: use letters, digits, - and _")]
    BadName {
        /// The entry's place in the list, from 1.
        position: usize,
        /// The name as given, cut to its first 40 characters.
        name: String,
    },
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
    republisher: Arc<Republisher>,
    /// The consumers whose read model can be rebuilt side by side.
    rebuildable: Arc<Vec<String>>,
}

impl<S: Store> Clone for AdminState<S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            reporter: self.reporter.clone(),
            republisher: Arc::clone(&self.republisher),
            rebuildable: Arc::clone(&self.rebuildable),
        }
    }
}

/// What `POST /admin/republish` sends: the service's topics, and whether
/// from its kept history or by snapshot.
pub(crate) struct Republisher {
    pub(crate) topics: Vec<String>,
    pub(crate) keeps_history: bool,
    pub(crate) snapshots: Option<Arc<dyn tandem::republish::Snapshots>>,
}

/// `router` with the admin routes, behind `tokens`.
pub(crate) fn with_admin<S: Store>(
    router: Router,
    store: S,
    reporter: Reporter<S>,
    republisher: Republisher,
    rebuildable: Vec<String>,
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
        .route(
            "/admin/consumers/{consumer}/rebuild",
            post(rebuild::<S>)
                .get(show_rebuild::<S>)
                .delete(cancel_rebuild::<S>),
        )
        .route("/admin/consumers/{consumer}/pause", post(pause::<S>))
        .route("/admin/consumers/{consumer}/resume", post(resume::<S>))
        .route(
            "/admin/consumers/{consumer}/skip-pruned",
            post(skip_pruned::<S>),
        )
        .route("/admin/republish", post(republish::<S>))
        .route("/admin/audit", get(audit::<S>))
        .with_state(AdminState {
            store,
            reporter,
            republisher: Arc::new(republisher),
            rebuildable: Arc::new(rebuildable),
        })
        .route_layer(axum::middleware::from_fn_with_state(tokens, authenticate));
    router.merge(admin)
}

// ------------------------------------------------------------------ views

/// A dead letter as the admin API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterView {
    /// The dead letter's id, for `/admin/dead-letters/{id}` and the
    /// `ids` of a bulk action.
    pub id: i64,
    /// The consumer that could not apply the event.
    pub consumer: String,
    /// The topic the event was read from.
    pub topic: String,
    /// The partition of the topic it was read from.
    pub partition: i64,
    /// Its offset in that partition.
    pub offset: i64,
    /// The event's CloudEvents `id`; null when it did not decode.
    pub event_id: Option<String>,
    /// The publishing service (the CloudEvents `source`); null when the
    /// event did not decode.
    pub source: Option<String>,
    /// The aggregate id (the CloudEvents `subject`); null when the event
    /// did not decode.
    pub subject: Option<String>,
    /// The event's place in its aggregate's history, from 1; null when it
    /// did not decode.
    pub sequence: Option<i64>,
    /// The event's type, such as `OrderPlaced`; null when it did not
    /// decode.
    pub event_type: Option<String>,
    /// Why it was parked: decode, handler, gap, blocked or store.
    pub reason: String,
    /// The latest failure's error, as the decoder, the handler or the
    /// store gave it.
    pub error: String,
    /// How many times applying the event was tried and failed.
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
    #[schema(value_type = Option<Value>)]
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
    /// The letters of this page, oldest first, without their events.
    pub items: Vec<DeadLetterView>,
    /// The `cursor` that asks for the next page; null on the last one.
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
    #[param(schema_with = status_schema)]
    pub status: Option<String>,
    /// Only this failure group's letters.
    pub group: Option<String>,
    /// The `nextCursor` of the page before.
    #[param(min_length = 1, max_length = 18, pattern = "^[0-9]{1,18}$")]
    pub cursor: Option<String>,
    /// At most this many (1 to 500, default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

/// The values of a `status` filter.
const STATUSES: [&str; 4] = ["parked", "resolved", "discarded", "all"];

fn status_schema() -> utoipa::openapi::schema::Object {
    schema::described(
        schema::one_of_strings(&STATUSES),
        "`parked` (the default), `resolved`, `discarded` or `all`.",
    )
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

/// A cursor this API gives: an id, 1 to 18 decimal digits (the
/// document's pattern for it says the same).
fn cursor(cursor: Option<&str>) -> Result<Option<i64>, Problem> {
    cursor
        .map(|text| {
            let digits = (1..=18).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit());
            digits
                .then(|| text.parse::<i64>().ok())
                .flatten()
                .ok_or_else(|| Problem::invalid("cursor", "not a cursor this API gave"))
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
/// parked letter of a consumer. Exactly one of them (see its schema).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selection {
    /// These dead letters.
    #[serde(default, deserialize_with = "crate::json_integer::option_vec")]
    pub ids: Option<Vec<i64>>,
    /// Every parked letter of this failure group.
    pub group: Option<String>,
    /// Every parked letter of this consumer.
    pub consumer: Option<String>,
}

impl utoipa::ToSchema for Selection {}

impl utoipa::PartialSchema for Selection {
    /// The three shapes a bulk redrive or discard takes, one of them
    /// exactly; a field left out may also be given as `null`.
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{
            AdditionalProperties, ArrayBuilder, ObjectBuilder, OneOfBuilder, Type,
        };
        let absent = || ObjectBuilder::new().schema_type(Type::Null).build();
        let ids = ArrayBuilder::new()
            .items(schema::integer(1, MAX_ID))
            .min_items(Some(1))
            .max_items(Some(MAX_SELECTION))
            .description(Some("These dead letters."))
            .build();
        let group = schema::described(
            ObjectBuilder::new().schema_type(Type::String).build(),
            "Every parked letter of this failure group.",
        );
        let consumer = |description: &str| {
            schema::described(
                ObjectBuilder::new().schema_type(Type::String).build(),
                description,
            )
        };
        let shape = || {
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .additional_properties(Some(
                    AdditionalProperties::<utoipa::openapi::schema::Schema>::FreeForm(false),
                ))
        };
        OneOfBuilder::new()
            .item(
                shape()
                    .title(Some("ids"))
                    .property("ids", ids)
                    .property("group", absent())
                    .property("consumer", absent())
                    .required("ids"),
            )
            .item(
                shape()
                    .title(Some("group"))
                    .property("ids", absent())
                    .property("group", group)
                    .property(
                        "consumer",
                        schema::nullable(consumer("Only this consumer's letters of the group.")),
                    )
                    .required("group"),
            )
            .item(
                shape()
                    .title(Some("consumer"))
                    .property("ids", absent())
                    .property("group", absent())
                    .property("consumer", consumer("Every parked letter of this consumer."))
                    .required("consumer"),
            )
            .description(Some(
                "Exactly one of: ids (1 to 100000 of them); group, optionally with consumer; consumer.",
            ))
            .into()
    }
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

/// The largest dead letter id a selection names: ids are positive, and
/// exact in any JSON reader (2^53 - 1).
const MAX_ID: i64 = crate::json_integer::MAX_EXACT;

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
            if let Some(index) = ids.iter().position(|id| !(1..=MAX_ID).contains(id)) {
                return Err(Problem::invalid(
                    format!("ids[{index}]"),
                    format!("a dead letter's id is from 1 to {MAX_ID}"),
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
    #[param(schema_with = status_schema)]
    pub status: Option<String>,
}

/// A failure group.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailureGroupView {
    /// The group's fingerprint (16 hex digits), for the `group` filter
    /// and bulk actions; stable across restarts and versions.
    pub group: String,
    /// The consumer whose letters these are (a group has one).
    pub consumer: String,
    /// The type of the events in the group; null when they did not
    /// decode.
    pub event_type: Option<String>,
    /// Why they were parked: decode, handler, gap, blocked or store.
    pub reason: String,
    /// The error with its ids and numbers masked.
    pub error: String,
    /// How many of the group's letters have the status asked for.
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

/// A side-by-side rebuild of a consumer's read model.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebuildView {
    /// The live consumer whose read model is rebuilt.
    pub consumer: String,
    /// Tells this rebuild's tables and consumer apart.
    pub number: i64,
    /// `building`, `cancelling`, `cancelled`, `failed` or `switched`.
    pub state: String,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339, once it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Records the new version has consumed (while building).
    pub events_applied: u64,
    /// Records it has yet to consume (while building).
    pub events_to_go: u64,
    /// Seconds to go at the rate so far (while building).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl RebuildView {
    fn of(consumer: &str, report: tandem::rebuild::RebuildReport) -> Self {
        Self {
            consumer: consumer.to_owned(),
            number: report.number,
            state: report.state.as_str().to_owned(),
            started_at: rfc3339(report.started_at_micros),
            finished_at: report.finished_at_micros.map(rfc3339),
            events_applied: report.events_applied,
            events_to_go: report.events_to_go,
            eta_seconds: report.eta_seconds,
            error: report.error,
        }
    }
}

/// The options of a rebuild (`POST /admin/consumers/{consumer}/rebuild`).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RebuildQuery {
    /// `log-start`: begin at the first record the log still holds rather
    /// than at offset 0, for a log pruned by retention, after the source
    /// re-published snapshots (the switch waits until every aggregate the
    /// live version has is as new in the new one).
    #[param(schema_with = from_schema)]
    pub from: Option<String>,
}

fn from_schema() -> utoipa::openapi::schema::Object {
    schema::described(
        schema::one_of_strings(&["log-start"]),
        "`log-start`: begin at the first record the log still holds rather than at offset 0, \
         for a log pruned by retention, after the source re-published snapshots (the switch \
         waits until every aggregate the live version has is as new in the new one). \
         Leave it out for offset 0.",
    )
}

/// The consumer's topics, or 404; 409 when its model cannot be rebuilt.
fn rebuildable<S: Store>(state: &AdminState<S>, consumer: &str) -> Result<Vec<String>, Problem> {
    let Some(topics) = state.reporter.topics_of(consumer) else {
        return Err(
            Problem::not_found(format!("no consumer {consumer} in this service"))
                .with_field("consumer"),
        );
    };
    if !state.rebuildable.iter().any(|name| name == consumer) {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "not-a-read-model",
            format!(
                "consumer {consumer} keeps no read model that can be rebuilt side by side: \
                 its handler's effects are the service's own state or events it publishes, \
                 which a rebuild must not decide again (replay rebuilds in place)"
            ),
        )
        .with_field("consumer"));
    }
    Ok(topics)
}

async fn rebuild_view<S: Store>(
    state: &AdminState<S>,
    consumer: &str,
    topics: &[String],
) -> Result<Option<RebuildView>, Problem> {
    let bus = Arc::clone(state.reporter.bus());
    let report = tandem::rebuild::report(&state.store, bus.as_ref(), consumer, topics)
        .await
        .map_err(|error| match error {
            tandem::status::StatusError::Store(error) => store_problem(error),
            tandem::status::StatusError::Bus(error) => {
                Problem::unavailable(format!("the bus cannot be read now: {error}"))
            }
        })?;
    Ok(report.map(|report| RebuildView::of(consumer, report)))
}

#[utoipa::path(post, path = "/admin/consumers/{consumer}/rebuild", tag = "admin",
    params(("consumer" = String, Path, description = "the consumer's name"), RebuildQuery),
    security(("admin_token" = [])),
    responses(
        (status = 202, description = "the rebuild started: the new version fills beside the live one, which keeps answering, and replaces it in one transaction once level; follow it here with GET or in /status", body = RebuildView),
        (status = 401, description = "no admin token, or an unknown one", body = Problem),
        (status = 404, description = "no such consumer in this service", body = Problem),
        (status = 409, description = "the consumer is not a read model (not-a-read-model), or a rebuild of it is under way (rebuild-running)", body = Problem),
        (status = 422, description = "from is not log-start", body = Problem),
    ))]
async fn rebuild<S: Store>(
    State(state): State<AdminState<S>>,
    Extension(actor): Extension<Actor>,
    Path(consumer): Path<String>,
    StrictQuery(query): StrictQuery<RebuildQuery>,
) -> Result<(StatusCode, Json<RebuildView>), Problem> {
    let from_log_start = match query.from.as_deref() {
        None => false,
        Some("log-start") => true,
        Some(other) => {
            return Err(Problem::invalid(
                "from",
                format!("from {other:?}: log-start, or leave it out for offset 0"),
            ))
        }
    };
    let topics = rebuildable(&state, &consumer)?;
    let target = consumer.clone();
    let outcome = state
        .store
        .write(move |tx| {
            let result = tandem::rebuild::request(tx, &target, from_log_start, &actor.0);
            let note = match &result {
                Ok(rebuild) => format!("ok: rebuild {} requested", rebuild.number),
                Err(error) => format!("refused: {error}"),
            };
            tandem::audit::record(tx, &actor.0, "consumer.rebuild", &target, &note)?;
            Ok(result)
        })
        .await
        .map_err(store_problem)?;
    match outcome {
        Ok(_) => {}
        Err(error @ tandem::rebuild::RebuildError::Running { .. }) => {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                "rebuild-running",
                error.to_string(),
            ))
        }
        Err(tandem::rebuild::RebuildError::Store(error)) => return Err(store_problem(error)),
        Err(error) => return Err(Problem::conflict(error.to_string())),
    }
    let view = rebuild_view(&state, &consumer, &topics)
        .await?
        .ok_or_else(|| Problem::unavailable("the rebuild just asked for is not on record"))?;
    Ok((StatusCode::ACCEPTED, Json(view)))
}

#[utoipa::path(get, path = "/admin/consumers/{consumer}/rebuild", tag = "admin",
    params(("consumer" = String, Path, description = "the consumer's name")),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "the consumer's newest rebuild: under way with its progress, or how it ended", body = RebuildView),
        (status = 401, description = "no admin token, or an unknown one", body = Problem),
        (status = 404, description = "no such consumer, or it was never rebuilt", body = Problem),
        (status = 409, description = "the consumer is not a read model", body = Problem),
    ))]
async fn show_rebuild<S: Store>(
    State(state): State<AdminState<S>>,
    Path(consumer): Path<String>,
) -> Result<Json<RebuildView>, Problem> {
    let topics = rebuildable(&state, &consumer)?;
    rebuild_view(&state, &consumer, &topics)
        .await?
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("consumer {consumer} was never rebuilt")))
}

#[utoipa::path(delete, path = "/admin/consumers/{consumer}/rebuild", tag = "admin",
    params(("consumer" = String, Path, description = "the consumer's name")),
    security(("admin_token" = [])),
    responses(
        (status = 202, description = "the rebuild under way is cancelled: the service drops the new version; the live one is untouched", body = RebuildView),
        (status = 401, description = "no admin token, or an unknown one", body = Problem),
        (status = 404, description = "no such consumer, or no rebuild of it under way", body = Problem),
        (status = 409, description = "the consumer is not a read model", body = Problem),
    ))]
async fn cancel_rebuild<S: Store>(
    State(state): State<AdminState<S>>,
    Extension(actor): Extension<Actor>,
    Path(consumer): Path<String>,
) -> Result<(StatusCode, Json<RebuildView>), Problem> {
    let topics = rebuildable(&state, &consumer)?;
    let target = consumer.clone();
    let outcome = state
        .store
        .write(move |tx| {
            let result = tandem::rebuild::cancel(tx, &target);
            let note = match &result {
                Ok(rebuild) => format!("ok: rebuild {} cancelled", rebuild.number),
                Err(error) => format!("refused: {error}"),
            };
            tandem::audit::record(tx, &actor.0, "consumer.rebuild.cancel", &target, &note)?;
            Ok(result)
        })
        .await
        .map_err(store_problem)?;
    match outcome {
        Ok(_) => {}
        Err(tandem::rebuild::RebuildError::Store(error)) => return Err(store_problem(error)),
        Err(error) => return Err(Problem::not_found(error.to_string())),
    }
    let view = rebuild_view(&state, &consumer, &topics)
        .await?
        .ok_or_else(|| Problem::unavailable("the rebuild is not on record"))?;
    Ok((StatusCode::ACCEPTED, Json(view)))
}

/// What a re-publication sent.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RepublishView {
    /// `history` (the kept outbox, sent again) or `snapshots` (one
    /// snapshot event per aggregate, at its current sequence).
    pub mode: String,
    /// The service's topics, on which the records were sent.
    pub topics: Vec<String>,
    /// Records sent.
    pub sent: u64,
}

/// The options of a re-publication (`POST /admin/republish`).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RepublishQuery {
    /// `history` or `snapshots`; by default the kept history when the
    /// service keeps one, else snapshots.
    #[param(schema_with = mode_schema)]
    pub mode: Option<String>,
}

fn mode_schema() -> utoipa::openapi::schema::Object {
    schema::described(
        schema::one_of_strings(&["history", "snapshots"]),
        "`history` or `snapshots`; by default the kept history when the service keeps one, \
         else snapshots.",
    )
}

#[utoipa::path(post, path = "/admin/republish", tag = "admin",
    params(RepublishQuery),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "the service re-published: its kept event history if it keeps one, else a snapshot event of every aggregate at its current sequence. Consumers drop what they applied already and apply what is newer; nothing moves backwards and no side effect fires twice", body = RepublishView),
        (status = 401, description = "no admin token, or an unknown one", body = Problem),
        (status = 409, description = "the service publishes nothing, or describes no snapshots", body = Problem),
        (status = 422, description = "mode is neither history nor snapshots", body = Problem),
        (status = 503, description = "the bus or the database is unavailable; what was sent stays sent, and running it again is safe", body = Problem),
    ))]
async fn republish<S: Store>(
    State(state): State<AdminState<S>>,
    Extension(actor): Extension<Actor>,
    StrictQuery(query): StrictQuery<RepublishQuery>,
) -> Result<Json<RepublishView>, Problem> {
    let republisher = Arc::clone(&state.republisher);
    let bus = Arc::clone(state.reporter.bus());
    let topics = republisher.topics.clone();
    let history = match query.mode.as_deref() {
        None => republisher.keeps_history,
        Some("history") => true,
        Some("snapshots") => false,
        Some(other) => {
            return Err(Problem::invalid(
                "mode",
                format!("mode {other:?}: history or snapshots"),
            ))
        }
    };
    let (mode, result) = if topics.is_empty() {
        ("none", None)
    } else if history {
        let sent =
            tandem::republish::history(&state.store, bus.as_ref(), &topics, 1000, |_| {}).await;
        ("history", Some(sent))
    } else if let Some(provider) = republisher.snapshots.clone() {
        let sent =
            tandem::republish::snapshots(&state.store, bus.as_ref(), provider, 500, |_| {}).await;
        ("snapshots", Some(sent))
    } else {
        ("none", None)
    };
    let note = match &result {
        None => "refused: nothing to re-publish from".to_owned(),
        Some(Ok(sent)) => format!("ok: {sent} record(s) by {mode}"),
        Some(Err(error)) => format!("failed: {error}"),
    };
    let target = topics.join(",");
    let audited = state
        .store
        .write(move |tx| tandem::audit::record(tx, &actor.0, "service.republish", &target, &note))
        .await;
    if let Err(error) = audited {
        tracing::warn!(%error, "the re-publication could not be audited");
    }
    match result {
        None => Err(Problem::conflict(
            "this service publishes nothing, or describes no snapshots of its aggregates",
        )),
        Some(Ok(sent)) => Ok(Json(RepublishView {
            mode: mode.to_owned(),
            topics,
            sent,
        })),
        Some(Err(tandem::republish::RepublishError::Store(error))) => Err(store_problem(error)),
        Some(Err(tandem::republish::RepublishError::Bus(error))) => Err(Problem::unavailable(
            format!("re-publication stopped; running it again is safe: {error}"),
        )),
    }
}

/// Partitions a consumer was moved past the pruned part of the log.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SkippedView {
    /// The consumer that was moved.
    pub consumer: String,
    /// Each partition it was moved on; empty when none was behind the
    /// log's start.
    pub skipped: Vec<SkippedPartition>,
}

/// One partition a consumer was moved on: the records from `from` up to
/// (not including) `to` were pruned from the log before it applied them,
/// so it resumes at `to` without them.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SkippedPartition {
    /// The topic.
    pub topic: String,
    /// The partition of the topic.
    pub partition: u32,
    /// The position before: the first record it had not applied.
    pub from: u64,
    /// The log's first offset, where it resumes.
    pub to: u64,
}

#[utoipa::path(post, path = "/admin/consumers/{consumer}/skip-pruned", tag = "admin",
    params(("consumer" = String, Path, description = "the consumer's name")),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "each partition whose position was below the log's start now resumes at the start (an empty list: none was). Run it after the source re-published (tandem republish does both): the records skipped are gone from the log for good", body = SkippedView),
        (status = 401, description = "no admin token, or an unknown one", body = Problem),
        (status = 404, description = "no such consumer in this service", body = Problem),
    ))]
async fn skip_pruned<S: Store>(
    State(state): State<AdminState<S>>,
    Extension(actor): Extension<Actor>,
    Path(consumer): Path<String>,
) -> Result<Json<SkippedView>, Problem> {
    let Some(topics) = state.reporter.topics_of(&consumer) else {
        return Err(
            Problem::not_found(format!("no consumer {consumer} in this service"))
                .with_field("consumer"),
        );
    };
    let bus = Arc::clone(state.reporter.bus());
    let skipped = tandem::republish::skip_pruned(&state.store, bus.as_ref(), &consumer, &topics)
        .await
        .map_err(|error| match error {
            tandem::republish::RepublishError::Store(error) => store_problem(error),
            tandem::republish::RepublishError::Bus(error) => {
                Problem::unavailable(format!("the bus did not say where its log starts: {error}"))
            }
        })?;
    let note = if skipped.is_empty() {
        "ok: nothing was behind the log's start".to_owned()
    } else {
        let parts: Vec<String> = skipped
            .iter()
            .map(|s| format!("{}/{} {}..{}", s.topic, s.partition, s.from, s.to))
            .collect();
        format!("ok: skipped {}", parts.join(", "))
    };
    let target = consumer.clone();
    state
        .store
        .write(move |tx| {
            tandem::audit::record(tx, &actor.0, "consumer.skip-pruned", &target, &note)
        })
        .await
        .map_err(store_problem)?;
    Ok(Json(SkippedView {
        consumer,
        skipped: skipped
            .into_iter()
            .map(|s| SkippedPartition {
                topic: s.topic,
                partition: s.partition,
                from: s.from,
                to: s.to,
            })
            .collect(),
    }))
}

/// Whether a pause or resume changed anything.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PauseState {
    /// The consumer asked to pause or resume.
    pub consumer: String,
    /// Whether it is now paused.
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
    #[param(min_length = 1, max_length = 18, pattern = "^[0-9]{1,18}$")]
    pub cursor: Option<String>,
    /// At most this many (1 to 500, default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

/// One recorded action.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditView {
    /// The entry's id; a later entry has a larger one.
    pub id: i64,
    /// RFC 3339.
    pub at: String,
    /// The name of the token used.
    pub actor: String,
    /// What was done, such as `dead-letters.redrive` or `consumer.pause`.
    pub action: String,
    /// What it was done to: a consumer, dead letter ids or a failure
    /// group.
    pub target: String,
    /// How it ended, such as `ok: 3 requested`, or `refused:` and why.
    pub result: String,
}

/// A page of the audit trail, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditPage {
    /// The entries of this page, newest first.
    pub items: Vec<AuditView>,
    /// The `cursor` that asks for the next (older) page; null on the last
    /// one.
    pub next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/admin/audit", tag = "admin",
    params(AuditQuery),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "the audit trail, newest first", body = AuditPage),
        (status = 401, description = "no admin token, or an unknown one", body = Problem),
        (status = 422, description = "the limit or the cursor is invalid", body = Problem),
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
        rebuild,
        show_rebuild,
        cancel_rebuild,
        pause,
        resume,
        skip_pruned,
        republish,
        audit
    ),
    components(schemas(
        DeadLetterView,
        DeadLetterPage,
        Selection,
        Requested,
        PauseState,
        RepublishView,
        RebuildView,
        SkippedView,
        SkippedPartition,
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
