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
//!   unknown one) and 422 (a value outside what its schema allows: a page
//!   size out of range, a value not in its enumeration, ...);
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
    }
    if has_query {
        add("400", "a query parameter does not parse, or is unknown");
        add("422", "a query parameter is outside what its schema allows");
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

/// JSON Schemas of the values the services' domains accept, spelled so
/// that a validator of the document accepts exactly what the parsers do.
///
/// Patterns are anchored and name their characters by code point: no
/// `\s`, `\w` or `\p{..}`, whose sets differ between ECMA-262 (the
/// dialect of JSON Schema), Rust and other engines; and they count no
/// characters (ECMA-262 without the `u` flag counts UTF-16 units), so
/// lengths are `minLength`/`maxLength`, which count code points, as
/// `str::chars` does.
pub mod schema {
    use utoipa::openapi::schema::{Object, ObjectBuilder, SchemaType, Type};
    use utoipa::openapi::{KnownFormat, SchemaFormat};

    /// What `char::is_whitespace` (Unicode `White_Space`) matches: what
    /// `str::trim` takes off both ends.
    const WHITESPACE: &str = r"\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000";
    /// What `char::is_control` (category `Cc`) matches.
    const CONTROL: &str = r"\x00-\x1f\x7f-\x9f";
    /// Whitespace or a control character: the complement of a character
    /// that may open or close a trimmed text.
    const BLANK_OR_CONTROL: &str =
        r"\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000";

    /// An identifier: 1 to 64 ASCII letters, digits, `-` or `_` (safe in
    /// a URL path).
    pub const ID_PATTERN: &str = "^[A-Za-z0-9_-]{1,64}$";

    /// The longest identifier.
    pub const ID_MAX_LENGTH: usize = 64;

    /// A string matching [`ID_PATTERN`].
    pub fn id() -> Object {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(ID_MAX_LENGTH))
            .pattern(Some(ID_PATTERN))
            .build()
    }

    /// The pattern of a free text that is kept trimmed: whatever
    /// whitespace around it, then at least one character, none of them a
    /// control character, starting and ending with one that is not
    /// whitespace.
    pub fn text_pattern() -> String {
        format!(
            "^[{WHITESPACE}]*[^{BLANK_OR_CONTROL}](?:[^{CONTROL}]*[^{BLANK_OR_CONTROL}])?[{WHITESPACE}]*$"
        )
    }

    /// A free text of at most `max_chars` characters (as sent, the
    /// whitespace around it included) that is not blank and holds no
    /// control character but in the whitespace around it, which is
    /// trimmed.
    pub fn text(max_chars: usize) -> Object {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(max_chars))
            .pattern(Some(text_pattern()))
            .build()
    }

    /// The pattern of an e-mail address as the services check it: a text
    /// (see [`text_pattern`]) with no whitespace inside, exactly one `@`
    /// with something before it, and after it a domain with a dot that
    /// neither starts nor ends with a dot.
    pub fn email_pattern() -> String {
        let part = format!("[^@{BLANK_OR_CONTROL}]");
        let label_end = format!("[^@.{BLANK_OR_CONTROL}]");
        format!("^[{WHITESPACE}]*{part}+@{label_end}{part}*\\.{part}*{label_end}[{WHITESPACE}]*$")
    }

    /// An e-mail address of at most `max_chars` characters as sent; see
    /// [`email_pattern`].
    pub fn email(max_chars: usize) -> Object {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(5))
            .max_length(Some(max_chars))
            .pattern(Some(email_pattern()))
            .build()
    }

    /// A 64-bit integer from `min` to `max`.
    pub fn integer(min: i64, max: i64) -> Object {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(min))
            .maximum(Some(max))
            .build()
    }

    /// A string, one of `values`.
    pub fn one_of_strings(values: &[&str]) -> Object {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(values.iter().copied()))
            .build()
    }

    /// `schema`, or `null` (what an `Option` field takes).
    pub fn nullable(mut schema: Object) -> Object {
        if let SchemaType::Type(kind) = schema.schema_type {
            schema.schema_type = SchemaType::from_iter([kind, Type::Null]);
        }
        schema
    }

    /// `schema` with a description.
    pub fn described(mut schema: Object, description: &str) -> Object {
        schema.description = Some(description.to_owned());
        schema
    }
}
