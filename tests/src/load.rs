//! Steady request load for tests that break something while traffic flows: several workers
//! send requests one after another until stopped, and every outcome is kept for the test to
//! judge.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::wait_until;

/// One request of the load.
#[derive(Debug)]
pub struct Outcome {
    pub worker: usize,
    /// The worker's request count when it sent this one.
    pub n: usize,
    pub started: Instant,
    /// 0 when no response came at all.
    pub status: u16,
    /// `X-Demo-Pod` of the response.
    pub pod: String,
}

impl Outcome {
    pub fn failed(&self) -> bool {
        self.status != 200
    }
}

pub struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    workers: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `workers` tasks; worker `w` sends `request(w, n)` as its `n`th request.
    pub fn start<F>(workers: usize, request: F) -> Load
    where
        F: Fn(usize, usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
    {
        let (stop, answered) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let request = Arc::new(request);
        let workers = (0..workers)
            .map(|worker| {
                let (stop, answered, outcomes, request) =
                    (stop.clone(), answered.clone(), outcomes.clone(), request.clone());
                tokio::spawn(async move {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        let (status, pod) = match request(worker, n).send().await {
                            Ok(resp) => {
                                let pod = resp.headers().get("x-demo-pod").and_then(|v| v.to_str().ok());
                                let pod = pod.unwrap_or_default().to_owned();
                                let status = resp.status().as_u16();
                                // A body cut short is a failure too.
                                (if resp.bytes().await.is_ok() { status } else { 0 }, pod)
                            }
                            Err(_) => (0, String::new()),
                        };
                        outcomes.lock().unwrap().push(Outcome { worker, n, started, status, pod });
                        answered.fetch_add(1, Ordering::Relaxed);
                        n += 1;
                    }
                })
            })
            .collect();
        Load { stop, answered, outcomes, workers }
    }

    /// Waits until `more` requests beyond those answered so far have been answered.
    pub async fn wait_for(&self, more: usize, within: Duration) {
        let target = self.answered.load(Ordering::Relaxed) + more;
        let answered = &self.answered;
        let what = format!("{more} more requests are answered");
        wait_until(within, &what, || async move { answered.load(Ordering::Relaxed) >= target }).await;
    }

    /// Stops the workers once their requests in flight end; returns every outcome.
    pub async fn stop(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers {
            worker.await.expect("a load worker panicked");
        }
        std::mem::take(&mut *self.outcomes.lock().unwrap())
    }
}
