//! `tandem demo`: the motivating story, run for real on a fresh system in a
//! temporary directory, narrated with measured numbers. Exits non-zero if
//! any step does not behave as promised.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Args;
use serde_json::{json, Value};

use crate::serve::Service;
use crate::system::System;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the data in this directory instead of a temporary one.
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
}

/// Longest wait for any promised outcome.
const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(2);

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let temporary = tempfile::tempdir().context("cannot create a temporary directory")?;
    let dir = args
        .data_dir
        .unwrap_or_else(|| temporary.path().to_path_buf());
    let mut system = System::new(&dir, 0)?;
    let outcome = story(&mut system).await;
    system.stop_all().await;
    match outcome {
        Ok(()) => {
            println!("\nEvery step behaved as promised.");
            Ok(())
        }
        Err(error) => Err(error.context("the demo found a broken promise")),
    }
}

fn step(text: &str) {
    println!("\n== {text}");
}

async fn story(system: &mut System) -> anyhow::Result<()> {
    step("Starting the Customer, Inventory and Order services as separate processes");
    let started = Instant::now();
    system.start_all().await?;
    for service in Service::ALL {
        println!("   {:<10} {}", service.name(), system.url(service)?);
    }
    println!(
        "   ready in {} ms; data in {}",
        started.elapsed().as_millis(),
        system.data_dir().display()
    );
    crate::up::seed(system).await?;

    let customer = system.url(Service::Customer)?;
    let order = system.url(Service::Order)?;
    let inventory = system.url(Service::Inventory)?;

    step("The Order Service learns of customer 1234 from events alone");
    let took = wait_until(system, &format!("{order}/customers/1234"), |copy| {
        copy["customerId"] == "1234"
    })
    .await?;
    println!(
        "   its local copy exists {} ms after seeding",
        took.as_millis()
    );

    step("PATCH /customers/1234 {\"address\":\"123 New Road\"} on the Customer Service");
    send(
        system
            .http()
            .patch(format!("{customer}/customers/1234"))
            .json(&json!({"address": "123 New Road"})),
        200,
    )
    .await?;
    let took = wait_until(system, &format!("{order}/customers/1234"), |copy| {
        copy["address"] == "123 New Road"
    })
    .await?;
    println!(
        "   the Order Service shows the new address {:.1} ms after the change committed, without either service calling the other",
        took.as_secs_f64() * 1000.0
    );

    step("kill -9 the Customer Service, then place orders");
    system.kill(Service::Customer).await?;
    ensure!(
        system
            .http()
            .get(format!("{customer}/health"))
            .send()
            .await
            .is_err(),
        "the Customer Service still answers after kill -9"
    );
    println!("   Customer Service is down");
    let mut confirm_times = Vec::new();
    for quantity in 1..=3 {
        let order_id = place(system, &order, "1234", "widget", quantity).await?;
        let took = wait_status(system, &order, &order_id, "CONFIRMED").await?;
        confirm_times.push(took.as_secs_f64() * 1000.0);
        println!(
            "   order {order_id} for {quantity} widget(s): accepted, CONFIRMED after {:.1} ms",
            took.as_secs_f64() * 1000.0
        );
    }
    println!("   all orders were accepted and confirmed while the Customer Service was down");

    step("Restart the Customer Service and change the address again");
    let restarted = Instant::now();
    system.start(Service::Customer).await?;
    println!("   back in {} ms", restarted.elapsed().as_millis());
    send(
        system
            .http()
            .patch(format!("{customer}/customers/1234"))
            .json(&json!({"address": "42 Newer Road"})),
        200,
    )
    .await?;
    let took = wait_until(system, &format!("{order}/customers/1234"), |copy| {
        copy["address"] == "42 Newer Road"
    })
    .await?;
    println!(
        "   the Order Service converged {:.1} ms after the change",
        took.as_secs_f64() * 1000.0
    );

    step("kill -9 the Inventory Service, then place orders");
    let stock_before = get(system, &format!("{inventory}/products/gadget")).await?;
    system.kill(Service::Inventory).await?;
    println!("   Inventory Service is down");
    let mut pending = Vec::new();
    for quantity in [2, 1] {
        let order_id = place(system, &order, "2345", "gadget", quantity).await?;
        println!("   order {order_id} for {quantity} gadget(s): accepted as PENDING");
        pending.push(order_id);
    }
    // They must stay PENDING for as long as Inventory is down.
    let watch_until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < watch_until {
        for order_id in &pending {
            let status =
                get(system, &format!("{order}/orders/{order_id}")).await?["status"].clone();
            ensure!(
                status == "PENDING",
                "order {order_id} left PENDING ({status}) while Inventory was down"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("   still PENDING after 500 ms, as they should be");

    step("Restart the Inventory Service");
    let restarted = Instant::now();
    system.start(Service::Inventory).await?;
    for order_id in &pending {
        wait_status(system, &order, order_id, "CONFIRMED").await?;
    }
    println!(
        "   both orders CONFIRMED {:.1} ms after the restart began",
        restarted.elapsed().as_secs_f64() * 1000.0
    );
    let stock_after = get(system, &format!("{inventory}/products/gadget")).await?;
    let reserved = stock_after["reserved"].as_i64().unwrap_or(-1)
        - stock_before["reserved"].as_i64().unwrap_or(0);
    ensure!(
        reserved == 3,
        "gadget reservations grew by {reserved}, expected 3"
    );
    println!(
        "   gadget stock: available {} -> {}, reserved {} -> {}",
        stock_before["available"],
        stock_after["available"],
        stock_before["reserved"],
        stock_after["reserved"]
    );

    let mut sorted = confirm_times.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "\nOrder accepted -> CONFIRMED while Customer was down: median {:.1} ms",
        sorted[sorted.len() / 2]
    );
    Ok(())
}

async fn send(request: reqwest::RequestBuilder, expected: u16) -> anyhow::Result<Value> {
    let response = request.send().await.context("request failed")?;
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    ensure!(
        status == expected,
        "expected HTTP {expected}, got {status}: {body}"
    );
    Ok(body)
}

async fn get(system: &System, url: &str) -> anyhow::Result<Value> {
    send(system.http().get(url), 200).await
}

async fn place(
    system: &System,
    order: &str,
    customer: &str,
    product: &str,
    quantity: i64,
) -> anyhow::Result<String> {
    let body =
        json!({"customerId": customer, "lines": [{"productId": product, "quantity": quantity}]});
    let placed = send(
        system.http().post(format!("{order}/orders")).json(&body),
        202,
    )
    .await?;
    ensure!(
        placed["status"] == "PENDING",
        "a new order should be PENDING: {placed}"
    );
    placed["orderId"]
        .as_str()
        .map(str::to_owned)
        .context("no orderId in the answer")
}

/// Polls `url` until `condition` holds; returns how long that took.
async fn wait_until(
    system: &System,
    url: &str,
    condition: impl Fn(&Value) -> bool,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        if let Ok(response) = system.http().get(url).send().await {
            if response.status().is_success() {
                if let Ok(body) = response.json::<Value>().await {
                    if condition(&body) {
                        return Ok(started.elapsed());
                    }
                }
            }
        }
        if started.elapsed() > DEADLINE {
            bail!("{url} did not reach the expected state within {DEADLINE:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn wait_status(
    system: &System,
    order: &str,
    order_id: &str,
    status: &str,
) -> anyhow::Result<Duration> {
    wait_until(system, &format!("{order}/orders/{order_id}"), |body| {
        body["status"] == status
    })
    .await
    .with_context(|| format!("order {order_id} never became {status}"))
}
