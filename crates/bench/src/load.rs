//! The load: publish N jobs with a pipelined confirming publisher, collect one
//! result per job from our own queue, and time each job from publish to result.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Confirmation};
use mail_dispatch_broker::json_properties;
use serde::Deserialize;

/// Confirms the publisher may wait for at once.
const MAX_UNCONFIRMED: usize = 1000;
/// Fail when no result arrives for this long.
const STALL: Duration = Duration::from_secs(120);

/// A job message, ready to publish.
#[derive(Clone, Debug)]
pub struct Job {
    pub id: String,
    pub body: Vec<u8>,
}

/// Where and how to publish, and where results come back.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub label: &'static str,
    pub exchange: String,
    pub routing_key: String,
    /// Our queue bound to the results exchange.
    pub results_queue: String,
    /// At most this many jobs published without a result yet (0: no limit).
    pub window: usize,
    pub timeout: Duration,
}

/// What a load run measured.
#[derive(Clone, Debug)]
pub struct LoadOutcome {
    pub jobs: usize,
    /// First publish to last result.
    pub wall: Duration,
    /// First publish to last publisher confirm.
    pub publish_wall: Duration,
    /// Enqueue → result, one per job, sorted.
    pub latencies: Vec<Duration>,
    /// Results by `status/provider`.
    pub outcomes: BTreeMap<String, usize>,
    /// Results for a job id that already had one.
    pub duplicates: usize,
    /// First publish to the result that made 99 % of the jobs answered (a few
    /// retried jobs do not hide the rate of the rest).
    pub wall_99: Duration,
}

impl LoadOutcome {
    pub fn throughput(&self) -> f64 {
        self.jobs as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    pub fn throughput_99(&self) -> f64 {
        (self.jobs as f64 * 0.99).ceil() / self.wall_99.as_secs_f64().max(1e-9)
    }

    pub fn publish_rate(&self) -> f64 {
        self.jobs as f64 / self.publish_wall.as_secs_f64().max(1e-9)
    }

    /// Nearest-rank percentile, in milliseconds.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * self.latencies.len() as f64).ceil() as usize;
        let i = rank.clamp(1, self.latencies.len()) - 1;
        self.latencies[i].as_secs_f64() * 1000.0
    }

    pub fn mean_ms(&self) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let sum: f64 = self.latencies.iter().map(Duration::as_secs_f64).sum();
        sum * 1000.0 / self.latencies.len() as f64
    }
}

/// The result message, as far as we read it.
#[derive(Deserialize)]
struct ResultBody {
    job_id: Option<String>,
    status: Option<String>,
    provider: Option<String>,
}

type Pending = Arc<Mutex<HashMap<String, Instant>>>;

/// Publishes every job and waits for every result. `results` must already be
/// bound to the results exchange (results published while nothing is bound are lost).
pub async fn run(
    publisher: Channel,
    consumer_channel: Channel,
    spec: &LoadSpec,
    jobs: &[Job],
) -> anyhow::Result<LoadOutcome> {
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut results = consumer_channel
        .basic_consume(
            spec.results_queue.as_str().into(),
            format!("bench-{}", spec.label).into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .context("consuming our results queue")?;

    let pending: Pending = Arc::new(Mutex::new(HashMap::with_capacity(jobs.len())));
    let window = (spec.window > 0).then(|| Arc::new(tokio::sync::Semaphore::new(spec.window)));
    let started = Instant::now();
    let publishing = {
        let pending = pending.clone();
        let window = window.clone();
        let jobs = jobs.to_vec();
        let spec = spec.clone();
        let publisher = publisher.clone();
        tokio::spawn(async move { publish_all(&publisher, &spec, &jobs, &pending, window).await })
    };

    let total = jobs.len();
    let mut latencies = Vec::with_capacity(total);
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen: HashSet<String> = HashSet::with_capacity(total);
    let mut duplicates = 0;
    let mut last_result = started;
    let mut wall_99 = None;
    let n_99 = ((total as f64) * 0.99).ceil() as usize;
    let mut last_progress = Instant::now();
    let deadline = tokio::time::Instant::now() + spec.timeout;
    let mut publishing = publishing;
    let mut publish_done: Option<Instant> = None;

    while seen.len() < total {
        let wait = tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + STALL),
            results.next(),
        );
        let next = tokio::select! {
            r = wait => r,
            p = &mut publishing, if publish_done.is_none() => {
                publish_done = Some(p.context("publisher task")??);
                continue;
            }
        };
        let delivery = match next {
            Ok(Some(Ok(d))) => d,
            Ok(Some(Err(e))) => bail!("{}: results consumer failed: {e}", spec.label),
            Ok(None) => bail!("{}: results consumer closed", spec.label),
            Err(_) => bail!(
                "{}: only {} of {total} results after {:.0} s ({})",
                spec.label,
                seen.len(),
                started.elapsed().as_secs_f64(),
                if tokio::time::Instant::now() >= deadline {
                    "timeout"
                } else {
                    "no result for 120 s"
                }
            ),
        };
        if !delivery.routing_key.as_str().starts_with("result.") {
            continue;
        }
        let now = Instant::now();
        let body: Option<ResultBody> = serde_json::from_slice(&delivery.data).ok();
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned())
            .or_else(|| body.as_ref().and_then(|b| b.job_id.clone()));
        let Some(id) = id else { continue };
        let Some(published) = pending.lock().expect("poisoned").remove(&id) else {
            if seen.contains(&id) {
                duplicates += 1;
            }
            continue;
        };
        seen.insert(id);
        latencies.push(now - published);
        last_result = now;
        if seen.len() == n_99.max(1) {
            wall_99 = Some(now - started);
        }
        if let Some(w) = &window {
            w.add_permits(1);
        }
        let key = body
            .map(|b| {
                format!(
                    "{}/{}",
                    b.status.unwrap_or_else(|| "?".into()),
                    b.provider.unwrap_or_else(|| "none".into())
                )
            })
            .unwrap_or_else(|| "unreadable".into());
        *outcomes.entry(key).or_default() += 1;
        if last_progress.elapsed() > Duration::from_secs(5) {
            last_progress = Instant::now();
            eprintln!(
                "[bench] {}: {}/{total} results, {:.0} jobs/s so far",
                spec.label,
                seen.len(),
                seen.len() as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    let publish_done = match publish_done {
        Some(t) => t,
        None => publishing.await.context("publisher task")??,
    };
    latencies.sort();
    // Closing the channels cancels our consumer, so a later load on the same
    // queue is not shared with it.
    let _ = consumer_channel.close(200, "done".into()).await;
    let _ = publisher.close(200, "done".into()).await;
    Ok(LoadOutcome {
        jobs: total,
        wall: last_result - started,
        publish_wall: publish_done - started,
        latencies,
        outcomes,
        duplicates,
        wall_99: wall_99.unwrap_or(last_result - started),
    })
}

/// Publishes with up to `MAX_UNCONFIRMED` confirms outstanding; returns when the
/// last confirm arrived.
async fn publish_all(
    channel: &Channel,
    spec: &LoadSpec,
    jobs: &[Job],
    pending: &Pending,
    window: Option<Arc<tokio::sync::Semaphore>>,
) -> anyhow::Result<Instant> {
    let mut confirms = FuturesUnordered::new();
    let exchange = ShortString::from(spec.exchange.as_str());
    let routing_key = ShortString::from(spec.routing_key.as_str());
    for job in jobs {
        if let Some(w) = &window {
            w.acquire().await.expect("never closed").forget();
        }
        while confirms.len() >= MAX_UNCONFIRMED {
            check(confirms.next().await)?;
        }
        let properties = json_properties()
            .with_message_id(job.id.as_str().into())
            .with_timestamp(chrono::Utc::now().timestamp() as u64);
        pending
            .lock()
            .expect("poisoned")
            .insert(job.id.clone(), Instant::now());
        let confirm = channel
            .basic_publish(
                exchange.clone(),
                routing_key.clone(),
                BasicPublishOptions::default(),
                &job.body,
                properties,
            )
            .await
            .context("publishing a job")?;
        confirms.push(confirm);
    }
    while let Some(c) = confirms.next().await {
        check(Some(c))?;
    }
    Ok(Instant::now())
}

fn check(confirm: Option<Result<Confirmation, lapin::Error>>) -> anyhow::Result<()> {
    match confirm {
        None | Some(Ok(Confirmation::Ack(None) | Confirmation::NotRequested)) => Ok(()),
        Some(Ok(Confirmation::Ack(Some(_)))) => bail!("a job was returned unroutable"),
        Some(Ok(Confirmation::Nack(_))) => bail!("the broker refused a job (nack)"),
        Some(Err(e)) => Err(e).context("waiting for a publisher confirm"),
    }
}
