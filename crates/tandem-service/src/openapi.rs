//! What every service's `/openapi.json` must say about the errors the
//! shared HTTP plumbing gives, so that each service documents its own
//! success and domain errors only. Added to a service's document with
//! `#[openapi(modifiers(&tandem_service::openapi::SharedResponses))]`.
//!
//! Every error response is a problem document (`application/problem+json`,
//! schema `Problem`); on each operation:
//! - with a JSON body: 400 (malformed JSON), 408 (the body stalled), 413
//!   (over [`crate::BODY_LIMIT_BYTES`]), 415 (not `application/json`);
//! - with query parameters: 400 (a parameter that does not parse, or an
//!   unknown one);
//! - always: 503 (the handler took longer than its deadline, or the store
//!   is unavailable).

use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::response::Response;
use utoipa::openapi::{Content, OpenApi, Ref, RefOr};

/// The content type of every error answer.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// See the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct SharedResponses;

impl utoipa::Modify for SharedResponses {
    fn modify(&self, openapi: &mut OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            for operation in operations(item) {
                document_shared_errors(operation);
            }
        }
    }
}

fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        item.get.as_mut(),
        item.put.as_mut(),
        item.post.as_mut(),
        item.delete.as_mut(),
        item.patch.as_mut(),
    ]
    .into_iter()
    .flatten()
}

fn problem(description: &str) -> Response {
    let mut response = Response::new(description);
    response.content.insert(
        PROBLEM_CONTENT_TYPE.to_owned(),
        Content::new(Some(RefOr::Ref(Ref::from_schema_name("Problem")))),
    );
    response
}

fn document_shared_errors(operation: &mut Operation) {
    let responses = &mut operation.responses.responses;
    // The service's own errors: a problem document, whatever the macro
    // guessed for the body's content type.
    for (status, response) in responses.iter_mut() {
        if status.starts_with('4') || status.starts_with('5') {
            if let RefOr::T(response) = response {
                let description = if response.description.is_empty() {
                    "a problem"
                } else {
                    response.description.as_str()
                };
                *response = problem(description);
            }
        }
    }
    let mut add = |status: &str, description: &str| {
        responses
            .entry(status.to_owned())
            .or_insert_with(|| RefOr::T(problem(description)));
    };
    let has_body = operation.request_body.is_some();
    let has_query = operation.parameters.iter().flatten().any(|parameter| {
        matches!(
            parameter.parameter_in,
            utoipa::openapi::path::ParameterIn::Query
        )
    });
    if has_body {
        add("400", "the body is not JSON, or not of the expected shape");
        add("408", "the body stalled");
        add("413", "the body is larger than 64 KiB");
        add("415", "the body is not application/json");
    } else if has_query {
        add("400", "a query parameter does not parse, or is unknown");
    }
    add(
        "503",
        "the service cannot answer now (its database is unavailable, or the request took too long)",
    );
}

/// A service's whole document: `own` (its domain routes) with the admin
/// routes every service serves ([`crate::admin::AdminApi`], with their
/// bearer security scheme), and the shared errors on every operation.
pub fn document(own: OpenApi) -> OpenApi {
    use utoipa::{Modify, OpenApi as _};
    let mut document = own.merge_from(crate::admin::AdminApi::openapi());
    SharedResponses.modify(&mut document);
    document
}
