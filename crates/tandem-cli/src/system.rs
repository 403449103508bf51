//! The commerce system as OS processes: one `tandem serve` child per
//! service, all on the embedded engines in one data directory. Used by
//! `tandem up` and `tandem demo`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::serve::Service;

/// How long a service may take to print its address and become ready.
const START_DEADLINE: Duration = Duration::from_secs(30);

struct Running {
    child: Child,
}

pub struct System {
    data_dir: PathBuf,
    executable: PathBuf,
    /// The address of each service, fixed at its first start so restarts
    /// keep their URL.
    addresses: BTreeMap<&'static str, String>,
    base_port: u16,
    running: BTreeMap<&'static str, Running>,
    http: reqwest::Client,
}

impl System {
    /// Prepares a system in `data_dir`; `base_port` 0 picks free ports.
    pub fn new(data_dir: &Path, base_port: u16) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
        let data_dir = std::fs::canonicalize(data_dir)
            .with_context(|| format!("cannot resolve {}", data_dir.display()))?;
        Ok(Self {
            data_dir,
            executable: std::env::current_exe().context("cannot find the tandem executable")?,
            addresses: BTreeMap::new(),
            base_port,
            running: BTreeMap::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .context("cannot build the HTTP client")?,
        })
    }

    /// Runs services from `executable` instead of this process's own
    /// (the tests run the built `tandem` binary).
    pub fn with_executable(mut self, executable: impl Into<PathBuf>) -> Self {
        self.executable = executable.into();
        self
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn bus_url(&self) -> String {
        format!("sqlite://{}", self.data_dir.join("bus.db").display())
    }

    pub fn db_url(&self, service: Service) -> String {
        format!(
            "sqlite://{}",
            self.data_dir
                .join(format!("{}.db", service.name()))
                .display()
        )
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The service's base URL, e.g. `http://127.0.0.1:8083`.
    pub fn url(&self, service: Service) -> anyhow::Result<String> {
        self.addresses
            .get(service.name())
            .map(|address| format!("http://{address}"))
            .with_context(|| format!("{} service was never started", service.name()))
    }

    pub fn is_running(&self, service: Service) -> bool {
        self.running.contains_key(service.name())
    }

    /// Starts every service and waits until each is ready.
    pub async fn start_all(&mut self) -> anyhow::Result<()> {
        for service in Service::ALL {
            self.start(service).await?;
        }
        Ok(())
    }

    /// Starts one service (again) and waits until it is ready.
    pub async fn start(&mut self, service: Service) -> anyhow::Result<()> {
        if self.is_running(service) {
            return Ok(());
        }
        let listen = match self.addresses.get(service.name()) {
            Some(address) => address.clone(),
            None if self.base_port == 0 => "127.0.0.1:0".to_owned(),
            None => {
                let offset = service.default_port() - Service::Customer.default_port();
                format!("127.0.0.1:{}", self.base_port + offset)
            }
        };
        let mut child = Command::new(&self.executable)
            .args(["serve", service.name(), "--listen", &listen])
            .args(["--db", &self.db_url(service), "--bus", &self.bus_url()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start the {} service", service.name()))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(START_DEADLINE, lines.next_line())
            .await
            .with_context(|| {
                format!(
                    "{} service did not start within {START_DEADLINE:?}",
                    service.name()
                )
            })?
            .context("reading the service's output")?;
        let Some(line) = first else {
            let status = child.wait().await?;
            bail!(
                "{} service exited during start-up ({status})",
                service.name()
            );
        };
        let address = line
            .rsplit("http://")
            .next()
            .filter(|address| address.contains(':'))
            .with_context(|| format!("unexpected start-up line from {}: {line}", service.name()))?
            .to_owned();
        // Keep draining its stdout so the pipe never fills.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.addresses.insert(service.name(), address);
        self.running.insert(service.name(), Running { child });
        self.wait_ready(service).await
    }

    async fn wait_ready(&self, service: Service) -> anyhow::Result<()> {
        let url = format!("{}/ready", self.url(service)?);
        let deadline = tokio::time::Instant::now() + START_DEADLINE;
        loop {
            if let Ok(response) = self.http.get(&url).send().await {
                if response.status().is_success() {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{} service not ready within {START_DEADLINE:?}",
                    service.name()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills a service with SIGKILL, as a crash would.
    pub async fn kill(&mut self, service: Service) -> anyhow::Result<()> {
        if let Some(mut running) = self.running.remove(service.name()) {
            running.child.kill().await?;
        }
        Ok(())
    }

    /// Returns the services whose process has exited on its own.
    pub fn exited(&mut self) -> Vec<(Service, std::process::ExitStatus)> {
        let mut exited = Vec::new();
        for service in Service::ALL {
            if let Some(running) = self.running.get_mut(service.name()) {
                if let Ok(Some(status)) = running.child.try_wait() {
                    exited.push((service, status));
                }
            }
        }
        for (service, _) in &exited {
            self.running.remove(service.name());
        }
        exited
    }

    /// Stops every service with SIGTERM (SIGKILL after 10 s).
    pub async fn stop_all(&mut self) {
        for running in self.running.values() {
            if let Some(pid) = running.child.id() {
                // SAFETY: kill(2) on our own child's pid with a valid signal.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
        for (name, mut running) in std::mem::take(&mut self.running) {
            match tokio::time::timeout(Duration::from_secs(10), running.child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    eprintln!("{name} service did not stop within 10 s; killing it");
                    let _ = running.child.kill().await;
                }
            }
        }
    }
}
