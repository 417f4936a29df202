//! Parallel loops for the kernels, with workers that stay awake through a forward pass.
//!
//! A decode step is about a hundred short parallel loops (a matmul is tens of microseconds)
//! separated by small serial ops. Between two loops, rayon's idle workers go to sleep and the
//! next loop waits for the kernel to wake them, which can cost about as much as a
//! small matmul itself. [`with_spinning_workers`] borrows the pool's other threads for the length
//! of a closure (a forward pass): they spin, taking the tasks of every [`for_each`] the closure
//! runs as soon as it is published, and running ordinary rayon jobs (Candle's parallel ops) while
//! there is none. Outside it, [`for_each`] is a rayon parallel loop.

use rayon::prelude::*;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

/// The tasks of one loop: `run(i)` for `i in 0..n`.
type Job<'a> = &'a (dyn Fn(usize) + Sync);

/// State shared by the thread that runs the forward pass and the spinning workers.
///
/// `claim` packs the loop's generation, its task count and the next unclaimed index in one word,
/// so a worker claims a task with one compare-and-swap that fails if a new loop was published in
/// the meantime. Task counts above `u16::MAX` fall back to rayon, see [`for_each`].
struct Crew {
    claim: AtomicU64,
    /// The current loop (it lives on the publishing thread's stack); replaced only while no
    /// task of the previous one is in flight.
    job: AtomicPtr<Job<'static>>,
    done: AtomicUsize,
    stop: AtomicBool,
    panicked: AtomicBool,
}

const MAX_CREW_TASKS: usize = u16::MAX as usize;

fn pack(generation: u64, n: usize, next: usize) -> u64 {
    (generation << 32) | ((n as u64) << 16) | next as u64
}

fn unpack(c: u64) -> (u64, usize, usize) {
    (
        c >> 32,
        ((c >> 16) & 0xffff) as usize,
        (c & 0xffff) as usize,
    )
}

impl Crew {
    /// Claims and runs tasks of the current loop until none is left; returns whether it ran any.
    fn work(&self) -> bool {
        let mut ran = false;
        loop {
            let c = self.claim.load(Ordering::Acquire);
            let (_, n, next) = unpack(c);
            if next >= n {
                return ran;
            }
            if self
                .claim
                .compare_exchange_weak(c, c + 1, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            // The loop cannot end (nor its job be replaced) before this task is counted done.
            // SAFETY: published before `claim` (release/acquire), alive until the task is done.
            let job = unsafe { *self.job.load(Ordering::Relaxed) };
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(next)));
            if ok.is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            self.done.fetch_add(1, Ordering::Release);
            ran = true;
        }
    }

    /// The loop of a borrowed worker thread, until the forward pass ends.
    fn help(&self) {
        let mut idle = 0u32;
        while !self.stop.load(Ordering::Acquire) {
            if self.work() {
                idle = 0;
                continue;
            }
            // Candle's own parallel ops are rayon jobs: run them too.
            if matches!(rayon::yield_now(), Some(rayon::Yield::Executed)) {
                idle = 0;
                continue;
            }
            idle += 1;
            if idle.is_multiple_of(256) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Publishes `job`, takes part in it and returns when all its tasks are done.
    fn run(&self, n: usize, job: Job<'_>) {
        // SAFETY: the lifetime is erased only for the time of this call: every task has
        // finished (and no worker can claim another) before it returns.
        let job: Job<'static> = unsafe { std::mem::transmute(job) };
        self.job
            .store(&job as *const Job as *mut Job, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
        let (generation, _, _) = unpack(self.claim.load(Ordering::Relaxed));
        self.claim.store(
            pack(generation.wrapping_add(1) & 0xffff_ffff, n, 0),
            Ordering::Release,
        );
        self.work();
        while self.done.load(Ordering::Acquire) < n {
            std::hint::spin_loop();
        }
        self.job.store(std::ptr::null_mut(), Ordering::Relaxed);
        if self.panicked.swap(false, Ordering::Relaxed) {
            panic!("a kernel task panicked on a worker thread");
        }
    }
}

thread_local! {
    /// The crew of the forward pass this thread is running, if any.
    static CREW: Cell<Option<&'static Crew>> = const { Cell::new(None) };
}

/// Runs `f` with the current rayon pool's other threads spinning, ready for the [`for_each`]
/// loops `f` runs on this thread. Meant for a whole forward pass: the workers burn their cores
/// until `f` returns.
pub fn with_spinning_workers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let helpers = rayon::current_num_threads().saturating_sub(1);
    if helpers == 0 || CREW.with(|c| c.get()).is_some() {
        return f();
    }
    let crew = Crew {
        claim: AtomicU64::new(0),
        job: AtomicPtr::new(std::ptr::null_mut()),
        done: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        panicked: AtomicBool::new(false),
    };
    let owner = std::thread::current().id();
    let help = || {
        // This thread may pick its own helper job up while it waits; it must not spin.
        if std::thread::current().id() != owner {
            crew.help();
        }
    };
    with_helpers(helpers, &help, || {
        struct Reset<'a>(&'a Crew);
        impl Drop for Reset<'_> {
            fn drop(&mut self) {
                self.0.stop.store(true, Ordering::Release);
                CREW.with(|c| c.set(None));
            }
        }
        // SAFETY: the thread-local is cleared (by `Reset`) before `crew` goes out of scope.
        let crew_ref: &'static Crew = unsafe { std::mem::transmute(&crew) };
        CREW.with(|c| c.set(Some(crew_ref)));
        let _reset = Reset(&crew);
        f()
    })
}

/// Runs `f` with `k` copies of `help` offered to the pool's other threads, as the second halves
/// of nested `rayon::join`s: unlike spawned jobs, they live on this thread's stack, so a forward
/// pass allocates nothing to borrow the workers.
fn with_helpers<R: Send>(k: usize, help: &(dyn Fn() + Sync), f: impl FnOnce() -> R + Send) -> R {
    match k {
        0 => f(),
        _ => rayon::join(|| with_helpers(k - 1, help, f), help).0,
    }
}

/// `task(i)` for every `i in 0..n`, in parallel: on the spinning workers inside
/// [`with_spinning_workers`], on the rayon pool elsewhere.
pub fn for_each(n: usize, task: impl Fn(usize) + Sync) {
    match n {
        0 => {}
        1 => task(0),
        _ => match CREW.with(|c| c.get()) {
            Some(crew) if n <= MAX_CREW_TASKS => {
                // a task that loops again runs that loop on rayon, not on this busy crew
                CREW.with(|c| c.set(None));
                crew.run(n, &task);
                CREW.with(|c| c.set(Some(crew)));
            }
            _ => (0..n).into_par_iter().for_each(&task),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    /// Runs `loops` loops of varied sizes; every task of every loop must run exactly once.
    fn check_loops(loops: usize) {
        for l in 0..loops {
            let n = (l * 7) % 23;
            let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
            for_each(n, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "loop {l}"
            );
        }
    }

    #[test]
    fn every_task_runs_once_with_and_without_spinning_workers() {
        for threads in [1, 2, 4] {
            pool(threads).install(|| {
                check_loops(50);
                with_spinning_workers(|| check_loops(2000));
            });
        }
        // outside any pool of ours: the global one
        with_spinning_workers(|| check_loops(100));
    }

    #[test]
    fn rayon_jobs_and_nested_loops_inside_a_pass() {
        pool(3).install(|| {
            let total = with_spinning_workers(|| {
                // Candle's ops are rayon loops; a task may itself loop.
                let s: u64 = (0..100_000u64).into_par_iter().sum();
                let inner = AtomicU32::new(0);
                for_each(4, |_| {
                    for_each(5, |_| {
                        inner.fetch_add(1, Ordering::Relaxed);
                    })
                });
                assert_eq!(inner.load(Ordering::Relaxed), 20);
                // a pass inside a pass runs as a plain closure
                with_spinning_workers(|| s + 1)
            });
            assert_eq!(total, 100_000 * 99_999 / 2 + 1);
        });
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_pool_stays_usable() {
        let p = pool(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            p.install(|| {
                with_spinning_workers(|| {
                    for_each(64, |i| {
                        if i == 40 {
                            panic!("task 40");
                        }
                    })
                })
            })
        }));
        assert!(r.is_err());
        p.install(|| with_spinning_workers(|| check_loops(100)));
    }
}
