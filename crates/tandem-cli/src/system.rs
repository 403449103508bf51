//! The commerce system as OS processes: `tandem serve` children, by
//! default one per service on the embedded engines in one data directory.
//! Used by `tandem up`, `tandem demo` and the end-to-end tests, which also
//! run it on other engines ([`System::with_engines`]) and with several
//! instances of a service ([`System::start_instance`]).
//!
//! On Linux each child gets SIGTERM when the thread that started it exits
//! (`PR_SET_PDEATHSIG`), so a supervisor killed with SIGKILL does not leave
//! services holding their ports. Start services from a thread that lives as
//! long as the system: `tandem up` does from its main thread, a Tokio
//! worker thread lives as long as its runtime; a `spawn_blocking` thread
//! does not.

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

/// How long the services get to stop after SIGTERM: longer than a
/// service's own shutdown deadline for draining connections (10 s).
const STOP_DEADLINE: Duration = Duration::from_secs(15);

struct Running {
    child: Child,
}

pub struct System {
    data_dir: PathBuf,
    executable: PathBuf,
    /// The address of each instance of each service, fixed at its first
    /// start so restarts keep their URL.
    addresses: BTreeMap<(&'static str, usize), String>,
    base_port: u16,
    running: BTreeMap<(&'static str, usize), Running>,
    http: reqwest::Client,
    /// Engine URLs other than the embedded default.
    bus: Option<String>,
    dbs: BTreeMap<&'static str, String>,
    /// Where each instance's log goes, and its filter (default: inherited
    /// stderr and the process's own `TANDEM_LOG`).
    logs: Option<(PathBuf, String)>,
    /// Environment variables given to a service's processes at their next
    /// start, beyond the inherited ones.
    env: BTreeMap<&'static str, BTreeMap<String, String>>,
    /// How long [`System::stop_all`] waits for the services to exit after
    /// SIGTERM before it kills them.
    stop_deadline: Duration,
}

impl System {
    /// Sets (`Some`) or removes (`None`) an environment variable of
    /// `service`'s processes; it takes effect at their next start.
    pub fn set_env(&mut self, service: Service, name: &str, value: Option<&str>) {
        let vars = self.env.entry(service.name()).or_default();
        match value {
            Some(value) => vars.insert(name.to_owned(), value.to_owned()),
            None => vars.remove(name),
        };
    }

    /// Prepares a system in `data_dir`; `base_port` 0 picks free ports.
    pub fn new(data_dir: &Path, base_port: u16) -> anyhow::Result<Self> {
        let data_dir = crate::data_dir::prepare(data_dir)?;
        Ok(Self {
            data_dir,
            executable: std::env::current_exe().context("cannot find the tandem executable")?,
            addresses: BTreeMap::new(),
            base_port,
            running: BTreeMap::new(),
            bus: None,
            dbs: BTreeMap::new(),
            logs: None,
            stop_deadline: STOP_DEADLINE,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .context("cannot build the HTTP client")?,
            env: BTreeMap::new(),
        })
    }

    /// Runs services from `executable` instead of this process's own
    /// (the tests run the built `tandem` binary).
    pub fn with_executable(mut self, executable: impl Into<PathBuf>) -> Self {
        self.executable = executable.into();
        self
    }

    /// Runs the services on the bus `bus` with the databases `dbs` (one URL
    /// per service; a service not named keeps its SQLite file).
    pub fn with_engines(mut self, bus: impl Into<String>, dbs: &[(Service, String)]) -> Self {
        self.bus = Some(bus.into());
        self.dbs = dbs
            .iter()
            .map(|(service, url)| (service.name(), url.clone()))
            .collect();
        self
    }

    /// Gives the services `deadline` to stop after SIGTERM in
    /// [`System::stop_all`] (default 15 s) before they are killed.
    pub fn with_stop_deadline(mut self, deadline: Duration) -> Self {
        self.stop_deadline = deadline;
        self
    }

    /// Writes each instance's log to `<data dir>/<service>-<instance>.log`
    /// with the `TANDEM_LOG` filter `filter` instead of this process's
    /// stderr.
    pub fn with_log_files(mut self, filter: impl Into<String>) -> Self {
        self.logs = Some((self.data_dir.clone(), filter.into()));
        self
    }

    /// The log file of an instance (see [`System::with_log_files`]).
    pub fn log_file(&self, service: Service, instance: usize) -> Option<PathBuf> {
        self.logs
            .as_ref()
            .map(|(dir, _)| dir.join(format!("{}-{instance}.log", service.name())))
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn bus_url(&self) -> String {
        match &self.bus {
            Some(bus) => bus.clone(),
            None => format!("sqlite://{}", self.data_dir.join("bus.db").display()),
        }
    }

    pub fn db_url(&self, service: Service) -> String {
        if let Some(url) = self.dbs.get(service.name()) {
            return url.clone();
        }
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

    /// The service's base URL, e.g. `http://127.0.0.1:8083` (its first
    /// instance's).
    pub fn url(&self, service: Service) -> anyhow::Result<String> {
        self.instance_url(service, 0)
    }

    /// The base URL of one instance of a service.
    pub fn instance_url(&self, service: Service, instance: usize) -> anyhow::Result<String> {
        self.addresses
            .get(&(service.name(), instance))
            .map(|address| format!("http://{address}"))
            .with_context(|| {
                format!(
                    "{} service instance {instance} was never started",
                    service.name()
                )
            })
    }

    pub fn is_running(&self, service: Service) -> bool {
        self.running.contains_key(&(service.name(), 0))
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
        self.start_instance(service, 0).await
    }

    /// Starts instance `instance` of a service (again) and waits until it
    /// is ready. Instances of one service share its database and the bus.
    pub async fn start_instance(
        &mut self,
        service: Service,
        instance: usize,
    ) -> anyhow::Result<()> {
        let key = (service.name(), instance);
        if self.running.contains_key(&key) {
            return Ok(());
        }
        let listen = match self.addresses.get(&key) {
            Some(address) => address.clone(),
            None if self.base_port == 0 || instance > 0 => "127.0.0.1:0".to_owned(),
            None => {
                let offset = service.default_port() - Service::Customer.default_port();
                format!("127.0.0.1:{}", self.base_port + offset)
            }
        };
        let mut command = Command::new(&self.executable);
        command
            .args(["serve", service.name(), "--listen", &listen])
            .args(["--db", &self.db_url(service), "--bus", &self.bus_url()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(vars) = self.env.get(service.name()) {
            command.envs(vars);
        }
        die_with_parent(&mut command);
        if let (Some((_, filter)), Some(path)) = (&self.logs, self.log_file(service, instance)) {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            command.stderr(file).env("TANDEM_LOG", filter);
        }
        let mut child = command
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
        self.addresses.insert(key, address);
        self.running.insert(key, Running { child });
        let ready = self.wait_ready(service, instance).await;
        if ready.is_err() {
            // Not counted as running: a later start begins afresh.
            if let Some(mut running) = self.running.remove(&key) {
                let _ = running.child.kill().await;
            }
        }
        ready
    }

    async fn wait_ready(&mut self, service: Service, instance: usize) -> anyhow::Result<()> {
        let url = format!("{}/ready", self.instance_url(service, instance)?);
        let deadline = tokio::time::Instant::now() + START_DEADLINE;
        loop {
            if let Ok(response) = self.http.get(&url).send().await {
                if response.status().is_success() {
                    return Ok(());
                }
            }
            if let Some(running) = self.running.get_mut(&(service.name(), instance)) {
                if let Ok(Some(status)) = running.child.try_wait() {
                    bail!(
                        "{} service exited during start-up ({status})",
                        service.name()
                    );
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
        self.kill_instance(service, 0).await
    }

    /// Kills one instance of a service with SIGKILL.
    pub async fn kill_instance(&mut self, service: Service, instance: usize) -> anyhow::Result<()> {
        if let Some(mut running) = self.running.remove(&(service.name(), instance)) {
            running.child.kill().await?;
        }
        Ok(())
    }

    /// Stops a service's instances as a clean shutdown would: SIGTERM,
    /// then SIGKILL if they are still running after the stop deadline.
    pub async fn stop(&mut self, service: Service) {
        let keys: Vec<_> = self
            .running
            .keys()
            .filter(|key| key.0 == service.name())
            .cloned()
            .collect();
        for key in keys {
            let Some(mut running) = self.running.remove(&key) else {
                continue;
            };
            if let Some(pid) = running.child.id() {
                // SAFETY: kill(2) on our own child's pid with a valid signal.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            if tokio::time::timeout(self.stop_deadline, running.child.wait())
                .await
                .is_err()
            {
                let _ = running.child.kill().await;
            }
        }
    }

    /// Returns the services whose process has exited on its own.
    pub fn exited(&mut self) -> Vec<(Service, std::process::ExitStatus)> {
        let mut exited = Vec::new();
        for service in Service::ALL {
            for (key, running) in self.running.iter_mut() {
                if key.0 != service.name() {
                    continue;
                }
                if let Ok(Some(status)) = running.child.try_wait() {
                    exited.push((service, key.1, status));
                }
            }
        }
        for (service, instance, _) in &exited {
            self.running.remove(&(service.name(), *instance));
        }
        exited
            .into_iter()
            .map(|(service, _, status)| (service, status))
            .collect()
    }

    /// Stops every service: SIGTERM to all, then one deadline for all of
    /// them to exit (see [`System::with_stop_deadline`]), then SIGKILL to
    /// those still running.
    pub async fn stop_all(&mut self) {
        let running = std::mem::take(&mut self.running);
        for running in running.values() {
            if let Some(pid) = running.child.id() {
                // SAFETY: kill(2) on our own child's pid with a valid signal.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
        let stop_deadline = self.stop_deadline;
        let deadline = tokio::time::Instant::now() + stop_deadline;
        let mut stopping = tokio::task::JoinSet::new();
        for ((name, _), mut running) in running {
            stopping.spawn(async move {
                if tokio::time::timeout_at(deadline, running.child.wait())
                    .await
                    .is_err()
                {
                    eprintln!("{name} service did not stop within {stop_deadline:?}; killing it");
                    let _ = running.child.kill().await;
                }
            });
        }
        while stopping.join_next().await.is_some() {}
    }
}

/// Has the child get SIGTERM when the thread that starts it exits (Linux:
/// `PR_SET_PDEATHSIG`); a child whose parent is already gone by then does
/// not start.
fn die_with_parent(command: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs in the child between fork and exec and
        // makes only async-signal-safe calls (prctl, getppid), allocating
        // nothing.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}
