//! A small asynchronous I/O layer for storage controllers: an [`IoEngine`] runs jobs (closures
//! that do image I/O and guest-memory copies, then deliver their completion) off the vCPU thread.
//!
//! Principle: a register access that starts I/O only *submits* a job and returns; the job runs
//! on the engine's worker thread (`hvmdm-io-<name>`, spawned on the first submit) and completes
//! the command itself — typically by locking the controller through a `Weak` handle, setting the
//! final status and raising the interrupt. The engine knows nothing about controllers.
//!
//! Locking rule for users: a job's completion usually takes the controller lock, so **never call
//! [`IoEngine::drain`] while holding a lock that a queued job needs** (drain would wait for a job
//! that waits for the caller). Controllers therefore expose a drain entry point that clones the
//! engine handle under their lock, releases the lock, and only then drains.
//!
//! Queue bound: the queue itself is unbounded; callers bound it by protocol. IDE has at most one
//! live job per drive (the drive is BSY until the job completes, and commands to a BSY drive are
//! ignored); jobs orphaned by a reset still finish their host I/O, and the controller refuses new
//! work once [`IoEngine::in_flight`] exceeds a small limit, so a guest cannot grow the queue.
//!
//! Modes:
//! - [`IoEngine::new`]: one worker thread, jobs run in submission order (FIFO).
//! - [`IoEngine::manual`]: no thread; queued jobs run on the thread that calls
//!   [`IoEngine::drain`]. Deterministic, for fuzz targets and tests that want to look at the
//!   in-flight state and then let it complete.
//!
//! Dropping an engine runs every queued job to completion (on the worker, or inline for a manual
//! engine) and joins the worker, unless the drop happens on the worker itself (a job held the
//! last reference to the controller owning the engine): then the worker finishes the queue and
//! exits on its own.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{JoinHandle, ThreadId};

use thiserror::Error;

/// A unit of work: does its I/O and delivers its own completion.
pub type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Debug, Error)]
pub enum AioError {
    #[error("cannot start I/O thread hvmdm-io-{name}: {source}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O engine {0} is shutting down")]
    ShutDown(String),
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    /// Queued plus running jobs.
    in_flight: usize,
    shutdown: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Signalled when a job is queued or shutdown is requested.
    work: Condvar,
    /// Signalled when `in_flight` drops to zero.
    idle: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Jobs run outside this lock and panics in them are caught, so poisoning cannot leave
        // the counters inconsistent; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs one job, then accounts for it (even if it panicked: drain must never hang).
    fn run(&self, job: Job, name: &str) {
        if catch_unwind(AssertUnwindSafe(job)).is_err() {
            log::error!("hvmdm-io-{name}: an I/O job panicked; its command never completes");
        }
        let mut st = self.lock();
        st.in_flight -= 1;
        if st.in_flight == 0 {
            self.idle.notify_all();
        }
    }
}

struct Worker {
    handle: JoinHandle<()>,
    id: ThreadId,
}

/// A job queue with (for [`IoEngine::new`]) one lazily spawned worker thread.
pub struct IoEngine {
    name: String,
    manual: bool,
    shared: Arc<Shared>,
    worker: Mutex<Option<Worker>>,
}

impl std::fmt::Debug for IoEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoEngine")
            .field("name", &self.name)
            .field("manual", &self.manual)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl IoEngine {
    /// A threaded engine; the worker `hvmdm-io-<name>` starts with the first job.
    pub fn new(name: &str) -> Self {
        Self::build(name, false)
    }

    /// An engine without a thread: jobs wait until [`IoEngine::drain`] runs them on the caller.
    pub fn manual(name: &str) -> Self {
        Self::build(name, true)
    }

    fn build(name: &str, manual: bool) -> Self {
        IoEngine { name: name.to_string(), manual, shared: Arc::default(), worker: Mutex::new(None) }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_manual(&self) -> bool {
        self.manual
    }

    /// Jobs submitted and not yet finished (queued or running).
    pub fn in_flight(&self) -> usize {
        self.shared.lock().in_flight
    }

    /// Queues `job`. Never blocks on other jobs. Fails only if the worker thread cannot be
    /// created (the job is dropped unrun) or the engine is being dropped.
    pub fn submit(&self, job: Job) -> Result<(), AioError> {
        if !self.manual {
            self.ensure_worker()?;
        }
        let mut st = self.shared.lock();
        if st.shutdown {
            return Err(AioError::ShutDown(self.name.clone()));
        }
        st.queue.push_back(job);
        st.in_flight += 1;
        self.shared.work.notify_one();
        Ok(())
    }

    /// Waits until every job submitted so far (and any they submit) has finished. A manual
    /// engine runs them here. Must not be called while holding a lock the jobs take; called from
    /// a job of this engine it returns at once (waiting would deadlock) with an error log.
    pub fn drain(&self) {
        if self.manual {
            loop {
                let job = self.shared.lock().queue.pop_front();
                match job {
                    Some(job) => self.shared.run(job, &self.name),
                    None => break,
                }
            }
        }
        if self.on_worker() {
            log::error!("hvmdm-io-{}: drain() called from its own worker; not waiting", self.name);
            return;
        }
        let mut st = self.shared.lock();
        while st.in_flight > 0 {
            st = self.shared.idle.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn on_worker(&self) -> bool {
        let w = self.worker.lock().unwrap_or_else(|p| p.into_inner());
        w.as_ref().is_some_and(|w| w.id == std::thread::current().id())
    }

    fn ensure_worker(&self) -> Result<(), AioError> {
        let mut w = self.worker.lock().unwrap_or_else(|p| p.into_inner());
        if w.is_some() {
            return Ok(());
        }
        let shared = self.shared.clone();
        let name = self.name.clone();
        let handle = std::thread::Builder::new()
            .name(format!("hvmdm-io-{name}"))
            .spawn(move || worker_loop(&shared, &name))
            .map_err(|source| AioError::Spawn { name: self.name.clone(), source })?;
        let id = handle.thread().id();
        *w = Some(Worker { handle, id });
        Ok(())
    }
}

fn worker_loop(shared: &Shared, name: &str) {
    loop {
        let job = {
            let mut st = shared.lock();
            loop {
                if let Some(job) = st.queue.pop_front() {
                    break job;
                }
                if st.shutdown {
                    return;
                }
                st = shared.work.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        };
        shared.run(job, name);
    }
}

impl Drop for IoEngine {
    fn drop(&mut self) {
        if self.manual {
            self.drain();
        }
        self.shared.lock().shutdown = true;
        self.shared.work.notify_all();
        let worker = self.worker.get_mut().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = worker {
            if w.id == std::thread::current().id() {
                // Dropped by one of our own jobs: the worker drains the queue and exits by itself.
                return;
            }
            if w.handle.join().is_err() {
                log::error!("hvmdm-io-{}: worker thread panicked", self.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn runs_jobs_in_order_on_a_named_thread() {
        let e = IoEngine::new("t0");
        assert_eq!(e.in_flight(), 0);
        let seen = Arc::new(Mutex::new(Vec::new()));
        for i in 0..20 {
            let seen = seen.clone();
            e.submit(Box::new(move || {
                let name = std::thread::current().name().map(str::to_string);
                seen.lock().unwrap().push((i, name));
            }))
            .unwrap();
        }
        e.drain();
        assert_eq!(e.in_flight(), 0);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), (0..20).collect::<Vec<_>>());
        assert!(seen.iter().all(|s| s.1.as_deref() == Some("hvmdm-io-t0")));
    }

    #[test]
    fn submit_does_not_wait_and_drain_does() {
        let e = IoEngine::new("t1");
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        e.submit(Box::new(move || {
            go_rx.recv().unwrap();
            d.fetch_add(1, Ordering::SeqCst);
        }))
        .unwrap();
        let d = done.clone();
        e.submit(Box::new(move || {
            d.fetch_add(1, Ordering::SeqCst);
        }))
        .unwrap();
        // The first job blocks: both are in flight and nothing is done.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(e.in_flight(), 2);
        assert_eq!(done.load(Ordering::SeqCst), 0);
        let e = Arc::new(e);
        let e2 = e.clone();
        let drainer = std::thread::spawn(move || e2.drain());
        std::thread::sleep(Duration::from_millis(20));
        assert!(!drainer.is_finished(), "drain returned with a job blocked");
        go_tx.send(()).unwrap();
        drainer.join().unwrap();
        assert_eq!(done.load(Ordering::SeqCst), 2);
        assert_eq!(e.in_flight(), 0);
    }

    #[test]
    fn manual_engine_runs_only_in_drain_including_resubmitted_jobs() {
        let e = Arc::new(IoEngine::manual("m"));
        assert!(e.is_manual());
        let n = Arc::new(AtomicUsize::new(0));
        let (n2, e2) = (n.clone(), Arc::downgrade(&e));
        e.submit(Box::new(move || {
            n2.fetch_add(1, Ordering::SeqCst);
            // A job that queues a follow-up (as a completion might).
            let n3 = n2.clone();
            if let Some(e) = e2.upgrade() {
                e.submit(Box::new(move || {
                    n3.fetch_add(10, Ordering::SeqCst);
                }))
                .unwrap();
            }
        }))
        .unwrap();
        assert_eq!(e.in_flight(), 1);
        assert_eq!(n.load(Ordering::SeqCst), 0);
        e.drain();
        assert_eq!(n.load(Ordering::SeqCst), 11);
        assert_eq!(e.in_flight(), 0);
    }

    #[test]
    fn panicking_job_does_not_hang_drain() {
        for e in [IoEngine::new("p"), IoEngine::manual("pm")] {
            e.submit(Box::new(|| panic!("job failure"))).unwrap();
            let ok = Arc::new(AtomicUsize::new(0));
            let o = ok.clone();
            e.submit(Box::new(move || {
                o.fetch_add(1, Ordering::SeqCst);
            }))
            .unwrap();
            e.drain();
            assert_eq!(ok.load(Ordering::SeqCst), 1);
            assert_eq!(e.in_flight(), 0);
        }
    }

    #[test]
    fn drop_finishes_queued_jobs_and_joins() {
        let n = Arc::new(AtomicUsize::new(0));
        for e in [IoEngine::new("d"), IoEngine::manual("dm")] {
            for _ in 0..5 {
                let n = n.clone();
                e.submit(Box::new(move || {
                    std::thread::sleep(Duration::from_millis(2));
                    n.fetch_add(1, Ordering::SeqCst);
                }))
                .unwrap();
            }
            drop(e);
        }
        assert_eq!(n.load(Ordering::SeqCst), 10);
        // No thread at all until something is submitted.
        let idle = IoEngine::new("never");
        assert!(idle.worker.lock().unwrap().is_none());
        idle.drain();
    }

    #[test]
    fn drop_and_drain_from_the_worker_do_not_deadlock() {
        // The last reference to the engine goes away inside one of its jobs.
        let e = Arc::new(IoEngine::new("self"));
        let (tx, rx) = mpsc::channel();
        let holder = Arc::new(Mutex::new(Some(e.clone())));
        let h = holder.clone();
        e.submit(Box::new(move || {
            let me = h.lock().unwrap().take().unwrap();
            me.drain(); // from its own worker: returns at once
            drop(me);
            tx.send(()).unwrap();
        }))
        .unwrap();
        drop(e);
        rx.recv_timeout(Duration::from_secs(5)).expect("job did not finish");
    }
}
