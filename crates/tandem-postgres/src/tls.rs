//! TLS by libpq's `sslmode` and `sslrootcert`, which the `postgres` crate
//! reads only in part (`disable`, `prefer`, `require`, no root
//! certificate): this module takes both options out of a connection string
//! (URL or key=value form) before the crate parses the rest, and makes the
//! connector they ask for.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::X509;
use postgres::tls::{MakeTlsConnect, TlsConnect};
use postgres_openssl::MakeTlsConnector;
use tandem::store::StoreError;

/// libpq's `sslmode`, the modes that exist over TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum SslMode {
    /// Plaintext.
    Disable,
    /// TLS if the server offers it, else plaintext (logged as a warning);
    /// the certificate is not checked. The default, as in libpq.
    #[default]
    Prefer,
    /// TLS or no connection; the certificate is not checked (unless
    /// `sslrootcert` is given: then as `VerifyCa`, as in libpq).
    Require,
    /// TLS with a certificate signed by a trusted CA (`sslrootcert`, else
    /// the system's CAs); any host name.
    VerifyCa,
    /// `VerifyCa`, and the certificate names the host connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, StoreError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(StoreError::Engine(
                    format!(
                    "sslmode={other}: expected disable, prefer, require, verify-ca or verify-full"
                )
                    .into(),
                ))
            }
        })
    }

    /// The mode the `postgres` crate carries out (it knows three).
    pub(crate) fn driver_mode(self) -> postgres::config::SslMode {
        match self {
            SslMode::Disable => postgres::config::SslMode::Disable,
            SslMode::Prefer => postgres::config::SslMode::Prefer,
            _ => postgres::config::SslMode::Require,
        }
    }
}

/// `sslmode` and `sslrootcert` of a connection string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TlsOptions {
    pub(crate) mode: SslMode,
    /// A PEM file of the CAs to trust; `system` (or none) for the system's.
    pub(crate) root_cert: Option<PathBuf>,
}

const NOT_POSTGRES: &str = "not a PostgreSQL connection string: expected \
     postgres://user@host:port/database or key=value pairs";

/// Takes `sslmode` and `sslrootcert` out of `connection` (a `postgres://`
/// URL or a key=value string); returns the rest, for the `postgres` crate.
pub(crate) fn take_tls_options(connection: &str) -> Result<(String, TlsOptions), StoreError> {
    let mut options = TlsOptions::default();
    let mut take = |key: &str, value: &str| -> Result<bool, StoreError> {
        match key {
            "sslmode" => options.mode = SslMode::parse(value)?,
            "sslrootcert" => {
                options.root_cert = (value != "system").then(|| PathBuf::from(value));
            }
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if tandem::engine::has_scheme(connection) {
        let parsed = tandem::engine::ParsedUrl::parse(connection).map_err(|error| {
            StoreError::Engine(format!("a PostgreSQL URL that does not parse: {error}").into())
        })?;
        if !matches!(parsed.scheme(), "postgres" | "postgresql") {
            return Err(StoreError::Engine(NOT_POSTGRES.into()));
        }
        let (rest, taken) = parsed.without_options(&["sslmode", "sslrootcert"]);
        for option in taken {
            take(&option.name, &option.value)?;
        }
        rest
    } else {
        let params = tandem::engine::parse_key_values(connection)
            .ok_or_else(|| StoreError::Engine(NOT_POSTGRES.into()))?;
        let mut rest = String::with_capacity(connection.len());
        let mut from = 0;
        for param in params {
            if take(&param.key, &param.value)? {
                rest.push_str(&connection[from..param.span.start]);
                from = param.span.end;
            }
        }
        rest.push_str(&connection[from..]);
        rest
    };
    Ok((rest, options))
}

/// The connector `options` ask for; `None` for plaintext.
pub(crate) fn connector(options: &TlsOptions) -> Result<Option<MakeTlsConnector>, StoreError> {
    let mode = match (options.mode, &options.root_cert) {
        (SslMode::Disable, _) => return Ok(None),
        // libpq: require with a root certificate checks the chain.
        (SslMode::Require, Some(_)) => SslMode::VerifyCa,
        (mode, _) => mode,
    };
    let setup = |error: openssl::error::ErrorStack| {
        StoreError::Engine(format!("cannot set up TLS: {error}").into())
    };
    // Verifies the peer against the system's CAs, and the host name.
    let mut builder = SslConnector::builder(SslMethod::tls()).map_err(setup)?;
    match (mode, &options.root_cert) {
        (SslMode::Prefer | SslMode::Require, _) => builder.set_verify(SslVerifyMode::NONE),
        (_, Some(path)) => builder.set_cert_store(trust_store(path)?),
        (_, None) => {}
    }
    let mut connector = MakeTlsConnector::new(builder.build());
    if mode != SslMode::VerifyFull {
        connector.set_callback(|config, _| {
            config.set_verify_hostname(false);
            Ok(())
        });
    }
    Ok(Some(connector))
}

/// A store holding exactly the CAs of a PEM file.
fn trust_store(path: &Path) -> Result<openssl::x509::store::X509Store, StoreError> {
    let shown = path.display();
    let pem = std::fs::read(path).map_err(|error| {
        StoreError::Engine(format!("cannot read sslrootcert {shown}: {error}").into())
    })?;
    let certificates = X509::stack_from_pem(&pem).map_err(|error| {
        StoreError::Engine(format!("sslrootcert {shown} is not PEM certificates: {error}").into())
    })?;
    if certificates.is_empty() {
        return Err(StoreError::Engine(
            format!("sslrootcert {shown} holds no certificate").into(),
        ));
    }
    let mut store = X509StoreBuilder::new()
        .map_err(|error| StoreError::Engine(format!("cannot set up TLS: {error}").into()))?;
    for certificate in certificates {
        store
            .add_cert(certificate)
            .map_err(|error| StoreError::Engine(format!("sslrootcert {shown}: {error}").into()))?;
    }
    Ok(store.build())
}

/// A TLS connector that records whether a handshake began: the `postgres`
/// crate hands the stream to TLS only once the server agreed to it, so a
/// connection made in `prefer` mode without it is plaintext.
pub(crate) struct Watched {
    pub(crate) inner: MakeTlsConnector,
    pub(crate) used: Arc<AtomicBool>,
}

impl<S> MakeTlsConnect<S> for Watched
where
    MakeTlsConnector: MakeTlsConnect<S>,
{
    type Stream = <MakeTlsConnector as MakeTlsConnect<S>>::Stream;
    type TlsConnect = WatchedConnect<<MakeTlsConnector as MakeTlsConnect<S>>::TlsConnect>;
    type Error = <MakeTlsConnector as MakeTlsConnect<S>>::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Self::TlsConnect, Self::Error> {
        Ok(WatchedConnect {
            inner: self.inner.make_tls_connect(domain)?,
            used: Arc::clone(&self.used),
        })
    }
}

pub(crate) struct WatchedConnect<T> {
    inner: T,
    used: Arc<AtomicBool>,
}

impl<S, T: TlsConnect<S>> TlsConnect<S> for WatchedConnect<T> {
    type Stream = T::Stream;
    type Error = T::Error;
    type Future = T::Future;

    fn connect(self, stream: S) -> Self::Future {
        self.used.store(true, Ordering::Release);
        self.inner.connect(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_sslmode_and_sslrootcert_out_of_both_forms() {
        let (rest, options) = take_tls_options(
            "postgres://u@h:1/db?application_name=a%20b&sslmode=verify-full&sslrootcert=%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u@h:1/db?application_name=a%20b");
        assert_eq!(
            options,
            TlsOptions {
                mode: SslMode::VerifyFull,
                root_cert: Some("/ca.pem".into())
            }
        );
        let (rest, options) =
            take_tls_options("host=h sslmode = verify-ca sslrootcert='/a b.pem' dbname=x").unwrap();
        assert_eq!(rest, "host=h   dbname=x");
        assert_eq!(options.mode, SslMode::VerifyCa);
        assert_eq!(options.root_cert, Some("/a b.pem".into()));
        let (rest, options) = take_tls_options("postgres://h/db").unwrap();
        assert_eq!(
            (rest.as_str(), options.mode),
            ("postgres://h/db", SslMode::Prefer)
        );
        let (_, options) = take_tls_options("postgres://h/db?sslrootcert=system").unwrap();
        assert_eq!(options.root_cert, None);
        let error = take_tls_options("postgres://h/db?sslmode=allow").unwrap_err();
        assert!(error.to_string().contains("sslmode=allow"), "{error}");
        assert!(take_tls_options("host=h password='open").is_err());
    }

    #[test]
    fn a_missing_root_certificate_is_named() {
        let error = connector(&TlsOptions {
            mode: SslMode::VerifyFull,
            root_cert: Some("/nonexistent/ca.pem".into()),
        })
        .err()
        .unwrap();
        assert!(error.to_string().contains("/nonexistent/ca.pem"), "{error}");
    }
}
