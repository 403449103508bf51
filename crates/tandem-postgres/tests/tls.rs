//! TLS by `sslmode`, against a real PostgreSQL server of its own: a
//! throwaway cluster started for this test on a free port, with a server
//! certificate (for `localhost` and `127.0.0.1`) signed by a CA made here.
//! The shared server on 5432 is left alone.
//!
//! The cluster is made with the PostgreSQL binaries of this machine
//! (`TANDEM_TEST_PG_BIN`, or the newest `/usr/lib/postgresql/*/bin`); as
//! root, they run as the `postgres` user. A machine without them fails this
//! test, naming what is missing (`scripts/engines up` installs them).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openssl::asn1::Asn1Time;
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
};
use openssl::x509::{X509Name, X509};
use tandem::store::{Store, StoreError, Value};
use tandem_postgres::{PostgresOptions, PostgresStore};

fn key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

fn name(common_name: &str) -> X509Name {
    let mut name = X509Name::builder().unwrap();
    name.append_entry_by_text("CN", common_name).unwrap();
    name.build()
}

/// A self-signed CA certificate and its key.
fn certificate_authority(common_name: &str) -> (X509, PKey<Private>) {
    let key = key();
    let mut builder = X509::builder().unwrap();
    builder.set_version(2).unwrap();
    let serial = BigNum::from_u32(1).unwrap().to_asn1_integer().unwrap();
    builder.set_serial_number(&serial).unwrap();
    builder.set_subject_name(&name(common_name)).unwrap();
    builder.set_issuer_name(&name(common_name)).unwrap();
    builder.set_pubkey(&key).unwrap();
    builder
        .set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    builder
        .set_not_after(&Asn1Time::days_from_now(2).unwrap())
        .unwrap();
    builder
        .append_extension(BasicConstraints::new().critical().ca().build().unwrap())
        .unwrap();
    builder
        .append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()
                .unwrap(),
        )
        .unwrap();
    builder.sign(&key, MessageDigest::sha256()).unwrap();
    (builder.build(), key)
}

/// A server certificate for `localhost` and `127.0.0.1`, signed by `ca`.
fn server_certificate(ca: &(X509, PKey<Private>)) -> (X509, PKey<Private>) {
    let key = key();
    let mut builder = X509::builder().unwrap();
    builder.set_version(2).unwrap();
    let serial = BigNum::from_u32(2).unwrap().to_asn1_integer().unwrap();
    builder.set_serial_number(&serial).unwrap();
    builder.set_subject_name(&name("localhost")).unwrap();
    builder.set_issuer_name(ca.0.subject_name()).unwrap();
    builder.set_pubkey(&key).unwrap();
    builder
        .set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    builder
        .set_not_after(&Asn1Time::days_from_now(2).unwrap())
        .unwrap();
    let names = SubjectAlternativeName::new()
        .dns("localhost")
        .ip("127.0.0.1")
        .build(&builder.x509v3_context(Some(&ca.0), None))
        .unwrap();
    builder.append_extension(names).unwrap();
    builder
        .append_extension(ExtendedKeyUsage::new().server_auth().build().unwrap())
        .unwrap();
    builder.sign(&ca.1, MessageDigest::sha256()).unwrap();
    (builder.build(), key)
}

/// The directory of `initdb` and `pg_ctl`.
fn postgres_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("TANDEM_TEST_PG_BIN") {
        return PathBuf::from(bin);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "no PostgreSQL binaries (initdb) in /usr/lib/postgresql/*/bin: \
             install them with scripts/engines up, or set TANDEM_TEST_PG_BIN"
        )
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|output| output.stdout.trim_ascii() == b"0")
        .unwrap_or(false)
}

fn id_of_postgres(flag: &str) -> u32 {
    let output = Command::new("id")
        .args([flag, "postgres"])
        .output()
        .expect("run id");
    assert!(
        output.status.success(),
        "running as root, the cluster needs the postgres user, which is missing"
    );
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap()
}

/// A PostgreSQL cluster of this test's own, stopped and removed on drop.
struct Cluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    as_postgres: bool,
}

impl Cluster {
    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        }
    }

    fn run(&self, mut command: Command, what: &str) {
        let output = command
            .output()
            .unwrap_or_else(|error| panic!("{what}: {error}"));
        assert!(
            output.status.success(),
            "{what} failed: {}{}\nlog: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
        );
    }

    fn start(ca: &(X509, PKey<Private>)) -> Cluster {
        let bin = postgres_bin();
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("tandem-pg-tls-")
            .tempdir()
            .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cluster = Cluster {
            bin,
            dir,
            port,
            as_postgres,
        };
        let (certificate, key) = server_certificate(ca);
        let root = cluster.dir.path();
        std::fs::write(root.join("server.crt"), certificate.to_pem().unwrap()).unwrap();
        std::fs::write(
            root.join("server.key"),
            key.private_key_to_pem_pkcs8().unwrap(),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            root.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        if as_postgres {
            let (uid, gid) = (id_of_postgres("-u"), id_of_postgres("-g"));
            for path in ["", "server.crt", "server.key"] {
                std::os::unix::fs::chown(root.join(path), Some(uid), Some(gid)).unwrap();
            }
        }
        let data = root.join("data");
        let mut initdb = cluster.command("initdb");
        initdb.arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-N",
            "--no-instructions",
        ]);
        cluster.run(initdb, "initdb");
        let settings = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{dir}'\n\
             ssl = on\nssl_cert_file = '{dir}/server.crt'\nssl_key_file = '{dir}/server.key'\n\
             fsync = off\n",
            dir = root.display()
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap()
            .write_all(settings.as_bytes())
            .unwrap();
        let mut start = cluster.command("pg_ctl");
        start
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(root.join("log"))
            .args(["-w", "-t", "60", "start"]);
        cluster.run(start, "pg_ctl start");
        cluster
    }

    fn url(&self, options: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?{options}",
            self.port
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut stop = self.command("pg_ctl");
        stop.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"]);
        let _ = stop.output();
    }
}

fn write_pem(dir: &Path, file: &str, certificate: &X509) -> String {
    let path = dir.join(file);
    std::fs::write(&path, certificate.to_pem().unwrap()).unwrap();
    path.display().to_string()
}

async fn open(url: &str) -> Result<PostgresStore, StoreError> {
    PostgresStore::connect_with(
        url,
        PostgresOptions {
            install_schema: false,
            readers: 1,
            ..PostgresOptions::default()
        },
    )
    .await
}

/// Whether the store's reader connection is encrypted, as the server sees it.
async fn encrypted(store: &PostgresStore) -> bool {
    let rows = store
        .read(|tx| {
            tx.query(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
        })
        .await
        .unwrap();
    rows[0].values[0] == Value::Int(1)
}

/// The log lines of this process (warnings and up), for the plaintext
/// fallback's warning.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_verifies_what_it_says_and_prefer_warns_when_it_falls_back() {
    let log = Captured::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .init();

    let ca = certificate_authority("tandem test CA");
    let stranger = certificate_authority("some other CA");
    let cluster = Cluster::start(&ca);
    let ca_file = write_pem(cluster.dir.path(), "ca.pem", &ca.0);
    let stranger_file = write_pem(cluster.dir.path(), "stranger.pem", &stranger.0);
    let port = cluster.port;

    // verify-full: the chain and the host name are checked, and pass.
    let store = open(&cluster.url(&format!("sslmode=verify-full&sslrootcert={ca_file}")))
        .await
        .unwrap_or_else(|error| panic!("verify-full with the right CA and host: {error}"));
    assert!(
        encrypted(&store).await,
        "verify-full connected in plaintext"
    );

    // verify-full refuses a certificate for another host...
    let wrong_host = format!(
        "postgres://postgres@db.wrong.test:{port}/postgres?hostaddr=127.0.0.1\
         &sslmode=verify-full&sslrootcert={ca_file}"
    );
    let error = open(&wrong_host)
        .await
        .expect_err("verify-full must refuse a certificate naming another host");
    assert!(error.to_string().contains("hostname mismatch"), "{error}");
    // ...which verify-ca accepts: it checks the chain only.
    let store = open(&wrong_host.replace("verify-full", "verify-ca"))
        .await
        .unwrap_or_else(|error| panic!("verify-ca with the right CA: {error}"));
    assert!(encrypted(&store).await);

    // Both refuse a server whose certificate another CA signed.
    for mode in ["verify-full", "verify-ca"] {
        let error = open(&cluster.url(&format!("sslmode={mode}&sslrootcert={stranger_file}")))
            .await
            .expect_err("a certificate from an unknown CA must be refused");
        assert!(error.to_string().contains("certificate"), "{mode}: {error}");
    }

    // The key=value form takes the same options.
    let store = open(&format!(
        "host=localhost port={port} user=postgres dbname=postgres \
         sslmode=verify-full sslrootcert='{ca_file}'"
    ))
    .await
    .unwrap_or_else(|error| panic!("key=value form with verify-full: {error}"));
    assert!(encrypted(&store).await);

    // require and the default (prefer) encrypt without checking.
    for options in ["sslmode=require", "application_name=tls-default"] {
        let store = open(&cluster.url(options))
            .await
            .unwrap_or_else(|error| panic!("{options}: {error}"));
        assert!(encrypted(&store).await, "{options} connected in plaintext");
    }
    assert!(
        !log.text().contains("plaintext"),
        "warned of plaintext while TLS was used: {}",
        log.text()
    );

    // The server stops offering TLS: prefer falls back to plaintext, and
    // says so; require refuses.
    let admin = cluster.url("sslmode=disable");
    std::thread::spawn(move || {
        let mut admin = tandem_postgres::testing::connect_raw(&admin).unwrap();
        admin.batch_execute("ALTER SYSTEM SET ssl = off").unwrap();
        admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    })
    .join()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let fresh = open(&cluster.url("sslmode=disable")).await.unwrap();
        let rows = fresh.read(|tx| tx.query("SHOW ssl", &[])).await.unwrap();
        if rows[0].values[0] == Value::Text("off".into()) {
            break;
        }
        assert!(Instant::now() < deadline, "ssl still on 20 s after reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let store = open(&cluster.url("sslmode=prefer"))
        .await
        .unwrap_or_else(|error| panic!("prefer against a plaintext server: {error}"));
    assert!(!encrypted(&store).await);
    let text = log.text();
    assert!(
        text.contains("WARN") && text.contains("plaintext") && text.contains(&format!(":{port}")),
        "prefer fell back to plaintext without a warning naming the server: {text:?}"
    );
    let error = open(&cluster.url("sslmode=require"))
        .await
        .expect_err("require against a server without TLS");
    assert!(error.to_string().contains("TLS"), "{error}");
}
