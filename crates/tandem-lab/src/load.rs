//! The benchmarks' load generator: POST requests from this process over
//! pooled keep-alive connections, so that a bench needs nothing installed
//! and every sample keeps its own time, status and answer.
//!
//! - [`Load::closed`]: `connections` clients, each sending its next request
//!   as soon as the last is answered (saturation).
//! - [`Load::open`]: a fixed rate whatever the answers, each request's
//!   latency counted from when it was *due*, not when it left, so a stalled
//!   server is charged for the requests that queued behind it (no
//!   coordinated omission).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One request's outcome.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When it was due, from the start of the run.
    pub due: Duration,
    /// From when it was due to when its answer was read.
    pub latency: Duration,
    /// The HTTP status; 0 when no answer came (refused, reset, timed out).
    pub status: u16,
    /// The `orderId` of a 2xx answer's body, if it had one.
    pub order_id: Option<String>,
}

impl Sample {
    pub fn accepted(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Run {
    pub samples: Vec<Sample>,
    pub elapsed: Duration,
}

impl Run {
    pub fn accepted(&self) -> usize {
        self.samples.iter().filter(|s| s.accepted()).count()
    }

    pub fn accepted_per_sec(&self) -> f64 {
        self.accepted() as f64 / self.elapsed.as_secs_f64()
    }

    /// Latency of the accepted requests, in ms, at `fraction` (0.5, 0.99).
    pub fn latency_ms(&self, fraction: f64) -> f64 {
        let mut latencies: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.accepted())
            .map(|s| s.latency.as_secs_f64() * 1000.0)
            .collect();
        latencies.sort_by(f64::total_cmp);
        percentile(&latencies, fraction)
    }

    /// How many answers of each status other than 2xx (0: no answer).
    pub fn refused(&self) -> BTreeMap<u16, usize> {
        let mut counts = BTreeMap::new();
        for sample in self.samples.iter().filter(|s| !s.accepted()) {
            *counts.entry(sample.status).or_insert(0) += 1;
        }
        counts
    }
}

/// The value at `fraction` of an ascending list (NaN when empty).
pub fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(((sorted.len() - 1) as f64) * fraction).round() as usize]
}

/// The same POST, sent again and again.
#[derive(Clone)]
pub struct Load {
    client: reqwest::Client,
    url: Arc<str>,
    body: Arc<str>,
}

impl Load {
    pub fn new(url: &str, body: &serde_json::Value) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(usize::MAX)
            .build()?;
        Ok(Self {
            client,
            url: url.into(),
            body: body.to_string().into(),
        })
    }

    async fn send(&self, due: Instant, start: Instant) -> Sample {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Answer {
            order_id: Option<String>,
        }
        let answer = self
            .client
            .post(&*self.url)
            .header("content-type", "application/json")
            .body(self.body.to_string())
            .send()
            .await;
        let (status, order_id) = match answer {
            Ok(response) => {
                let status = response.status().as_u16();
                match response.bytes().await {
                    Ok(body) if (200..300).contains(&status) => (
                        status,
                        serde_json::from_slice::<Answer>(&body)
                            .ok()
                            .and_then(|answer| answer.order_id),
                    ),
                    Ok(_) => (status, None),
                    Err(_) => (0, None),
                }
            }
            Err(_) => (0, None),
        };
        Sample {
            due: due.duration_since(start),
            latency: due.elapsed(),
            status,
            order_id,
        }
    }

    /// `connections` clients for `duration`, each waiting for its answer.
    pub async fn closed(&self, connections: usize, duration: Duration) -> Run {
        let start = Instant::now();
        let end = start + duration;
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..connections {
            let load = self.clone();
            clients.spawn(async move {
                let mut samples = Vec::new();
                loop {
                    let now = Instant::now();
                    if now >= end {
                        return samples;
                    }
                    samples.push(load.send(now, start).await);
                }
            });
        }
        let mut samples = Vec::new();
        while let Some(done) = clients.join_next().await {
            samples.extend(done.expect("a load client panicked"));
        }
        Run {
            samples,
            elapsed: start.elapsed(),
        }
    }

    /// `rate` requests a second for `duration`, answered or not.
    pub async fn open(&self, rate: f64, duration: Duration) -> Run {
        self.open_with(rate, duration, |_| {}).await
    }

    /// [`Load::open`], calling `tick` with the time since the start about
    /// every 10 ms (a bench uses it to act in the middle of a run).
    pub async fn open_with(
        &self,
        rate: f64,
        duration: Duration,
        mut tick: impl FnMut(Duration),
    ) -> Run {
        let start = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
        let mut requests = tokio::task::JoinSet::new();
        let mut next = 0u32;
        let mut last_tick = Duration::ZERO;
        let mut samples = Vec::new();
        loop {
            let due = interval * next;
            if due >= duration {
                break;
            }
            tokio::time::sleep_until((start + due).into()).await;
            // Everything due by now leaves now (a timer's granularity is a
            // millisecond): the rate holds on average, as in any open-loop
            // generator.
            let now = start.elapsed();
            while interval * next <= now && interval * next < duration {
                let load = self.clone();
                let due = start + interval * next;
                requests.spawn(async move { load.send(due, start).await });
                next += 1;
            }
            if now >= last_tick + Duration::from_millis(10) {
                last_tick = now;
                tick(now);
            }
            // Collect what is done, so the set stays small.
            while let Some(done) = requests.try_join_next() {
                samples.push(done.expect("a load request panicked"));
            }
        }
        // The run lasted until the last request was due.
        let elapsed = duration;
        while let Some(done) = requests.join_next().await {
            samples.push(done.expect("a load request panicked"));
        }
        Run { samples, elapsed }
    }
}
