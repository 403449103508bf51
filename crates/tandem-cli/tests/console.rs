//! The operator console in a real browser (headless Chromium driven over
//! WebDriver by chromedriver), served by a real `tandem up`: the live map
//! shows the three services; a newcomer logs in with the admin token (an
//! HttpOnly, SameSite=Strict session cookie; state changes need the
//! page's CSRF token), kills the Customer Service from the page, places
//! an order that is still confirmed, starts it again; parked events
//! appear as one failure group that is discarded with a confirmation; an
//! order whose reservation fails at a fault point is found in its group,
//! inspected and redriven once the fault is cleared, and reserves its
//! stock exactly once; a rebuild is asked for; the audit trail shows it
//! all; every page fits a phone's width. A screenshot of each page is
//! saved in target/tmp/console-screenshots.
//!
//! Needs Debian's `chromium` and `chromium-driver` (scripts/engines up
//! installs them).

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use tandem::bus::OutgoingRecord;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

const DEADLINE: Duration = Duration::from_secs(30);
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// A running `tandem up` and what it printed.
struct Up {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Up {
    async fn start(dir: &Path, faults: &Path) -> Up {
        // --console-port 0 means no console: a port free a moment ago.
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args([
                "up",
                "--seed",
                "--base-port",
                "0",
                "--console-port",
                &port.to_string(),
            ])
            .arg("--data-dir")
            .arg(dir)
            .env("TANDEM_FAULT_FILE", faults)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start tandem up");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let sink = Arc::clone(&lines);
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        let up = Up { child, lines };
        up.line("tandem up is up", |line| line.contains("Ctrl-C stops"))
            .await;
        up
    }

    async fn line(&self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(line) = self.lines.lock().unwrap().iter().find(|line| matches(line)) {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{what}: no such line within {DEADLINE:?}: {:?}",
                self.lines.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The value after `label` on its line of the start-up table.
    async fn field(&self, label: &str) -> String {
        let line = self
            .line(label, |line| line.trim_start().starts_with(label))
            .await;
        line.trim_start()[label.len()..].trim().to_owned()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// chromedriver on a free port, killed on drop.
struct Driver {
    _child: Child,
    url: String,
}

async fn chromedriver() -> Driver {
    assert!(
        Path::new(CHROMEDRIVER).exists() && Path::new(CHROMIUM).exists(),
        "{CHROMEDRIVER} or {CHROMIUM} is missing: install Debian's chromium and chromium-driver \
         (scripts/engines up does)"
    );
    let port = free_port();
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start chromedriver");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + DEADLINE;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "chromedriver did not listen on {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Driver { _child: child, url }
}

async fn browser(driver: &Driver) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .expect("a headless Chromium session")
}

async fn wait_css(browser: &Client, css: &str) -> fantoccini::elements::Element {
    browser
        .wait()
        .at_most(DEADLINE)
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|error| panic!("no element {css} within {DEADLINE:?}: {error}"))
}

async fn text_becomes(browser: &Client, css: &str, wanted: &str) {
    let deadline = Instant::now() + DEADLINE;
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(element) = browser.find(Locator::Css(css)).await {
            last = element.text().await.unwrap_or_default();
            if last == wanted {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let page = browser
        .find(Locator::Css("main"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap_or_default();
    panic!("{css} did not read {wanted:?} within {DEADLINE:?}; it read {last:?}; the page: {page}");
}

/// Clicks `css`, found afresh if the page redrew it in between.
async fn click(browser: &Client, css: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let clicked = wait_css(browser, css).await.click().await;
        match clicked {
            Ok(()) => return,
            Err(error) if Instant::now() < deadline => {
                eprintln!("clicking {css} again: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("cannot click {css}: {error}"),
        }
    }
}

/// Clicks `css` and accepts the confirmation it opens.
async fn click_and_confirm(browser: &Client, css: &str) {
    click(browser, css).await;
    browser
        .accept_alert()
        .await
        .unwrap_or_else(|error| panic!("clicking {css} opened no confirmation: {error}"));
}

async fn tab(browser: &Client, name: &str) {
    click(browser, &format!("nav a[data-tab=\"{name}\"]")).await;
}

/// Where the screenshots of each page go: `target/tmp/console-screenshots`.
fn screenshots() -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(browser: &Client, name: &str) {
    let png = browser.screenshot().await.expect("a screenshot");
    let path = screenshots().join(format!("{name}.png"));
    std::fs::write(&path, png).unwrap();
    eprintln!("screenshot: {}", path.display());
}

/// The page is no wider than the window: only boxes of their own scroll
/// sideways.
async fn fits_the_width(browser: &Client, page: &str) {
    let widths = browser
        .execute(
            "return [document.documentElement.scrollWidth, window.innerWidth];",
            vec![],
        )
        .await
        .unwrap();
    let (scroll, window) = (widths[0].as_i64().unwrap(), widths[1].as_i64().unwrap());
    assert!(
        scroll <= window,
        "the {page} page is {scroll} px wide in a {window} px window"
    );
}

/// The product's `(available, reserved)` units.
async fn stock(http: &reqwest::Client, inventory: &str, product: &str) -> (i64, i64) {
    let product: serde_json::Value = http
        .get(format!("{inventory}/products/{product}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (
        product["available"].as_i64().unwrap(),
        product["reserved"].as_i64().unwrap(),
    )
}

const PAGES: [&str; 6] = [
    "map",
    "charts",
    "dead-letters",
    "rebuilds",
    "audit",
    "controls",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_watches_kills_orders_triages_and_audits_from_the_console() {
    let dir = tempfile::tempdir().unwrap();
    // The Inventory Service's handler fails while this file lists
    // `inventory.reserve` (tandem::fault::failing).
    let faults = dir.path().join("faults");
    let mut up = Up::start(dir.path(), &faults).await;
    let console = up.field("console").await;
    let inventory = up.field("inventory").await;
    let bus = up
        .field("events")
        .await
        .rsplit(' ')
        .next()
        .unwrap()
        .to_owned();
    let token = std::fs::read_to_string(dir.path().join("admin-token"))
        .unwrap()
        .trim()
        .to_owned();

    // The console's controls refuse a caller without the token, and a
    // login with a wrong one.
    let http = reqwest::Client::new();
    let refused = http
        .post(format!("{console}/api/services/customer/kill"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let wrong = http
        .post(format!("{console}/api/session"))
        .json(&serde_json::json!({ "token": "not-the-admin-token-at-all" }))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert!(wrong.headers().get("set-cookie").is_none());

    let driver = chromedriver().await;
    let browser = browser(&driver).await;
    browser.set_window_size(1400, 1000).await.unwrap();
    browser.goto(&console).await.unwrap();

    // The live map: every service, ok.
    for service in ["customer", "inventory", "order"] {
        wait_css(
            &browser,
            &format!("#map g[data-service=\"{service}\"][data-health=\"ok\"]"),
        )
        .await;
    }
    wait_css(&browser, "#map g[data-consumer=\"inventory-reservations\"]").await;
    wait_css(&browser, "#map path.edge").await;

    // Log in with the token, as the page asks for it. The browser keeps a
    // session cookie that no script can read and no other site sends; the
    // page keeps no token.
    wait_css(&browser, "#token")
        .await
        .send_keys(&token)
        .await
        .unwrap();
    click(&browser, "#login").await;
    text_becomes(&browser, "#who", "signed in as admin").await;
    let cookies = browser.get_all_cookies().await.unwrap();
    let session = cookies
        .iter()
        .find(|cookie| cookie.name() == "tandem_console")
        .unwrap_or_else(|| panic!("no session cookie: {cookies:?}"));
    assert_eq!(session.http_only(), Some(true), "{session:?}");
    assert_eq!(
        format!("{:?}", session.same_site()),
        "Some(Strict)",
        "{session:?}"
    );
    assert!(!session.value().contains(&token));
    let seen_by_scripts = browser
        .execute(
            "return [document.cookie, document.documentElement.outerHTML,
                     JSON.stringify(sessionStorage), JSON.stringify(localStorage)].join('\\n');",
            vec![],
        )
        .await
        .unwrap();
    let seen_by_scripts = seen_by_scripts.as_str().unwrap();
    assert!(
        !seen_by_scripts.contains("tandem_console"),
        "{seen_by_scripts}"
    );
    assert!(
        !seen_by_scripts.contains(&token),
        "the page holds the token"
    );

    // The cookie alone reads, but changes nothing: a state change needs
    // the page's CSRF token (what a forged request from elsewhere lacks).
    let cookie = format!("tandem_console={}", session.value());
    let read = http
        .get(format!("{console}/api/admin/order/audit"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    let forged = http
        .post(format!("{console}/api/services/customer/kill"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    let problem: serde_json::Value = forged.json().await.unwrap();
    assert_eq!(problem["field"], "x-csrf-token", "{problem}");

    // Kill -9 the Customer Service from the page; the map shows it down,
    // and an order placed from the page is still confirmed.
    tab(&browser, "controls").await;
    click_and_confirm(&browser, "#control-customer-kill").await;
    wait_css(
        &browser,
        "#map g[data-service=\"customer\"][data-health=\"stopped\"]",
    )
    .await;
    click(&browser, "#order-place").await;
    text_becomes(&browser, "#order-status", "CONFIRMED").await;
    shot(&browser, "controls").await;
    // The order's events went through both consumers: their propagation
    // is charted.
    wait_css(
        &browser,
        ".chart[data-chart=\"inventory/inventory-reservations\"] text.propagation",
    )
    .await;
    click(&browser, "#control-customer-start").await;
    wait_css(
        &browser,
        "#map g[data-service=\"customer\"][data-health=\"ok\"]",
    )
    .await;
    tab(&browser, "map").await;
    shot(&browser, "map").await;
    tab(&browser, "charts").await;
    shot(&browser, "charts").await;

    // Two events of one cause, parked: one group of two; discarded from
    // the page with a confirmation, and gone.
    let log = tandem_engines::open_bus(&bus).await.expect("open the bus");
    log.publish(
        &(0..2)
            .map(|n| OutgoingRecord {
                topic: "order".into(),
                key: format!("poison-{n}"),
                payload: format!("not an event {n}").into_bytes(),
            })
            .collect::<Vec<_>>(),
    )
    .await
    .expect("publish the poison");
    tab(&browser, "dead-letters").await;
    wait_css(&browser, "#groups tr[data-count=\"2\"]").await;
    click_and_confirm(
        &browser,
        "#groups tr[data-count=\"2\"] button[id^=\"discard-\"]",
    )
    .await;
    wait_css(&browser, "#groups tr.empty").await;

    // An order whose reservation fails (the fault point) is parked in a
    // failure group of its own; once the fault is cleared, the operator
    // redrives it from the page and it is applied exactly once.
    let before = stock(&http, &inventory, "widget").await;
    std::fs::write(&faults, "inventory.reserve\n").unwrap();
    tab(&browser, "controls").await;
    click(&browser, "#order-place").await;
    tab(&browser, "dead-letters").await;
    let group = "#groups tr[data-count=\"1\"][data-error*=\"inventory.reserve\"]";
    wait_css(&browser, group).await;
    assert_eq!(text_of(&browser, "#order-status").await, "PENDING");
    click(&browser, &format!("{group} button[id^=\"inspect-\"]")).await;
    wait_css(&browser, "#letter:not([hidden])").await;
    let inspected = text_of(&browser, "#letter-body").await;
    assert!(
        inspected.contains("fault point inventory.reserve") && inspected.contains("OrderPlaced"),
        "{inspected}"
    );
    shot(&browser, "dead-letters").await;
    std::fs::remove_file(&faults).unwrap();
    click_and_confirm(&browser, &format!("{group} button[id^=\"redrive-\"]")).await;
    wait_css(&browser, "#groups tr.empty").await;
    tab(&browser, "controls").await;
    text_becomes(&browser, "#order-status", "CONFIRMED").await;
    let after = stock(&http, &inventory, "widget").await;
    assert_eq!(
        (after.0, after.1),
        (before.0 - 1, before.1 + 1),
        "one unit reserved, once: before {before:?}, after {after:?}"
    );

    // A rebuild of the Inventory Service's consumer, asked from the page.
    tab(&browser, "rebuilds").await;
    click_and_confirm(&browser, "#rebuild-inventory-reservations").await;
    shot(&browser, "rebuilds").await;

    // Every action in the audit trail, under the token's name.
    tab(&browser, "audit").await;
    wait_css(&browser, "#audit tr[data-action=\"dead-letters.discard\"]").await;
    wait_css(&browser, "#audit tr[data-action=\"dead-letters.redrive\"]").await;
    wait_css(&browser, "#audit tr[data-action=\"consumer.replay\"]").await;
    // The supervisor's controls, in the Customer Service's own trail.
    wait_css(&browser, "#audit tr[data-action=\"service.kill\"]").await;
    wait_css(&browser, "#audit tr[data-action=\"service.start\"]").await;
    shot(&browser, "audit").await;

    // Down to a phone's width, every page stays within the screen.
    browser.set_window_size(390, 844).await.unwrap();
    for page in PAGES {
        tab(&browser, page).await;
        wait_css(
            &browser,
            &format!("section[data-section=\"{page}\"]:not([hidden])"),
        )
        .await;
        fits_the_width(&browser, page).await;
        shot(&browser, &format!("phone-{page}")).await;
    }

    // Logging out ends the session: the cookie no longer reads.
    click(&browser, "#logout").await;
    wait_css(&browser, "#login-form:not([hidden])").await;
    let after_logout = http
        .get(format!("{console}/api/admin/order/audit"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(after_logout.status(), 401);

    browser.close().await.unwrap();
    // SAFETY: kill(2) with a valid signal on the child this test started.
    unsafe { libc::kill(up.child.id().unwrap() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(DEADLINE, up.child.wait())
        .await
        .expect("tandem up stops")
        .unwrap();
    assert!(status.success(), "{status}");
}

/// The text of `css`, shown or not (WebDriver reads no text of a hidden
/// element).
async fn text_of(browser: &Client, css: &str) -> String {
    wait_css(browser, css).await;
    let text = browser
        .execute(
            "return document.querySelector(arguments[0]).textContent;",
            vec![serde_json::json!(css)],
        )
        .await
        .unwrap();
    text.as_str().unwrap_or_default().to_owned()
}

/// `tandem console --url ...` against services it does not run: its
/// stream carries every service's report, admin calls pass through with
/// the caller's token (401 without it), and there are no controls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_watches_services_deployed_elsewhere() {
    use tandem_cli::serve::Service;
    const SECRET: &str = "console-test-secret-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let mut system = tandem_cli::system::System::new(dir.path(), 0)
        .unwrap()
        .with_executable(env!("CARGO_BIN_EXE_tandem"));
    for service in Service::ALL {
        system.set_env(service, "TANDEM_ADMIN_TOKEN", Some(SECRET));
    }
    system.start_all().await.expect("start the services");
    let port = free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_tandem"));
    command
        .args(["console", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    for service in Service::ALL {
        command.args(["--url", &system.url(service).unwrap()]);
    }
    let mut console = command.spawn().expect("start tandem console");
    let mut lines = BufReader::new(console.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("the console's first line")
        .unwrap()
        .unwrap();
    let base = first.rsplit(' ').next().unwrap().to_owned();
    assert_eq!(base, format!("http://127.0.0.1:{port}"), "{first}");

    // The live stream: a snapshot naming all three services, up.
    let http = reqwest::Client::new();
    let mut stream = http.get(format!("{base}/api/stream")).send().await.unwrap();
    assert_eq!(
        stream.headers()["content-type"],
        "text/event-stream",
        "an SSE stream"
    );
    let deadline = Instant::now() + DEADLINE;
    let mut seen = String::new();
    let snapshot = loop {
        assert!(Instant::now() < deadline, "no full snapshot: {seen}");
        let chunk = tokio::time::timeout(DEADLINE, stream.chunk())
            .await
            .expect("a chunk of the stream")
            .unwrap()
            .expect("the stream goes on");
        seen.push_str(&String::from_utf8_lossy(&chunk));
        let full = seen.split("\n\n").find_map(|event| {
            let data = event.lines().find_map(|line| line.strip_prefix("data:"))?;
            let snapshot: serde_json::Value = serde_json::from_str(data.trim()).ok()?;
            let services = snapshot["services"].as_array()?;
            (services.len() == 3 && services.iter().all(|service| service["up"] == true))
                .then_some(snapshot)
        });
        if let Some(snapshot) = full {
            break snapshot;
        }
    };
    assert_eq!(snapshot["controls"], false);
    let names: Vec<&str> = snapshot["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|service| service["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["customer", "inventory", "order"]);

    // Admin calls go through with the caller's token, and only with it.
    let audit = format!("{base}/api/admin/inventory/audit");
    assert_eq!(http.get(&audit).send().await.unwrap().status(), 401);
    let page: serde_json::Value = http
        .get(&audit)
        .bearer_auth(SECRET)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(page["items"].is_array(), "{page}");
    // No controls here.
    let control = http
        .post(format!("{base}/api/services/customer/kill"))
        .bearer_auth(SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(control.status(), 404);
    assert!(system.is_running(Service::Customer));
    console.kill().await.unwrap();
    system.stop_all().await;
}
