//! `tandem rebuild`: a consumer's read model rebuilt side by side through
//! its service's admin API (see `tandem::rebuild`), with its progress,
//! or in place (`--in-place`, the replay of `tandem replay`).

use std::time::Duration;

use anyhow::bail;
use clap::Args;

use crate::admin::Api;
use crate::printable;

#[derive(Debug, Args)]
pub struct RebuildArgs {
    /// The consumer whose read model is rebuilt, e.g. order-local-copies.
    #[arg(long)]
    consumer: String,
    /// Its service, as `tandem up` runs it (its address from --base-port,
    /// the token from DATA_DIR/admin-token).
    #[arg(long, value_enum, required_unless_present = "url")]
    service: Option<crate::serve::Service>,
    /// Its service's base URL instead, e.g. http://order.internal:8083.
    #[arg(long, conflicts_with = "service")]
    url: Option<String>,
    /// Begin at the first record the log still holds instead of offset 0:
    /// for a log pruned by retention, once the sources re-published
    /// snapshots (`tandem republish`). The switch waits until every
    /// aggregate the live model has is as new in the new one.
    #[arg(long, conflicts_with_all = ["cancel", "in_place"])]
    from_log_start: bool,
    /// Cancel the rebuild under way: the new version is dropped, the live
    /// one untouched.
    #[arg(long, conflicts_with = "in_place")]
    cancel: bool,
    /// Rebuild in place instead (as `tandem replay`): no room for a second
    /// copy of the tables is needed, but readers see the model emptied and
    /// then partly built until the consumer has caught up again, and the
    /// service answers from it all the while.
    #[arg(long)]
    in_place: bool,
    /// Return once the rebuild is asked for, without following it.
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    up: crate::admin::UpAccess,
}

/// How often the progress is read.
const POLL: Duration = Duration::from_millis(250);

pub async fn run(args: RebuildArgs) -> anyhow::Result<()> {
    let token = args.up.token()?;
    let base = match (args.service, &args.url) {
        (Some(service), _) => args.up.url(service),
        (None, Some(url)) => url.clone(),
        (None, None) => bail!("name the service (--service) or its URL (--url)"),
    };
    let api = Api::new(&base, Some(&token))?;
    let consumer: String = url::form_urlencoded::byte_serialize(args.consumer.as_bytes()).collect();
    let name = printable::text(&args.consumer);
    if args.in_place {
        api.call(
            reqwest::Method::POST,
            &format!("admin/consumers/{consumer}/replay"),
            &[],
            None,
        )
        .await?;
        eprintln!("replay requested: {name} rebuilds its read model in place");
        return Ok(());
    }
    let path = format!("admin/consumers/{consumer}/rebuild");
    let started = if args.cancel {
        api.call(reqwest::Method::DELETE, &path, &[], None).await?
    } else {
        let query = if args.from_log_start {
            vec![("from", "log-start".to_owned())]
        } else {
            Vec::new()
        };
        api.call(reqwest::Method::POST, &path, &query, None).await?
    };
    let number = started["number"].as_i64().unwrap_or_default();
    if args.cancel {
        eprintln!("rebuild {number} of {name} is being cancelled");
    } else {
        eprintln!("rebuild {number} of {name} started: the new version fills beside the live one");
    }
    if args.no_wait {
        return Ok(());
    }
    follow(&api, &path, &name, number, args.cancel).await
}

/// Shows the rebuild's progress until it ends; an error unless it switched
/// (or, when cancelling, was cancelled).
async fn follow(
    api: &Api,
    path: &str,
    name: &str,
    number: i64,
    cancelling: bool,
) -> anyhow::Result<()> {
    let bar = indicatif::ProgressBar::new(0);
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} events, {prefix}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(format!("rebuilding {name}"));
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut last_line = std::time::Instant::now();
    loop {
        let view = api.call(reqwest::Method::GET, path, &[], None).await?;
        if view["number"].as_i64() != Some(number) {
            bar.abandon();
            bail!("a newer rebuild of {name} replaced rebuild {number}");
        }
        let applied = view["eventsApplied"].as_u64().unwrap_or(0);
        let to_go = view["eventsToGo"].as_u64().unwrap_or(0);
        let eta = view["etaSeconds"]
            .as_f64()
            .map_or_else(|| "ETA unknown".to_owned(), |eta| format!("ETA {eta:.0} s"));
        match view["state"].as_str().unwrap_or("?") {
            "building" | "cancelling" => {
                bar.set_length(applied + to_go);
                bar.set_position(applied);
                bar.set_prefix(eta.clone());
                if bar.is_hidden() && last_line.elapsed() >= Duration::from_secs(5) {
                    eprintln!("rebuilding {name}: {applied} events applied, {to_go} to go, {eta}");
                    last_line = std::time::Instant::now();
                }
            }
            "switched" => {
                bar.finish_and_clear();
                eprintln!("rebuild {number} of {name} switched: the new version is live");
                return Ok(());
            }
            "cancelled" if cancelling => {
                bar.finish_and_clear();
                eprintln!("rebuild {number} of {name} cancelled: the live version is untouched");
                return Ok(());
            }
            other => {
                bar.abandon();
                bail!(
                    "rebuild {number} of {name} {}: {}; the live version is untouched",
                    printable::text(other),
                    printable::text(view["error"].as_str().unwrap_or("no reason given"))
                );
            }
        }
        tokio::time::sleep(POLL).await;
    }
}
