//! The threaded store executor every engine's [`Store`](crate::store::Store)
//! runs on: one writer thread with group commit, and a pool of reader
//! threads, each owning one connection.
//!
//! [`Store::write`](crate::store::Store::write) and
//! [`Store::read`](crate::store::Store::read) hand a closure to those threads
//! over a channel and complete a oneshot, so a transaction never spans an
//! `.await`. The engine supplies only what differs, through
//! [`EngineConnection`]: opening (and reopening) a connection, how a
//! transaction begins and ends, and its [`Tx`]. The executor is generic over
//! it (monomorphised: no dynamic dispatch per statement).
//!
//! - **Group commit.** While jobs arrive one at a time, the writer runs each
//!   in a transaction of its own (no savepoint). When several are queued, it
//!   begins one transaction, runs each job under `SAVEPOINT tandem_job` (a
//!   failing job undoes only itself) and commits once: one fsync or round
//!   trip for the group instead of one per job. If the group transaction
//!   cannot begin, the jobs run one by one.
//! - **A failed group commit** fails every job of the group with
//!   [`StoreError::Unavailable`] when the engine could not be reached or
//!   refused to work (busy, I/O, connection lost: retrying may succeed), and
//!   with [`StoreError::Engine`] otherwise (e.g. a deferred constraint that
//!   failed at commit: retrying the same work will fail again). Never
//!   `Conflict`: the job that caused it cannot be told apart.
//! - **Signals.** A commit whose work appended to the outbox bumps the
//!   executor's outbox signal.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, watch};

use crate::store::{StoreError, StoreFuture, Tx};

/// One connection of a store thread, as the engine keeps it: what the
/// executor needs of an engine.
pub trait EngineConnection: Send + 'static {
    /// The open connection transactions run on.
    type Open;

    /// The connection, opened again if it broke (called before a
    /// transaction begins).
    fn open(&mut self) -> Result<&mut Self::Open, StoreError>;

    /// The connection, only if it is still open (inside a transaction a new
    /// connection would not be in it).
    fn current(&mut self) -> Result<&mut Self::Open, StoreError> {
        self.open()
    }

    /// Called after each transaction: lets go of a connection that broke.
    fn settle(&mut self) {}

    /// Begins a write transaction (writers serialised) or a read-only one.
    fn begin(open: &mut Self::Open, write: bool) -> Result<(), StoreError>;

    /// Ends a transaction whose work succeeded: commits a write (`appended`:
    /// its work appended to the outbox), ends a read. Rolls back what it
    /// could not commit.
    fn finish(open: &mut Self::Open, write: bool, appended: bool) -> Result<(), StoreError>;

    /// Rolls back the open transaction, ignoring failure.
    fn rollback(open: &mut Self::Open);

    /// Runs statements without parameters (the savepoints of a group).
    fn execute_batch(open: &mut Self::Open, sql: &str) -> Result<(), StoreError>;

    /// Runs `work` on a [`Tx`] over the open transaction; returns its result
    /// and whether it appended to the outbox.
    fn run_work<R, E, F>(open: &mut Self::Open, work: F) -> (Result<R, E>, bool)
    where
        E: From<StoreError>,
        F: FnOnce(&mut dyn Tx) -> Result<R, E>;
}

/// Work for a store thread. Given `Some(appended)`, the job runs inside a
/// group transaction the thread opened (under a savepoint of its own), sets
/// `appended` if it wrote to the outbox, and returns what to do once the
/// group's commit is known; given `None`, it runs its own transaction and
/// answers at once (`None` back).
type Job<C> = Box<
    dyn FnOnce(
            Result<&mut <C as EngineConnection>::Open, StoreError>,
            Option<&mut bool>,
            &watch::Sender<u64>,
        ) -> Option<Reply>
        + Send,
>;
type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// Most write jobs committed together by one group commit.
const MAX_GROUP: usize = 256;

const SAVEPOINT: &str = "SAVEPOINT tandem_job";
const RELEASE: &str = "RELEASE SAVEPOINT tandem_job";
const UNDO: &str = "ROLLBACK TO SAVEPOINT tandem_job; RELEASE SAVEPOINT tandem_job";

/// The writer thread and reader pool of one store. Dropping it (with the
/// store's last handle) ends the threads once their queued jobs are done;
/// [`Executor::close`] ends them now and waits until their connections are
/// closed.
pub struct Executor<C: EngineConnection> {
    writer: mpsc::Sender<Job<C>>,
    readers: mpsc::Sender<Job<C>>,
    outbox_signal: watch::Sender<u64>,
    closing: Arc<std::sync::atomic::AtomicBool>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl<C: EngineConnection> Executor<C> {
    /// Starts the writer thread on `writer` and one reader thread on each of
    /// `readers` (at least one), named `{name}-writer` and `{name}-reader-N`.
    /// `store` names the database in the commit-duration metric
    /// (`tandem_store_commit_duration_seconds{store}`): a file's stem, a
    /// database's name.
    pub fn start(name: &str, store: &str, writer: C, readers: Vec<C>) -> Result<Self, StoreError> {
        let (outbox_signal, _) = watch::channel(0u64);
        let closing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut threads = Vec::new();
        let (writer_sender, writer_receiver) = mpsc::channel::<Job<C>>();
        let writer_signal = outbox_signal.clone();
        let commits = crate::metrics::metrics()
            .store_commit_duration
            .get_or_create_owned(&crate::metrics::StoreLabels {
                store: store.to_owned(),
            });
        let writer_closing = Arc::clone(&closing);
        threads.push(
            std::thread::Builder::new()
                .name(format!("{name}-writer"))
                .spawn(move || {
                    COMMITS.with(|slot| *slot.borrow_mut() = Some(commits));
                    writer_loop(writer, writer_receiver, writer_signal, &writer_closing)
                })
                .map_err(|error| {
                    StoreError::Engine(format!("cannot start writer thread: {error}").into())
                })?,
        );
        let (reader_sender, reader_receiver) = mpsc::channel::<Job<C>>();
        let reader_receiver = Arc::new(Mutex::new(reader_receiver));
        for (index, reader) in readers.into_iter().enumerate() {
            let receiver = Arc::clone(&reader_receiver);
            let signal = outbox_signal.clone();
            let reader_closing = Arc::clone(&closing);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("{name}-reader-{index}"))
                    .spawn(move || reader_loop(reader, &receiver, &signal, &reader_closing))
                    .map_err(|error| {
                        StoreError::Engine(format!("cannot start reader thread: {error}").into())
                    })?,
            );
        }
        Ok(Self {
            writer: writer_sender,
            readers: reader_sender,
            outbox_signal,
            closing,
            threads: Mutex::new(threads),
        })
    }

    /// Ends the writer and reader threads and waits (blocking) until each
    /// has closed its connection. Jobs queued on the writer before the call
    /// still run; a job asked for afterwards fails as unavailable. Safe to
    /// call more than once.
    pub fn close(&self) {
        use std::sync::atomic::Ordering;
        self.closing.store(true, Ordering::Release);
        let threads = std::mem::take(&mut *self.threads.lock().expect("executor threads lock"));
        if threads.is_empty() {
            return;
        }
        // One wake-up for each thread: a job that does nothing.
        let wake = || -> Job<C> { Box::new(|_, _, _| None) };
        let _ = self.writer.send(wake());
        for _ in 1..threads.len() {
            let _ = self.readers.send(wake());
        }
        for thread in threads {
            let _ = thread.join();
        }
    }

    /// A receiver of the counter bumped by every commit that appended to the
    /// outbox.
    pub fn outbox_signal(&self) -> watch::Receiver<u64> {
        self.outbox_signal.subscribe()
    }

    /// Queues `work` (at once, before the future is polled) on the writer
    /// (`write`) or the reader pool.
    pub fn run<R, E, F>(&self, write: bool, work: F) -> StoreFuture<R, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
        F: FnOnce(&mut dyn Tx) -> Result<R, E> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        // The caller's span goes with the work to the store's thread, so
        // what the work logs or appends belongs to it (an event appended
        // in a request carries the request's trace).
        let span = crate::trace::enabled().then(tracing::Span::current);
        let job: Job<C> = Box::new(
            move |open: Result<&mut C::Open, StoreError>,
                  group: Option<&mut bool>,
                  signal: &watch::Sender<u64>| {
                let _entered = span.as_ref().map(tracing::Span::enter);
                let grouped = group.is_some();
                let result = match open {
                    Err(error) => Err(E::from(error)),
                    Ok(open) => match group {
                        Some(appended) => run_in_savepoint::<C, R, E, F>(open, work, appended),
                        None => run_transaction::<C, R, E, F>(open, write, work, signal),
                    },
                };
                if !grouped {
                    let _ = reply.send(result);
                    return None;
                }
                Some(Box::new(move |committed: Result<(), StoreError>| {
                    let outcome = match (result, committed) {
                        (Ok(value), Ok(())) => Ok(value),
                        (Ok(_), Err(error)) => Err(E::from(error)),
                        (Err(error), _) => Err(error),
                    };
                    let _ = reply.send(outcome);
                }) as Reply)
            },
        );
        let sender = if write { &self.writer } else { &self.readers };
        let sent = sender
            .send(job)
            .map_err(|_| StoreError::Unavailable("store threads have stopped".into()));
        Box::pin(async move {
            sent.map_err(E::from)?;
            answer
                .await
                .map_err(|_| E::from(StoreError::Engine("store thread dropped the job".into())))?
        })
    }
}

thread_local! {
    /// On a store's writer thread, the histogram its commits are timed in.
    static COMMITS: std::cell::RefCell<Option<prometheus_client::metrics::histogram::Histogram>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `commit`, timing it on a writer thread.
fn timed_commit(commit: impl FnOnce() -> Result<(), StoreError>) -> Result<(), StoreError> {
    if !crate::metrics::enabled() {
        return commit();
    }
    let started = std::time::Instant::now();
    let committed = commit();
    COMMITS.with(|slot| {
        if let Some(histogram) = &*slot.borrow() {
            histogram.observe(started.elapsed().as_secs_f64());
        }
    });
    committed
}

/// Runs a job alone, in a transaction of its own.
fn run_alone<C: EngineConnection>(connection: &mut C, job: Job<C>, signal: &watch::Sender<u64>) {
    let answered = job(connection.open(), None, signal);
    debug_assert!(answered.is_none(), "a lone job answers by itself");
    connection.settle();
}

/// The writer thread: runs jobs one transaction each while they arrive one
/// at a time; when several are queued, runs them in one transaction, each
/// under its own savepoint, and commits once.
fn writer_loop<C: EngineConnection>(
    mut connection: C,
    jobs: mpsc::Receiver<Job<C>>,
    signal: watch::Sender<u64>,
    closing: &std::sync::atomic::AtomicBool,
) {
    let mut group: Vec<Job<C>> = Vec::new();
    let mut replies: Vec<Reply> = Vec::new();
    while let Ok(first) = jobs.recv() {
        if closing.load(std::sync::atomic::Ordering::Acquire) {
            // What was queued before the close still runs, one by one.
            run_alone(&mut connection, first, &signal);
            while let Ok(job) = jobs.try_recv() {
                run_alone(&mut connection, job, &signal);
            }
            return;
        }
        group.push(first);
        while group.len() < MAX_GROUP {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        if group.len() == 1 {
            let job = group.pop().expect("one job");
            run_alone(&mut connection, job, &signal);
            continue;
        }
        let begun = connection.open().and_then(|open| C::begin(open, true));
        if let Err(error) = begun {
            tracing::debug!(%error, "group transaction refused; running the jobs one by one");
            for job in group.drain(..) {
                run_alone(&mut connection, job, &signal);
            }
            continue;
        }
        let mut appended = false;
        for job in group.drain(..) {
            replies.extend(job(connection.current(), Some(&mut appended), &signal));
        }
        let committed = connection
            .current()
            .and_then(|open| timed_commit(|| C::finish(open, true, appended)));
        connection.settle();
        if committed.is_ok() && appended {
            signal.send_modify(|count| *count = count.wrapping_add(1));
        }
        for reply in replies.drain(..) {
            reply(group_outcome(&committed));
        }
    }
}

/// What each job of a group learns of the group's commit (see the module
/// documentation).
fn group_outcome(committed: &Result<(), StoreError>) -> Result<(), StoreError> {
    match committed {
        Ok(()) => Ok(()),
        Err(StoreError::Unavailable(error)) => Err(StoreError::Unavailable(
            format!("group commit failed: {error}").into(),
        )),
        Err(error) => Err(StoreError::Engine(
            format!("group commit failed: {error}").into(),
        )),
    }
}

fn reader_loop<C: EngineConnection>(
    mut connection: C,
    jobs: &Mutex<mpsc::Receiver<Job<C>>>,
    signal: &watch::Sender<u64>,
    closing: &std::sync::atomic::AtomicBool,
) {
    loop {
        if closing.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let job = {
            let Ok(receiver) = jobs.lock() else {
                return;
            };
            match receiver.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        run_alone(&mut connection, job, signal);
        if closing.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
    }
}

/// Runs one job of a group under a savepoint.
fn run_in_savepoint<C, R, E, F>(open: &mut C::Open, work: F, appended: &mut bool) -> Result<R, E>
where
    C: EngineConnection,
    E: From<StoreError>,
    F: FnOnce(&mut dyn Tx) -> Result<R, E>,
{
    C::execute_batch(open, SAVEPOINT).map_err(E::from)?;
    let (result, job_appended) = C::run_work(open, work);
    match result {
        Ok(value) => {
            C::execute_batch(open, RELEASE).map_err(E::from)?;
            *appended |= job_appended;
            Ok(value)
        }
        Err(error) => {
            let _ = C::execute_batch(open, UNDO);
            Err(error)
        }
    }
}

/// Runs `work` in a transaction of its own on `open`: commits a write that
/// succeeded (and bumps `signal` if it appended to the outbox), ends a read,
/// rolls back work that failed.
pub fn run_transaction<C, R, E, F>(
    open: &mut C::Open,
    write: bool,
    work: F,
    signal: &watch::Sender<u64>,
) -> Result<R, E>
where
    C: EngineConnection,
    E: From<StoreError>,
    F: FnOnce(&mut dyn Tx) -> Result<R, E>,
{
    C::begin(open, write).map_err(E::from)?;
    let (result, appended) = C::run_work(open, work);
    match result {
        Ok(value) => {
            if write {
                timed_commit(|| C::finish(open, write, appended)).map_err(E::from)?;
            } else {
                C::finish(open, write, appended).map_err(E::from)?;
            }
            if write && appended {
                signal.send_modify(|count| *count = count.wrapping_add(1));
            }
            Ok(value)
        }
        Err(error) => {
            C::rollback(open);
            Err(error)
        }
    }
}
