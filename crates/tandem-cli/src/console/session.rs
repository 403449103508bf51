//! Logging in to the console: the operator gives the admin token once; the
//! console keeps it on the server, in memory, and gives the browser a
//! session cookie (HttpOnly, so no script reads it; SameSite=Strict, so no
//! other site's page sends it) and a CSRF token that the page sends back
//! in `X-CSRF-Token` with each request that changes state. The page never
//! holds the admin token after the login form is sent.
//!
//! A request that carries its own `Authorization: Bearer` header (a script,
//! `curl`) is passed on as it is: browsers do not attach that header by
//! themselves, so it needs no CSRF token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use cookie::{Cookie, SameSite};
use subtle::ConstantTimeEq;
use tandem_service::Problem;

/// The session cookie's name.
pub const COOKIE: &str = "tandem_console";
/// The header a page sends its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts after login.
pub const LIFETIME: Duration = Duration::from_secs(12 * 60 * 60);
/// At most this many sessions are kept; the oldest goes first.
const MAX_SESSIONS: usize = 1000;

/// One logged-in browser.
struct Session {
    /// The admin token the operator gave (kept here, never sent back).
    secret: String,
    csrf: String,
    who: String,
    expires: Instant,
}

/// The console's sessions, in memory: a restart of the console logs every
/// browser out.
#[derive(Clone, Default)]
pub struct Sessions(Arc<Mutex<HashMap<String, Session>>>);

/// What a caller presents: an admin token (from its own header or from
/// its session), and who it is if known.
pub struct Credential {
    pub secret: String,
    /// The session's name for the operator, when logged in.
    pub who: Option<String>,
}

impl Credential {
    /// The `Authorization` header to pass on.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.secret)
    }
}

/// A session's view for the page: who, and its CSRF token.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionView {
    pub logged_in: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub who: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub csrf: Option<String>,
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's randomness");
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|cookie| cookie.name() == COOKIE)
        .map(|cookie| cookie.value().to_owned())
}

/// Why a request may not act: 401 (no or a dead session) or 403 (a state
/// change without the CSRF token, or from another site).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Unauthorized(&'static str),
    Forbidden {
        field: &'static str,
        detail: &'static str,
    },
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::Unauthorized(detail) => tandem_service::admin::unauthorized(detail),
            Refused::Forbidden { field, detail } => {
                Problem::new(StatusCode::FORBIDDEN, "csrf", detail)
                    .with_field(field)
                    .into_response()
            }
        }
    }
}

fn forbidden(field: &'static str, detail: &'static str) -> Refused {
    Refused::Forbidden { field, detail }
}

/// Whether `Origin`, when the browser sent one, is this console's own
/// origin (the `Host` it was asked on).
pub fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let origin = origin.to_str().unwrap_or_default();
    origin == format!("http://{host}") || origin == format!("https://{host}")
}

impl Sessions {
    /// Opens a session for `secret` (already checked) and returns the
    /// `Set-Cookie` value and the page's view of it.
    pub fn open(&self, secret: String, who: String) -> (HeaderValue, SessionView) {
        let id = random_hex();
        let csrf = random_hex();
        let now = Instant::now();
        let mut sessions = self.0.lock().expect("sessions lock");
        sessions.retain(|_, session| session.expires > now);
        if sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, session)| session.expires)
                .map(|(id, _)| id.clone())
            {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(
            id.clone(),
            Session {
                secret,
                csrf: csrf.clone(),
                who: who.clone(),
                expires: now + LIFETIME,
            },
        );
        let cookie = Cookie::build((COOKIE, id))
            .path("/")
            .http_only(true)
            .same_site(SameSite::Strict)
            .max_age(cookie::time::Duration::seconds(LIFETIME.as_secs() as i64))
            .build();
        let value = HeaderValue::from_str(&cookie.to_string()).expect("a cookie is a header value");
        let view = SessionView {
            logged_in: true,
            who: Some(who),
            csrf: Some(csrf),
        };
        (value, view)
    }

    /// The page's view of the session `headers` carry.
    pub fn view(&self, headers: &HeaderMap) -> SessionView {
        let found = session_id(headers).and_then(|id| {
            let sessions = self.0.lock().expect("sessions lock");
            sessions
                .get(&id)
                .filter(|session| session.expires > Instant::now())
                .map(|session| (session.who.clone(), session.csrf.clone()))
        });
        match found {
            Some((who, csrf)) => SessionView {
                logged_in: true,
                who: Some(who),
                csrf: Some(csrf),
            },
            None => SessionView {
                logged_in: false,
                who: None,
                csrf: None,
            },
        }
    }

    /// Ends the session `headers` carry (a state change: the CSRF token is
    /// required) and returns the `Set-Cookie` value that clears it.
    pub fn close(&self, method: &Method, headers: &HeaderMap) -> Result<HeaderValue, Refused> {
        self.credential(method, headers)?;
        if let Some(id) = session_id(headers) {
            self.0.lock().expect("sessions lock").remove(&id);
        }
        let cookie = Cookie::build((COOKIE, ""))
            .path("/")
            .http_only(true)
            .same_site(SameSite::Strict)
            .max_age(cookie::time::Duration::ZERO)
            .build();
        Ok(HeaderValue::from_str(&cookie.to_string()).expect("a cookie is a header value"))
    }

    /// The admin token a request may act with: its own bearer header, or
    /// its session's token; for a method that changes state through a
    /// session, only with the session's CSRF token and from the console's
    /// own origin. Otherwise the answer to send (401 or 403, as
    /// problem+json).
    pub fn credential(&self, method: &Method, headers: &HeaderMap) -> Result<Credential, Refused> {
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let secret = value
                .to_str()
                .ok()
                .and_then(|value| value.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim().to_owned())
                .ok_or(Refused::Unauthorized(
                    "send Authorization: Bearer <admin token>",
                ))?;
            return Ok(Credential { secret, who: None });
        }
        let Some(id) = session_id(headers) else {
            return Err(Refused::Unauthorized("log in with the admin token first"));
        };
        let (secret, csrf, who) = {
            let mut sessions = self.0.lock().expect("sessions lock");
            match sessions.get(&id) {
                Some(session) if session.expires > Instant::now() => (
                    session.secret.clone(),
                    session.csrf.clone(),
                    session.who.clone(),
                ),
                Some(_) => {
                    sessions.remove(&id);
                    return Err(Refused::Unauthorized(
                        "the session has expired: log in again",
                    ));
                }
                None => {
                    return Err(Refused::Unauthorized(
                        "the session is unknown (the console restarted?): log in again",
                    ))
                }
            }
        };
        let safe = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
        if !safe {
            if !same_origin(headers) {
                return Err(forbidden(
                    "origin",
                    "a request from another site's page is refused",
                ));
            }
            let presented = headers
                .get(CSRF_HEADER)
                .map(HeaderValue::as_bytes)
                .unwrap_or_default();
            if !bool::from(presented.ct_eq(csrf.as_bytes())) {
                return Err(forbidden(
                    CSRF_HEADER,
                    "send the session's CSRF token in X-CSRF-Token",
                ));
            }
        }
        Ok(Credential {
            secret,
            who: Some(who),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cookie(set_cookie: &HeaderValue) -> HeaderMap {
        let pair = set_cookie.to_str().unwrap().split(';').next().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_str(pair).unwrap());
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        headers
    }

    #[test]
    fn a_session_acts_with_its_token_and_changes_state_only_with_its_csrf_token() {
        let sessions = Sessions::default();
        let (set_cookie, view) = sessions.open("s3cret-s3cret-s3cret".into(), "admin".into());
        let text = set_cookie.to_str().unwrap();
        assert!(text.contains("HttpOnly"), "{text}");
        assert!(text.contains("SameSite=Strict"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
        let mut headers = with_cookie(&set_cookie);

        let read = sessions.credential(&Method::GET, &headers).ok().unwrap();
        assert_eq!(read.secret, "s3cret-s3cret-s3cret");
        let refused = sessions
            .credential(&Method::POST, &headers)
            .err()
            .unwrap()
            .into_response();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);

        headers.insert(CSRF_HEADER, HeaderValue::from_static("not-the-token"));
        let refused = sessions
            .credential(&Method::POST, &headers)
            .err()
            .unwrap()
            .into_response();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);

        let csrf = view.csrf.unwrap();
        headers.insert(CSRF_HEADER, HeaderValue::from_str(&csrf).unwrap());
        assert!(sessions.credential(&Method::POST, &headers).is_ok());

        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        let refused = sessions
            .credential(&Method::POST, &headers)
            .err()
            .unwrap()
            .into_response();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert!(sessions.credential(&Method::POST, &headers).is_ok());

        let cleared = sessions.close(&Method::POST, &headers).ok().unwrap();
        assert!(cleared.to_str().unwrap().contains("Max-Age=0"));
        let refused = sessions
            .credential(&Method::GET, &headers)
            .err()
            .unwrap()
            .into_response();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn no_cookie_and_no_header_is_401() {
        let sessions = Sessions::default();
        let refused = sessions
            .credential(&Method::GET, &HeaderMap::new())
            .err()
            .unwrap()
            .into_response();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    }
}
