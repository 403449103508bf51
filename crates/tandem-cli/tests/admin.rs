//! The operator's commands through the real binary: `replay` and
//! `dead-letters` open an existing service database and nothing else (a
//! mistyped path is not created, the bus file and a database without the
//! toolkit's tables get no tables), refuse a consumer the database does not
//! know, and `events tail` and `dead-letters` print what events carry with
//! their control characters escaped, so an event cannot drive the terminal.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tandem::bus::{Bus, OutgoingRecord};
use tandem::consumer::{Consumer, ConsumerConfig};
use tandem::dead_letter;
use tandem::store::{Store, StoreError};
use tandem::Envelope;
use tandem_testkit::{open_log, open_store, Ledger, TOPIC};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(30);

/// Runs `tandem args...`; returns (success, stdout, stderr).
async fn tandem(args: &[&str]) -> (bool, Vec<u8>, String) {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .env_remove("TANDEM_DB")
        .env_remove("TANDEM_BUS")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start tandem");
    let output = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("tandem {args:?} did not exit within {DEADLINE:?}"))
        .expect("run tandem");
    (
        output.status.success(),
        output.stdout,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

/// Every admin command that opens a consumer's database, on `db`.
fn admin_commands(db: &str) -> Vec<Vec<String>> {
    let commands: [&[&str]; 6] = [
        &["replay", "--consumer", "ledger-reader"],
        &["dead-letters", "list"],
        &["dead-letters", "show", "1"],
        &[
            "dead-letters",
            "redrive",
            "--consumer",
            "ledger-reader",
            "--all",
        ],
        &[
            "dead-letters",
            "discard",
            "--consumer",
            "ledger-reader",
            "1",
        ],
        &[
            "dead-letters",
            "redrive",
            "--consumer",
            "ledger-reader",
            "1",
        ],
    ];
    commands
        .iter()
        .map(|command| {
            let mut args: Vec<String> = command.iter().map(|arg| (*arg).to_owned()).collect();
            args.extend(["--db".to_owned(), db.to_owned()]);
            args
        })
        .collect()
}

async fn refused_everywhere(db: &str, expected: &str, what: &str) {
    for args in admin_commands(db) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (success, _, stderr) = tandem(&args).await;
        assert!(!success, "{what}: tandem {args:?} reported success");
        assert!(
            stderr.contains(expected),
            "{what}: tandem {args:?} should say {expected:?}: {stderr}"
        );
    }
}

#[tokio::test]
async fn admin_commands_do_not_create_a_mistyped_database() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("ordr.db");
    let in_missing_dir = dir.path().join("no-such-dir").join("order.db");
    for path in [&typo, &in_missing_dir] {
        refused_everywhere(&url(path), "no such database", "a mistyped path").await;
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "files or directories made: {left:?}");
}

fn sqlite_tables(path: &Path) -> Vec<String> {
    let connection = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .expect("open the file to look");
    let mut statement = connection
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap();
    let names = statement
        .query_map([], |row| row.get::<_, String>(0))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    names
}

#[tokio::test]
async fn admin_commands_refuse_the_bus_file_and_leave_it_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let bus_path = dir.path().join("bus.db");
    let bus = open_log(&bus_path).await;
    bus.publish(&[OutgoingRecord {
        topic: TOPIC.into(),
        key: "a".into(),
        payload: tandem_testkit::deposit_bytes("a", 1, 100),
    }])
    .await
    .unwrap();
    drop(bus);
    let before = sqlite_tables(&bus_path);
    assert!(
        before.iter().any(|name| name == "log_records"),
        "{before:?}"
    );
    refused_everywhere(
        &url(&bus_path),
        "not a tandem service database",
        "the bus file",
    )
    .await;
    let after = sqlite_tables(&bus_path);
    assert_eq!(after, before, "tables were installed in the bus file");
}

#[tokio::test]
async fn admin_commands_refuse_a_postgres_database_without_the_toolkit_tables() {
    use tandem_postgres::testing::{base_url, ScratchDatabase};
    let scratch = ScratchDatabase::create(&base_url(), "admin_bare")
        .await
        .expect("a scratch database (is PostgreSQL running on TANDEM_TEST_POSTGRES?)");
    refused_everywhere(
        scratch.url(),
        "not a tandem service database",
        "a PostgreSQL database without the toolkit's tables",
    )
    .await;
    let store = tandem_postgres::PostgresStore::connect_with(
        scratch.url(),
        tandem_postgres::PostgresOptions {
            install_schema: false,
            ..Default::default()
        },
    )
    .await
    .expect("connect to look");
    let tables = store
        .read(|tx| -> Result<i64, StoreError> {
            tx.query_opt(
                "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
                &[],
            )?
            .expect("a count")
            .i64(0)
        })
        .await
        .expect("count tables");
    assert_eq!(tables, 0, "tables were installed in the bare database");
}

const CONSUMER: &str = "ledger-reader";
/// What a hostile producer puts in an event: clear the screen, set the
/// window title, colours, an 8-bit CSI and DEL.
const HOSTILE_TYPE: &str = "Deposited\u{1b}[2J\u{1b}[H";
const HOSTILE_SUBJECT: &str = "acct\u{1b}]0;owned\u{7}";
const HOSTILE_NOTE: &str = "\u{1b}[31mred\u{9b}31m\u{7f}\r";

fn hostile_envelope() -> Vec<u8> {
    Envelope {
        id: uuid::Uuid::now_v7(),
        source: TOPIC.into(),
        event_type: HOSTILE_TYPE.into(),
        subject: HOSTILE_SUBJECT.into(),
        time: time::OffsetDateTime::now_utc(),
        dataschema: "urn:test:hostile:1".into(),
        data: serde_json::json!({ "note": HOSTILE_NOTE }),
        sequence: 1,
        traceparent: None,
        correlationid: None,
        causationid: None,
        snapshot: false,
    }
    .to_json()
}

/// A service database whose consumer `ledger-reader` applied one deposit
/// and parked the hostile event (its type is not one the ledger knows),
/// and the bus those came from.
async fn parked_hostile_event(dir: &Path) -> (String, String) {
    let store = open_store(&dir.join("reader.db")).await;
    let bus = open_log(&dir.join("bus.db")).await;
    bus.publish(&[
        OutgoingRecord {
            topic: TOPIC.into(),
            key: "a".into(),
            payload: tandem_testkit::deposit_bytes("a", 1, 100),
        },
        OutgoingRecord {
            topic: TOPIC.into(),
            key: HOSTILE_SUBJECT.into(),
            payload: hostile_envelope(),
        },
        OutgoingRecord {
            topic: TOPIC.into(),
            key: "b".into(),
            payload: b"\x1b[2Jnot an envelope\xc2\x9b\x07".to_vec(),
        },
    ])
    .await
    .unwrap();
    let consumer = Consumer::new(
        store.clone(),
        Arc::new(bus.clone()) as Arc<dyn Bus>,
        Arc::new(Ledger::new()),
        ConsumerConfig::new(CONSUMER, &[TOPIC]),
    );
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { consumer.run(shutdown).await }
    });
    let probe = store.clone();
    tandem_testkit::eventually("two events parked", DEADLINE, || {
        let probe = probe.clone();
        async move {
            dead_letter::list(&probe, Some(CONSUMER), false)
                .await
                .is_ok_and(|letters| letters.len() == 2)
        }
    })
    .await;
    shutdown.cancel();
    running.await.unwrap().expect("the consumer stops cleanly");
    (url(&dir.join("reader.db")), url(&dir.join("bus.db")))
}

async fn requests(db: &str) -> Vec<String> {
    let store = tandem_engines::open_store(db).await.expect("open to look");
    store
        .read(|tx| -> Result<Vec<String>, StoreError> {
            tx.query(
                "SELECT consumer || ' ' || command FROM tandem_consumer_requests ORDER BY id",
                &[],
            )?
            .iter()
            .map(|row| row.text(0).map(str::to_owned))
            .collect()
        })
        .await
        .expect("read requests")
}

#[tokio::test]
async fn requests_for_a_consumer_the_database_does_not_know_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = parked_hostile_event(dir.path()).await;
    let typo = "ledger-raeder";
    let attempts: [&[&str]; 3] = [
        &["replay", "--consumer", typo],
        &["dead-letters", "redrive", "--consumer", typo, "--all"],
        &["dead-letters", "discard", "--consumer", typo, "--all"],
    ];
    for attempt in attempts {
        let mut args = attempt.to_vec();
        args.extend(["--db", &db]);
        let (success, _, stderr) = tandem(&args).await;
        assert!(!success, "tandem {args:?} reported success");
        assert!(
            stderr.contains(&format!("unknown consumer {typo}")) && stderr.contains(CONSUMER),
            "tandem {args:?} should name the unknown consumer and the known one: {stderr}"
        );
    }
    assert_eq!(
        requests(&db).await,
        Vec::<String>::new(),
        "a refused request stayed"
    );
    // The consumer the database knows is served as before.
    let (success, _, stderr) = tandem(&["replay", "--consumer", CONSUMER, "--db", &db]).await;
    assert!(success, "a replay of {CONSUMER}: {stderr}");
    assert_eq!(requests(&db).await, vec![format!("{CONSUMER} replay")]);
}

/// Asserts `output` has no control character but line ends, and holds
/// each of `escaped`.
fn printable(output: &[u8], escaped: &[&str], what: &str) -> String {
    let text = String::from_utf8(output.to_vec())
        .unwrap_or_else(|error| panic!("{what}: output is not UTF-8: {error}"));
    let raw: Vec<char> = text
        .chars()
        .filter(|c| c.is_control() && *c != '\n')
        .collect();
    assert!(
        raw.is_empty(),
        "{what}: control characters {raw:?} reached the terminal: {text:?}"
    );
    for expected in escaped {
        assert!(
            text.contains(expected),
            "{what}: {expected:?} missing from {text:?}"
        );
    }
    text
}

#[tokio::test]
async fn events_tail_escapes_control_characters() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bus) = parked_hostile_event(dir.path()).await;
    let tail = [
        "events",
        "tail",
        "--bus",
        &bus,
        "--topic",
        TOPIC,
        "--from-start",
        "--limit",
        "3",
    ];
    let (success, stdout, stderr) = tandem(&tail).await;
    assert!(success, "events tail: {stderr}");
    let text = printable(
        &stdout,
        &[
            r"Deposited\u{1b}[2J",
            r"acct\u{1b}]0;owned\u{7}",
            r"\u{9b}31m",
        ],
        "events tail",
    );
    assert_eq!(text.lines().count(), 3, "one line per event: {text}");

    let mut json = tail.to_vec();
    json.push("--json");
    let (success, stdout, stderr) = tandem(&json).await;
    assert!(success, "events tail --json: {stderr}");
    let text = printable(&stdout, &[], "events tail --json");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "one line per event: {text}");
    let parsed: Vec<serde_json::Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect();
    let hostile = parsed
        .iter()
        .find(|event| event["subject"] == HOSTILE_SUBJECT)
        .unwrap_or_else(|| panic!("the hostile event, with its subject intact: {text}"));
    assert_eq!(hostile["type"], HOSTILE_TYPE, "the JSON keeps the type");
    assert_eq!(hostile["data"]["note"], HOSTILE_NOTE);
    assert!(
        parsed
            .iter()
            .any(|line| line.to_string().contains("not an envelope")),
        "the undecodable record as a JSON line: {text}"
    );
}

#[tokio::test]
async fn dead_letters_escapes_control_characters() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = parked_hostile_event(dir.path()).await;
    let (success, stdout, stderr) = tandem(&["dead-letters", "list", "--db", &db]).await;
    assert!(success, "dead-letters list: {stderr}");
    let text = printable(
        &stdout,
        &[r"acct\u{1b}]0;owned\u{7}", r"Deposited\u{1b}[2J"],
        "dead-letters list",
    );
    assert_eq!(text.lines().count(), 2, "one line per dead letter: {text}");

    let (success, stdout, stderr) = tandem(&["dead-letters", "list", "--json", "--db", &db]).await;
    assert!(success, "dead-letters list --json: {stderr}");
    let text = printable(&stdout, &[], "dead-letters list --json");
    let letters: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect();
    let hostile = letters
        .iter()
        .find(|letter| letter["subject"] == HOSTILE_SUBJECT)
        .unwrap_or_else(|| panic!("the hostile event, with its subject intact: {text}"));

    let id = hostile["id"].as_i64().expect("an id").to_string();
    let (success, stdout, stderr) = tandem(&["dead-letters", "show", &id, "--db", &db]).await;
    assert!(success, "dead-letters show: {stderr}");
    let text = printable(&stdout, &[], "dead-letters show");
    let shown: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(shown["event"]["data"]["note"], HOSTILE_NOTE);
}
