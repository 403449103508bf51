//! The admin API of the real service processes, as an operator's tools use
//! it: bearer tokens (401 problem+json without one or with a wrong one,
//! the secret never echoed), dead letters by failure group with cursor
//! paging, one letter with its event, a group discarded in one call and
//! carried out by the running consumer, a replay refused for an unknown
//! consumer, and every action in the audit trail under the token's name.
//! Also: a service refuses to listen beyond loopback without a token.

mod common;

use common::{eventually, url};
use reqwest::Client;
use serde_json::{json, Value};
use tandem::bus::OutgoingRecord;
use tandem_cli::serve::Service;
use tandem_cli::system::System;

const SECRET: &str = "ops-secret-0123456789abcdef";
const OTHER: &str = "ci-secret-fedcba9876543210";

async fn admin(http: &Client, method: reqwest::Method, url: &str, body: Option<Value>) -> Value {
    let mut request = http.request(method.clone(), url).bearer_auth(SECRET);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("admin call");
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    assert!(status.is_success(), "{method} {url}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

async fn get(http: &Client, url: &str) -> Value {
    admin(http, reqwest::Method::GET, url, None).await
}

async fn start(dir: &std::path::Path) -> System {
    // The system is prepared by hand to give the services their tokens.
    let mut system = System::new(dir, 0)
        .expect("prepare the system")
        .with_executable(env!("CARGO_BIN_EXE_tandem"));
    for service in Service::ALL {
        system.set_env(
            service,
            "TANDEM_ADMIN_TOKEN",
            Some(&format!("ops:{SECRET},ci:{OTHER}")),
        );
    }
    system.start_all().await.expect("start the services");
    common::seed(&system).await;
    system
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_triage_dead_letters_by_failure_group_and_every_action_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let mut system = start(dir.path()).await;
    let http = system.http().clone();
    let inventory = url(&system, Service::Inventory);

    // Without a token, with a wrong one, with another scheme: 401 as a
    // problem, naming the header, never echoing what was sent.
    for (what, header) in [
        ("no token", None),
        (
            "a wrong token",
            Some("Bearer not-the-secret-at-all-000".to_owned()),
        ),
        ("basic auth", Some(format!("Basic {SECRET}"))),
    ] {
        let mut request = http.get(format!("{inventory}/admin/dead-letters"));
        if let Some(header) = &header {
            request = request.header("authorization", header);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{what}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json",
            "{what}"
        );
        assert!(
            response.headers().contains_key("www-authenticate"),
            "{what}"
        );
        let body = response.text().await.unwrap();
        assert!(!body.contains("not-the-secret"), "{what}: {body}");
        assert!(!body.contains(SECRET), "{what}: {body}");
        let problem: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(problem["field"], "authorization", "{what}: {body}");
    }

    // Three events of one cause and one of another, all parked by the
    // Inventory Service's consumer.
    let bus = tandem_engines::open_bus(&system.bus_url())
        .await
        .expect("open the bus");
    let mut poison: Vec<OutgoingRecord> = (0..3)
        .map(|n| OutgoingRecord {
            topic: "order".into(),
            key: format!("poison-{n}"),
            payload: format!("not an event {n}").into_bytes(),
        })
        .collect();
    poison.push(OutgoingRecord {
        topic: "order".into(),
        key: "odd".into(),
        payload: b"{\"json\": \"but no envelope\"}".to_vec(),
    });
    bus.publish(&poison).await.expect("publish the poison");

    let groups = eventually("four letters in their failure groups", || {
        let http = http.clone();
        let url = format!("{inventory}/admin/failure-groups");
        async move {
            let groups = get(&http, &url).await;
            let total: u64 = groups
                .as_array()
                .into_iter()
                .flatten()
                .map(|group| group["count"].as_u64().unwrap_or(0))
                .sum();
            if total == 4 {
                Ok(groups)
            } else {
                Err(groups.to_string())
            }
        }
    })
    .await;
    let groups = groups.as_array().unwrap();
    assert!(
        groups.len() >= 2,
        "two causes, two groups at least: {groups:?}"
    );
    let largest = &groups[0];
    assert_eq!(largest["count"], 3, "{groups:?}");
    assert_eq!(largest["consumer"], "inventory-reservations");
    assert_eq!(largest["reason"], "decode");
    assert!(
        !largest["error"].as_str().unwrap().contains("poison-"),
        "ids are masked: {largest}"
    );
    assert!(largest["firstSeen"].as_str().unwrap() <= largest["lastSeen"].as_str().unwrap());
    let group = largest["group"].as_str().unwrap().to_owned();

    // Cursor paging over the group.
    let first = get(
        &http,
        &format!("{inventory}/admin/dead-letters?group={group}&limit=2"),
    )
    .await;
    assert_eq!(first["items"].as_array().unwrap().len(), 2, "{first}");
    let cursor = first["nextCursor"]
        .as_str()
        .expect("a next cursor")
        .to_owned();
    let second = get(
        &http,
        &format!("{inventory}/admin/dead-letters?group={group}&limit=2&cursor={cursor}"),
    )
    .await;
    assert_eq!(second["items"].as_array().unwrap().len(), 1, "{second}");
    assert!(second["nextCursor"].is_null(), "{second}");
    let ids: Vec<i64> = first["items"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["items"].as_array().unwrap())
        .map(|letter| letter["id"].as_i64().unwrap())
        .collect();

    // One letter, with its event as it came off the bus.
    let one = get(&http, &format!("{inventory}/admin/dead-letters/{}", ids[0])).await;
    assert_eq!(one["group"], group.as_str());
    assert_eq!(one["status"], "parked");
    assert!(
        one["event"].as_str().unwrap().starts_with("not an event"),
        "{one}"
    );
    let missing = http
        .get(format!("{inventory}/admin/dead-letters/999999"))
        .bearer_auth(SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // A selection must say what it takes.
    let vague = http
        .post(format!("{inventory}/admin/dead-letters/discard"))
        .bearer_auth(SECRET)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(vague.status(), 422);

    // The whole group discarded in one call; the running consumer carries
    // it out, and the other group stays parked.
    let asked = admin(
        &http,
        reqwest::Method::POST,
        &format!("{inventory}/admin/dead-letters/discard"),
        Some(json!({ "group": group })),
    )
    .await;
    let mut requested: Vec<i64> = asked["requested"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_i64().unwrap())
        .collect();
    requested.sort_unstable();
    let mut expected = ids.clone();
    expected.sort_unstable();
    assert_eq!(requested, expected);
    eventually("the group discarded", || {
        let http = http.clone();
        let url = format!("{inventory}/admin/dead-letters?group={group}&status=discarded");
        async move {
            let page = get(&http, &url).await;
            if page["items"].as_array().map(Vec::len) == Some(3) {
                Ok(())
            } else {
                Err(page.to_string())
            }
        }
    })
    .await;
    let parked = get(&http, &format!("{inventory}/admin/dead-letters")).await;
    assert_eq!(parked["items"].as_array().unwrap().len(), 1, "{parked}");

    // A replay of a consumer this service does not run: 404, and audited.
    let unknown = http
        .post(format!(
            "{inventory}/admin/consumers/no-such-consumer/replay"
        ))
        .bearer_auth(OTHER)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    // The audit trail, newest first, under the tokens' names.
    let audit = get(&http, &format!("{inventory}/admin/audit")).await;
    let items = audit["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{audit}");
    assert_eq!(items[0]["actor"], "ci");
    assert_eq!(items[0]["action"], "consumer.replay");
    assert_eq!(items[0]["target"], "no-such-consumer");
    assert!(
        items[0]["result"].as_str().unwrap().starts_with("refused"),
        "{audit}"
    );
    assert_eq!(items[1]["actor"], "ops");
    assert_eq!(items[1]["action"], "dead-letters.discard");
    assert!(
        items[1]["target"].as_str().unwrap().contains(&group),
        "{audit}"
    );
    assert_eq!(items[1]["result"], "ok: 3 requested");

    // The command line works against the URL too, with the token.
    let tandem = |args: &[&str], token: Option<&str>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"));
        command
            .args(args)
            .env_remove("TANDEM_ADMIN_TOKEN")
            .env_remove("TANDEM_DB");
        if let Some(token) = token {
            command.env("TANDEM_ADMIN_TOKEN", token);
        }
        command.output().expect("run tandem")
    };
    let listed = tandem(
        &[
            "dead-letters",
            "list",
            "--all",
            "--json",
            "--url",
            &inventory,
        ],
        Some(SECRET),
    );
    assert!(listed.status.success(), "{listed:?}");
    let lines: Vec<Value> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(
        lines
            .iter()
            .filter(|letter| letter["status"] == "discarded")
            .count(),
        3
    );
    let without = tandem(&["dead-letters", "list", "--url", &inventory], None);
    assert!(!without.status.success());
    assert!(
        String::from_utf8_lossy(&without.stderr).contains("admin token"),
        "{without:?}"
    );
    let wrong = tandem(
        &["dead-letters", "list", "--url", &inventory],
        Some("ops:wrong-secret-0000000000"),
    );
    assert!(!wrong.status.success());
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(stderr.contains("401"), "{stderr}");
    assert!(!stderr.contains("wrong-secret"), "{stderr}");
    let replayed = tandem(
        &[
            "replay",
            "--consumer",
            "inventory-reservations",
            "--url",
            &inventory,
        ],
        Some(&format!("ops:{SECRET}")),
    );
    assert!(replayed.status.success(), "{replayed:?}");
    let audit = get(&http, &format!("{inventory}/admin/audit?limit=1")).await;
    assert_eq!(audit["items"][0]["action"], "consumer.replay", "{audit}");
    assert_eq!(
        audit["items"][0]["result"], "ok: replay requested",
        "{audit}"
    );
    assert!(audit["nextCursor"].is_string(), "{audit}");

    // The consumers' report is there for a rebuild's progress.
    let consumers = get(&http, &format!("{inventory}/admin/consumers")).await;
    assert_eq!(
        consumers["consumers"][0]["consumer"],
        "inventory-reservations"
    );

    // Every service documents its admin routes with their security scheme.
    for service in Service::ALL {
        let document: Value = http
            .get(format!("{}/openapi.json", url(&system, service)))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let list = &document["paths"]["/admin/dead-letters"]["get"];
        assert_eq!(list["security"][0]["admin_token"], json!([]), "{service:?}");
        assert_eq!(
            document["components"]["securitySchemes"]["admin_token"]["scheme"], "bearer",
            "{service:?}"
        );
        assert!(
            list["responses"]["401"]["content"]["application/problem+json"].is_object(),
            "{service:?}: {list}"
        );
    }
    system.stop_all().await;
}

/// `tandem serve` on an address other hosts can reach needs a token; a
/// short token is refused without being echoed.
#[tokio::test]
async fn a_service_beyond_loopback_without_a_token_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/customer.db", dir.path().display());
    let bus = format!("sqlite://{}/bus.db", dir.path().display());
    let run = |token: Option<&str>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"));
        command
            .args(["serve", "customer", "--listen", "0.0.0.0:0"])
            .args(["--db", &db, "--bus", &bus])
            .env_remove("TANDEM_ADMIN_TOKEN");
        if let Some(token) = token {
            command.env("TANDEM_ADMIN_TOKEN", token);
        }
        command.output().expect("run tandem serve")
    };
    let refused = run(None);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("without an admin token") && message.contains("TANDEM_ADMIN_TOKEN"),
        "{message}"
    );
    let short = run(Some("ops:tooshort99"));
    assert!(!short.status.success());
    let message = String::from_utf8_lossy(&short.stderr);
    assert!(message.contains("shorter than 16"), "{message}");
    assert!(!message.contains("tooshort99"), "{message}");
}

/// A paused consumer applies nothing: the order it should reserve stock
/// for waits while its lag grows past two seconds and its health says
/// paused (the exit code of `tandem status` too); resumed, the order
/// settles. Pause and resume are audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_consumer_applies_nothing_until_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let mut system = start(dir.path()).await;
    let http = system.http().clone();
    let inventory = url(&system, Service::Inventory);
    let order = url(&system, Service::Order);
    let consumer = "inventory-reservations";

    let paused = admin(
        &http,
        reqwest::Method::POST,
        &format!("{inventory}/admin/consumers/{consumer}/pause"),
        None,
    )
    .await;
    assert_eq!(paused["changed"], true, "{paused}");
    let again = admin(
        &http,
        reqwest::Method::POST,
        &format!("{inventory}/admin/consumers/{consumer}/pause"),
        None,
    )
    .await;
    assert_eq!(again["changed"], false, "{again}");
    let unknown = http
        .post(format!(
            "{inventory}/admin/consumers/order-settlement/pause"
        ))
        .bearer_auth(SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404, "a consumer of another service");

    let id = common::place(&http, &order, "1234", &[("widget", 1)]).await;
    eventually("the paused consumer falls two seconds behind", || {
        let http = http.clone();
        let inventory = inventory.clone();
        async move {
            let status: Value = http
                .get(format!("{inventory}/status"))
                .send()
                .await
                .map_err(|error| error.to_string())?
                .json()
                .await
                .map_err(|error| error.to_string())?;
            let report = &status["consumers"][0];
            if report["health"] == "paused" && report["lagSeconds"].as_f64().unwrap_or(0.0) >= 2.0 {
                Ok(())
            } else {
                Err(status.to_string())
            }
        }
    })
    .await;
    assert_eq!(
        common::get_order(&http, &order, &id).await["status"],
        "PENDING",
        "nothing was applied while paused"
    );
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["status", "--url", &inventory])
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(1), "{status:?}");
    assert!(String::from_utf8_lossy(&status.stdout).contains("paused"));

    admin(
        &http,
        reqwest::Method::POST,
        &format!("{inventory}/admin/consumers/{consumer}/resume"),
        None,
    )
    .await;
    common::settles_as(&http, &order, &id, "CONFIRMED").await;
    // The running totals the console's propagation chart reads.
    let status: Value = http
        .get(format!("{inventory}/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let end_to_end = &status["consumers"][0]["endToEnd"];
    assert!(end_to_end["count"].as_u64().unwrap_or(0) >= 1, "{status}");
    assert!(
        end_to_end["sumSeconds"].as_f64().unwrap_or(0.0) >= 2.0,
        "paused ≥ 2 s: {status}"
    );
    let audit = get(&http, &format!("{inventory}/admin/audit")).await;
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "consumer.resume",
            "consumer.pause",
            "consumer.pause",
            "consumer.pause"
        ],
        "{audit}"
    );
    system.stop_all().await;
}

/// Every admin route each service's OpenAPI document lists answers 401
/// (problem+json) without a token and with a wrong one; a token given on
/// the command line appears nowhere in the service's debug log, whatever
/// is sent to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_admin_route_needs_the_token_and_the_log_never_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut system = start(dir.path()).await;
    let http = system.http().clone();
    for service in Service::ALL {
        let base = url(&system, service);
        let document: Value = http
            .get(format!("{base}/openapi.json"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut checked = 0;
        for (path, item) in document["paths"].as_object().unwrap() {
            if !path.starts_with("/admin") {
                continue;
            }
            let concrete = path
                .replace("{id}", "1")
                .replace("{consumer}", "some-consumer");
            for method in ["get", "post"] {
                if item.get(method).is_none() {
                    continue;
                }
                for authorization in [None, Some("Bearer wrong-token-0123456789abcdef")] {
                    let mut request = http.request(
                        method.to_uppercase().parse().unwrap(),
                        format!("{base}{concrete}"),
                    );
                    if let Some(value) = authorization {
                        request = request.header("authorization", value);
                    }
                    if method == "post" {
                        request = request.json(&json!({ "ids": [1] }));
                    }
                    let response = request.send().await.unwrap();
                    assert_eq!(
                        response.status(),
                        401,
                        "{service:?} {method} {path} with {authorization:?}"
                    );
                    assert_eq!(
                        response.headers()["content-type"],
                        "application/problem+json",
                        "{service:?} {method} {path}"
                    );
                    checked += 1;
                }
            }
        }
        assert!(
            checked >= 20,
            "{service:?}: only {checked} admin calls documented"
        );
    }
    system.stop_all().await;

    // A token on the command line, a debug log, calls with it and without.
    let secret = "cli-given-secret-0123456789";
    let db = format!("sqlite://{}/customer.db", dir.path().display());
    let bus = format!("sqlite://{}/bus.db", dir.path().display());
    let log = dir.path().join("serve.log");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["serve", "customer", "--listen", "127.0.0.1:0"])
        .args(["--db", &db, "--bus", &bus])
        .args(["--admin-token", &format!("ops:{secret}")])
        .env_remove("TANDEM_ADMIN_TOKEN")
        .env("TANDEM_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("start tandem serve");
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let first = tokio::time::timeout(common::DEADLINE, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let base = format!("http://{}", first.rsplit("http://").next().unwrap());
    let with = http
        .get(format!("{base}/admin/audit"))
        .bearer_auth(secret)
        .send()
        .await
        .unwrap();
    assert_eq!(with.status(), 200);
    let wrong = http
        .get(format!("{base}/admin/audit"))
        .bearer_auth(format!("{secret}-not"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    // SAFETY: kill(2) with a valid signal on the child this test started.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    tokio::time::timeout(common::DEADLINE, child.wait())
        .await
        .expect("tandem serve stops")
        .unwrap();
    let written = std::fs::read_to_string(&log).unwrap();
    assert!(
        written.contains("admin request refused"),
        "the log was written: {written}"
    );
    assert!(
        !written.contains(secret),
        "the token is in the log:\n{written}"
    );
}
