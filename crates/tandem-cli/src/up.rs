//! `tandem up`: the whole commerce system on one machine, on the embedded
//! engines, until Ctrl-C. Services that crash are restarted.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde_json::json;

use crate::serve::Service;
use crate::system::System;

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where the databases and the event log live; running again on the
    /// same directory resumes with all data.
    #[arg(long, env = "TANDEM_DATA_DIR", default_value = "tandem-data")]
    data_dir: PathBuf,
    /// Load demo customers and products (skipped where they exist).
    #[arg(long)]
    seed: bool,
    /// Port of the customer service; inventory and order take the next two.
    /// 0 picks free ports.
    #[arg(long, default_value_t = 8081)]
    base_port: u16,
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let mut system = System::new(&args.data_dir, args.base_port)?;
    let stop = tokio::spawn(crate::shutdown_signal());
    if let Err(error) = system.start_all().await {
        system.stop_all().await;
        return Err(error);
    }
    if args.seed {
        if let Err(error) = seed(&system).await {
            system.stop_all().await;
            return Err(error);
        }
    }
    println!("Tandem is up; data in {}", system.data_dir().display());
    for service in Service::ALL {
        println!("  {:<10} {}", service.name(), system.url(service)?);
    }
    println!("  events     tandem events tail --bus {}", system.bus_url());
    println!("Ctrl-C stops everything.");
    let mut backoff = Duration::from_millis(500);
    loop {
        if stop.is_finished() {
            break;
        }
        for (service, status) in system.exited() {
            eprintln!(
                "{} service exited ({status}); restarting in {backoff:?}",
                service.name()
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
            if let Err(error) = system.start(service).await {
                eprintln!("cannot restart the {} service: {error:#}", service.name());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("stopping ...");
    system.stop_all().await;
    println!("stopped");
    Ok(())
}

/// Demo data: customers and products with fixed ids.
pub async fn seed(system: &System) -> anyhow::Result<()> {
    let customers = [
        (
            "1234",
            "Ada Lovelace",
            "ada@example.com",
            "1 Old Road",
            500_000,
        ),
        (
            "2345",
            "Grace Hopper",
            "grace@example.com",
            "2 Harbour Street",
            300_000,
        ),
        (
            "3456",
            "Alan Turing",
            "alan@example.com",
            "3 Bletchley Lane",
            200_000,
        ),
    ];
    let products = [
        ("widget", "SKU-WIDGET", "Widget", 1_250, 100),
        ("gadget", "SKU-GADGET", "Gadget", 4_990, 25),
        ("gizmo", "SKU-GIZMO", "Gizmo", 19_900, 5),
    ];
    let customer_url = format!("{}/customers", system.url(Service::Customer)?);
    for (id, name, email, address, limit) in customers {
        let body = json!({"customerId": id, "name": name, "email": email, "address": address, "creditLimitCents": limit});
        created_or_exists(
            system.http().post(&customer_url).json(&body).send().await?,
            "customer",
            id,
        )
        .await?;
    }
    let product_url = format!("{}/products", system.url(Service::Inventory)?);
    for (id, sku, name, price, stock) in products {
        let body =
            json!({"productId": id, "sku": sku, "name": name, "priceCents": price, "stock": stock});
        created_or_exists(
            system.http().post(&product_url).json(&body).send().await?,
            "product",
            id,
        )
        .await?;
    }
    println!("seeded customers 1234, 2345, 3456 and products widget, gadget, gizmo");
    Ok(())
}

async fn created_or_exists(
    response: reqwest::Response,
    what: &str,
    id: &str,
) -> anyhow::Result<()> {
    let status = response.status();
    if status.is_success() || status == reqwest::StatusCode::CONFLICT {
        return Ok(());
    }
    let body = response.text().await.unwrap_or_default();
    anyhow::bail!("seeding {what} {id} failed: {status} {body}")
}
