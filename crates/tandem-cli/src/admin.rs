//! Operating a consumer from the command line: its dead letters and replay.
//! Requests are written to the consumer's database (`--db`), or sent to a
//! running service's admin API (`--url` and its admin token); the running
//! consumer carries them out with its handler.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use tandem::dead_letter::{self, DeadLetter};

use crate::printable;

#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The consumer's database, e.g. sqlite:///data/order.db
    #[arg(
        long,
        env = "TANDEM_DB",
        hide_env_values = true,
        required_unless_present = "url",
        conflicts_with = "url"
    )]
    db: Option<String>,
    /// A running service instead of its database, e.g.
    /// http://127.0.0.1:8082: its admin API, with --admin-token.
    #[arg(long)]
    url: Option<String>,
    /// The admin token for --url (`tandem up` keeps it in DATA_DIR/admin-token).
    #[arg(long, env = "TANDEM_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
}

/// Where the commands act: the database, or a service's admin API.
enum Target {
    Db(tandem_engines::AnyStore),
    Api(Api),
}

impl StoreArgs {
    async fn open(&self) -> anyhow::Result<Target> {
        match (&self.db, &self.url) {
            (Some(db), _) => Ok(Target::Db(tandem_engines::open_existing_store(db).await?)),
            (None, Some(url)) => Ok(Target::Api(Api::new(url, self.admin_token.as_deref())?)),
            (None, None) => bail!("name the consumer's database (--db) or a service (--url)"),
        }
    }
}

/// A service's admin API.
pub(crate) struct Api {
    http: reqwest::Client,
    base: url::Url,
    token: String,
}

impl Api {
    pub(crate) fn new(base: &str, token: Option<&str>) -> anyhow::Result<Self> {
        let base = url::Url::parse(base).with_context(|| format!("--url {base} is not a URL"))?;
        if !matches!(base.scheme(), "http" | "https") {
            bail!("--url must be http:// or https://, not {}", base.scheme());
        }
        let token = token
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .context("--url needs the admin token: --admin-token or TANDEM_ADMIN_TOKEN")?;
        // The service's own NAME:SECRET form is accepted: the secret is sent.
        let token = token.split_once(':').map_or(token, |(_, secret)| secret);
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()?,
            base,
            token: token.to_owned(),
        })
    }

    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let mut url = self.base.join(path)?;
        if !query.is_empty() {
            url.query_pairs_mut()
                .extend_pairs(query.iter().map(|(key, value)| (*key, value.as_str())));
        }
        let mut request = self
            .http
            .request(method, url.clone())
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            let detail = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|problem| problem["detail"].as_str().map(str::to_owned))
                .unwrap_or(text);
            bail!(
                "{} answered {status}: {}",
                self.base,
                printable::text(&detail)
            );
        }
        Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
    }
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// Parked events, oldest first.
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// Only this consumer's.
        #[arg(long)]
        consumer: Option<String>,
        /// Also show resolved and discarded ones.
        #[arg(long)]
        all: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter with its event.
    Show {
        #[command(flatten)]
        store: StoreArgs,
        id: i64,
    },
    /// Ask the consumer to handle a parked event (or all) again.
    Redrive(TargetArgs),
    /// Ask the consumer to give up on a parked event (or all).
    Discard(TargetArgs),
}

#[derive(Debug, Args)]
pub struct TargetArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[arg(long)]
    consumer: String,
    /// The dead letter's id.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    id: Option<i64>,
    /// Every parked event of the consumer.
    #[arg(long)]
    all: bool,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[arg(long)]
    consumer: String,
}

/// One dead letter on one line, with what the event carries escaped.
fn print_line(letter: &DeadLetter) {
    let line = format!(
        "{:>6}  {:<10} {:<9} {}/{}@{}  {}  seq {}  attempts {}  {}",
        letter.id,
        letter.status,
        letter.reason,
        letter.topic,
        letter.partition,
        letter.offset,
        letter.subject.as_deref().unwrap_or("-"),
        letter
            .sequence
            .map_or("-".to_owned(), |sequence| sequence.to_string()),
        letter.attempts,
        letter.error
    );
    println!("{}", printable::text(&line));
}

pub async fn dead_letters(command: DeadLetterCommand) -> anyhow::Result<()> {
    match command {
        DeadLetterCommand::List {
            store,
            consumer,
            all,
            json,
        } => {
            let letters = match store.open().await? {
                Target::Db(store) => dead_letter::list(&store, consumer.as_deref(), all).await?,
                Target::Api(api) => list_over_api(&api, consumer.as_deref(), all).await?,
            };
            for letter in &letters {
                if json {
                    println!("{}", printable::json(&serde_json::to_string(letter)?));
                } else {
                    print_line(letter);
                }
            }
            if !json {
                eprintln!("{} dead letter(s)", letters.len());
            }
        }
        DeadLetterCommand::Show { store, id } => {
            let store = match store.open().await? {
                Target::Db(store) => store,
                Target::Api(api) => {
                    let shown = api
                        .call(
                            reqwest::Method::GET,
                            &format!("admin/dead-letters/{id}"),
                            &[],
                            None,
                        )
                        .await?;
                    println!(
                        "{}",
                        printable::json(&serde_json::to_string_pretty(&shown)?)
                    );
                    return Ok(());
                }
            };
            let Some(letter) = dead_letter::get(&store, id).await? else {
                bail!("no dead letter {id}");
            };
            let mut shown = serde_json::to_value(&letter)?;
            shown["event"] = match serde_json::from_slice::<serde_json::Value>(&letter.payload) {
                Ok(value) => value,
                Err(_) => String::from_utf8_lossy(&letter.payload).into_owned().into(),
            };
            println!(
                "{}",
                printable::json(&serde_json::to_string_pretty(&shown)?)
            );
        }
        DeadLetterCommand::Redrive(target) | DeadLetterCommand::Discard(target)
            if target.id.is_none() && !target.all =>
        {
            bail!("name a dead letter id or --all");
        }
        DeadLetterCommand::Redrive(target) => {
            let store = match target.store.open().await? {
                Target::Db(store) => store,
                Target::Api(api) => return bulk_over_api(&api, &target, "redrive").await,
            };
            check_parked(&store, &target).await?;
            dead_letter::request_redrive(&store, &target.consumer, target.id).await?;
            eprintln!(
                "redrive requested; consumer {} carries it out",
                target.consumer
            );
        }
        DeadLetterCommand::Discard(target) => {
            let store = match target.store.open().await? {
                Target::Db(store) => store,
                Target::Api(api) => return bulk_over_api(&api, &target, "discard").await,
            };
            check_parked(&store, &target).await?;
            dead_letter::request_discard(&store, &target.consumer, target.id).await?;
            eprintln!(
                "discard requested; consumer {} carries it out",
                target.consumer
            );
        }
    }
    Ok(())
}

async fn check_parked(store: &tandem_engines::AnyStore, target: &TargetArgs) -> anyhow::Result<()> {
    let Some(id) = target.id else { return Ok(()) };
    let letter = dead_letter::get(store, id)
        .await?
        .with_context(|| format!("no dead letter {id}"))?;
    if letter.consumer != target.consumer {
        bail!(
            "dead letter {id} belongs to consumer {}, not {}",
            printable::text(&letter.consumer),
            target.consumer
        );
    }
    if letter.status != "parked" {
        bail!(
            "dead letter {id} is {}, not parked",
            printable::text(&letter.status)
        );
    }
    Ok(())
}

pub async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    match args.store.open().await? {
        Target::Db(store) => dead_letter::request_replay(&store, &args.consumer).await?,
        Target::Api(api) => {
            let consumer: String =
                url::form_urlencoded::byte_serialize(args.consumer.as_bytes()).collect();
            api.call(
                reqwest::Method::POST,
                &format!("admin/consumers/{consumer}/replay"),
                &[],
                None,
            )
            .await?;
        }
    }
    eprintln!(
        "replay requested; consumer {} rebuilds its read model",
        args.consumer
    );
    Ok(())
}

/// Every dead letter the admin API lists for `consumer`, page by page, as
/// the database listing gives them.
async fn list_over_api(
    api: &Api,
    consumer: Option<&str>,
    all: bool,
) -> anyhow::Result<Vec<DeadLetter>> {
    let mut letters = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut query = vec![
            ("status", if all { "all" } else { "parked" }.to_owned()),
            ("limit", "500".to_owned()),
        ];
        if let Some(consumer) = consumer {
            query.push(("consumer", consumer.to_owned()));
        }
        if let Some(cursor) = &cursor {
            query.push(("cursor", cursor.clone()));
        }
        let page = api
            .call(reqwest::Method::GET, "admin/dead-letters", &query, None)
            .await?;
        for item in page["items"].as_array().into_iter().flatten() {
            letters.push(letter_of(item)?);
        }
        match page["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return Ok(letters),
        }
    }
}

/// A dead letter from its admin API view (times to microseconds).
fn letter_of(item: &serde_json::Value) -> anyhow::Result<DeadLetter> {
    let text = |key: &str| item[key].as_str().map(str::to_owned);
    let micros = |key: &str| -> i64 {
        item[key]
            .as_str()
            .and_then(|at| {
                time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok()
            })
            .map_or(0, |at| (at.unix_timestamp_nanos() / 1000) as i64)
    };
    Ok(DeadLetter {
        id: item["id"].as_i64().context("a dead letter without an id")?,
        consumer: text("consumer").unwrap_or_default(),
        topic: text("topic").unwrap_or_default(),
        partition: item["partition"].as_i64().unwrap_or(0),
        offset: item["offset"].as_i64().unwrap_or(0),
        event_id: text("eventId"),
        source: text("source"),
        subject: text("subject"),
        sequence: item["sequence"].as_i64(),
        event_type: text("eventType"),
        reason: text("reason").unwrap_or_default(),
        error: text("error").unwrap_or_default(),
        attempts: item["attempts"].as_i64().unwrap_or(0),
        first_failed_at_micros: micros("firstFailedAt"),
        last_failed_at_micros: micros("lastFailedAt"),
        status: text("status").unwrap_or_default(),
        payload: Vec::new(),
    })
}

/// A redrive or discard of one letter, or of all of a consumer's, through
/// the admin API.
async fn bulk_over_api(api: &Api, target: &TargetArgs, action: &str) -> anyhow::Result<()> {
    if let Some(id) = target.id {
        let letter = api
            .call(
                reqwest::Method::GET,
                &format!("admin/dead-letters/{id}"),
                &[],
                None,
            )
            .await?;
        if letter["consumer"] != target.consumer.as_str() {
            bail!(
                "dead letter {id} belongs to consumer {}, not {}",
                printable::text(letter["consumer"].as_str().unwrap_or("?")),
                target.consumer
            );
        }
        if letter["status"] != "parked" {
            bail!(
                "dead letter {id} is {}, not parked",
                printable::text(letter["status"].as_str().unwrap_or("?"))
            );
        }
    }
    let selection = match target.id {
        Some(id) => serde_json::json!({ "ids": [id] }),
        None => serde_json::json!({ "consumer": target.consumer }),
    };
    let answer = api
        .call(
            reqwest::Method::POST,
            &format!("admin/dead-letters/{action}"),
            &[],
            Some(selection),
        )
        .await?;
    let count = answer["requested"].as_array().map_or(0, Vec::len);
    eprintln!(
        "{action} of {count} dead letter(s) requested; consumer {} carries it out",
        target.consumer
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct RepublishArgs {
    /// The service that re-publishes, as `tandem up` runs it (its address
    /// from --base-port, the token from DATA_DIR/admin-token); its
    /// consumers' services are the other two.
    #[arg(long, value_enum, required_unless_present = "url")]
    service: Option<crate::serve::Service>,
    /// The re-publishing service's base URL instead, e.g.
    /// http://customer.internal:8081.
    #[arg(long, conflicts_with = "service")]
    url: Option<String>,
    /// A service whose consumers of the re-published topic are then moved
    /// past what the log lost (repeatable; default with --service: the
    /// other services of `tandem up`).
    #[arg(long = "consumers-at")]
    consumers_at: Vec<String>,
    /// `history` or `snapshots` [default: the kept history when the
    /// service keeps one, else snapshots].
    #[arg(long)]
    mode: Option<String>,
    #[command(flatten)]
    up: UpAccess,
}

/// `tandem republish`: the source re-emits its history or snapshots, then
/// every consumer of its topic that fell behind the log's retention is
/// moved to the log's start, so it catches up from the re-publication.
pub async fn republish(args: RepublishArgs) -> anyhow::Result<()> {
    let token = args.up.token()?;
    let url_of = |service| args.up.url(service);
    let (source, mut consumers_at) = match (args.service, &args.url) {
        (Some(service), _) => (
            url_of(service),
            crate::serve::Service::ALL
                .into_iter()
                .filter(|other| *other != service)
                .map(url_of)
                .collect::<Vec<_>>(),
        ),
        (None, Some(url)) => (url.clone(), Vec::new()),
        (None, None) => bail!("name the service (--service) or its URL (--url)"),
    };
    if !args.consumers_at.is_empty() {
        consumers_at = args.consumers_at.clone();
    }
    let api = Api::new(&source, Some(&token))?;
    let mut query = Vec::new();
    if let Some(mode) = &args.mode {
        query.push(("mode", mode.clone()));
    }
    let sent = api
        .call(reqwest::Method::POST, "admin/republish", &query, None)
        .await?;
    let topics: Vec<String> = sent["topics"]
        .as_array()
        .map(|topics| {
            topics
                .iter()
                .filter_map(|topic| topic.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    eprintln!(
        "{source} re-published {} record(s) of {} from its {}",
        sent["sent"],
        printable::text(&topics.join(", ")),
        printable::text(sent["mode"].as_str().unwrap_or("?"))
    );
    for url in consumers_at {
        let api = Api::new(&url, Some(&token))?;
        let report: tandem::status::ServiceReport = serde_json::from_value(
            api.call(reqwest::Method::GET, "admin/consumers", &[], None)
                .await?,
        )
        .with_context(|| format!("{url} sent a report this tandem cannot read"))?;
        for consumer in report.consumers {
            if !consumer.topics.iter().any(|topic| topics.contains(topic)) {
                continue;
            }
            let name: String =
                url::form_urlencoded::byte_serialize(consumer.consumer.as_bytes()).collect();
            let moved = api
                .call(
                    reqwest::Method::POST,
                    &format!("admin/consumers/{name}/skip-pruned"),
                    &[],
                    None,
                )
                .await?;
            let skipped = moved["skipped"].as_array().cloned().unwrap_or_default();
            if skipped.is_empty() {
                eprintln!(
                    "{}: not behind the log's start",
                    printable::text(&consumer.consumer)
                );
            }
            for part in skipped {
                eprintln!(
                    "{}: {}/{} resumes at {} (records {}..{} were pruned; the re-publication covers them)",
                    printable::text(&consumer.consumer),
                    printable::text(part["topic"].as_str().unwrap_or("?")),
                    part["partition"],
                    part["to"],
                    part["from"],
                    part["to"],
                );
            }
        }
    }
    Ok(())
}

/// How a command reaches the services of `tandem up` on this machine:
/// their ports and the admin token it keeps.
#[derive(Debug, Args)]
pub struct UpAccess {
    /// The first port of `tandem up`'s services.
    #[arg(long, default_value_t = 8081)]
    base_port: u16,
    /// The data directory of `tandem up` (for its admin token).
    #[arg(long, env = "TANDEM_DATA_DIR", default_value = "tandem-data")]
    data_dir: std::path::PathBuf,
    /// The admin token [default: DATA_DIR/admin-token].
    #[arg(long, env = "TANDEM_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
}

impl UpAccess {
    /// The admin token given, or the one `tandem up` keeps in its data
    /// directory.
    pub(crate) fn token(&self) -> anyhow::Result<String> {
        if let Some(token) = &self.admin_token {
            return Ok(token.clone());
        }
        let file = self.data_dir.join(crate::data_dir::ADMIN_TOKEN_FILE);
        Ok(std::fs::read_to_string(&file)
            .with_context(|| {
                format!(
                    "no admin token: give --admin-token (or TANDEM_ADMIN_TOKEN), or the \
                     --data-dir of tandem up ({} cannot be read)",
                    file.display()
                )
            })?
            .trim()
            .to_owned())
    }

    /// Where `tandem up` serves `service`.
    pub(crate) fn url(&self, service: crate::serve::Service) -> String {
        let offset = crate::serve::Service::ALL
            .iter()
            .position(|s| *s == service)
            .unwrap_or(0) as u16;
        format!("http://127.0.0.1:{}", self.base_port + offset)
    }
}
