//! Drives workers: closed loop (each worker sends its next request as soon as the last one
//! answered: the peak rate) and open loop (requests on a fixed schedule, latency counted from
//! the scheduled time when the worker fell behind, so a stall is not hidden).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::scenario::{Env, Op, Worker};

/// What one measurement saw.
pub struct Outcome {
    pub done: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    /// Sorted.
    latencies: Vec<Duration>,
}

impl Outcome {
    pub fn rate(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }

    /// The `p`-quantile latency in milliseconds (0 when nothing was measured).
    pub fn ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let index = ((self.latencies.len() as f64 * p) as usize).min(self.latencies.len() - 1);
        self.latencies[index].as_secs_f64() * 1000.0
    }

    pub fn merge(parts: Vec<Sample>, elapsed: Duration) -> Self {
        let mut outcome = Self {
            done: 0,
            errors: 0,
            first_error: None,
            elapsed,
            latencies: Vec::new(),
        };
        for part in parts {
            outcome.done += part.latencies.len() as u64;
            outcome.errors += part.errors;
            outcome.first_error = outcome.first_error.or(part.first_error);
            outcome.latencies.extend(part.latencies);
        }
        outcome.latencies.sort_unstable();
        outcome
    }
}

/// One worker's measurements.
#[derive(Default)]
pub struct Sample {
    latencies: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
}

impl Sample {
    pub fn record(&mut self, latency: Duration, result: anyhow::Result<()>) {
        match result {
            Ok(()) => self.latencies.push(latency),
            Err(error) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| format!("{error:#}"));
            }
        }
    }
}

/// `workers` clients back to back for `warmup`, then measured for `duration`.
pub async fn closed_loop(
    env: &Arc<Env>,
    op: Op,
    workers: usize,
    warmup: Duration,
    duration: Duration,
) -> Outcome {
    let measure_from = Instant::now() + warmup;
    let deadline = measure_from + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..workers {
        let mut worker = Worker::new(Arc::clone(env), index);
        tasks.spawn(async move {
            let mut sample = Sample::default();
            let mut last_end = measure_from;
            loop {
                let started = Instant::now();
                if started >= deadline {
                    return (sample, last_end);
                }
                let result = worker.run(op).await;
                let ended = Instant::now();
                if started >= measure_from {
                    sample.record(ended - started, result);
                    last_end = ended;
                }
            }
        });
    }
    let parts = tasks.join_all().await;
    let last_end = parts.iter().map(|(_, end)| *end).max().unwrap_or(deadline);
    let samples = parts.into_iter().map(|(sample, _)| sample).collect();
    Outcome::merge(samples, last_end - measure_from)
}

/// `rate` requests per second in all, spread over `workers` clients, for `duration` or until
/// `stop` is set, whichever comes first.
pub async fn open_loop(
    env: &Arc<Env>,
    op: Op,
    rate: f64,
    workers: usize,
    duration: Duration,
    stop: Arc<AtomicBool>,
) -> Outcome {
    // Every worker opens its connections with one unmeasured request first.
    let mut ready = Vec::with_capacity(workers);
    for index in 0..workers {
        let mut worker = Worker::new(Arc::clone(env), index);
        let _ = worker.run(op).await;
        ready.push(worker);
    }
    let start = Instant::now();
    let deadline = start + duration;
    let period = Duration::from_secs_f64(workers as f64 / rate);
    let mut tasks = tokio::task::JoinSet::new();
    for (index, mut worker) in ready.into_iter().enumerate() {
        let stop = Arc::clone(&stop);
        let first = start + Duration::from_secs_f64(index as f64 / rate);
        tasks.spawn(async move {
            let mut sample = Sample::default();
            let mut scheduled = first;
            while scheduled < deadline && !stop.load(Ordering::Relaxed) {
                // Behind schedule: the wait since `scheduled` is part of the latency. On time:
                // count from the actual send, so timer slack is not blamed on the server.
                let reference = if Instant::now() >= scheduled {
                    scheduled
                } else {
                    tokio::time::sleep_until(scheduled).await;
                    Instant::now()
                };
                let result = worker.run(op).await;
                sample.record(reference.elapsed(), result);
                scheduled += period;
            }
            sample
        });
    }
    let samples = tasks.join_all().await;
    Outcome::merge(samples, start.elapsed())
}
