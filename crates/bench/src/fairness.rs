//! `--scenario fairness`: one organization floods the queue against a mailbox the
//! sandbox throttles, while a quiet organization sends a trickle. Measures the
//! quiet organization's enqueue → result latency, and what the flood cost the
//! worker (deferrals, deliveries). The worker runs with its default pacing.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use lapin::Channel;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use mail_dispatch_broker::{Broker, json_properties};
use mail_dispatch_standins::StandIns;
use mail_dispatch_standins::Vendor;
use mail_dispatch_store::{PoolSettings, Store, TokenCipher};
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::ctx::Ctx;
use crate::load::Job;
use crate::prom::Scrape;
use crate::{BenchArgs, Pacing};

const FLOOD_ORG: &str = "bench-flood";
const FLOOD_ACCOUNT: &str = "admin@flood.example";
const QUIET_ORG: &str = "bench-quiet";
const QUIET_ACCOUNT: &str = "admin@quiet.example";
/// Confirms a publisher may wait for at once.
const MAX_UNCONFIRMED: usize = 1000;

/// What the fairness run measured.
pub struct FairnessReport {
    flood_jobs: usize,
    flood_rate: f64,
    flood_mailbox_rate: f64,
    quiet_jobs: usize,
    quiet_rate: f64,
    /// Quiet organization: enqueue → result, sorted.
    quiet_latencies: Vec<Duration>,
    quiet_outcomes: BTreeMap<String, usize>,
    /// Start → the quiet organization's last result.
    wall: Duration,
    /// Flood jobs published by then, and their results by status.
    flood_published: usize,
    flood_outcomes: BTreeMap<String, usize>,
    /// 429s the sandbox gave the flooding mailbox.
    flood_throttled: u64,
    /// Worker: deliveries taken from the jobs queue, and jobs deferred, by reason.
    deliveries: f64,
    deferred: BTreeMap<String, f64>,
}

fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
}

impl FairnessReport {
    pub fn p99_ms(&self) -> f64 {
        percentile_ms(&self.quiet_latencies, 99.0)
    }

    pub fn json(&self, args: &BenchArgs) -> Value {
        let q = &self.quiet_latencies;
        json!({
            "scenario": "fairness",
            "concurrency": args.concurrency,
            "latency_ms": args.latency_ms,
            "flood": {
                "jobs": self.flood_jobs,
                "publish_rate": if self.flood_rate > 0.0 { json!(self.flood_rate) } else { json!("burst") },
                "mailbox_limit_per_s": self.flood_mailbox_rate,
                "published_by_end": self.flood_published,
                "results_by_end": self.flood_outcomes,
                "sandbox_429s": self.flood_throttled,
            },
            "quiet": {
                "jobs": self.quiet_jobs,
                "publish_rate": self.quiet_rate,
                "results": self.quiet_outcomes,
                "latency_ms": {
                    "p50": percentile_ms(q, 50.0),
                    "p95": percentile_ms(q, 95.0),
                    "p99": percentile_ms(q, 99.0),
                    "max": percentile_ms(q, 100.0),
                },
            },
            "wall_s": self.wall.as_secs_f64(),
            "worker": {
                "deliveries": self.deliveries,
                "deferred_by_reason": self.deferred,
            },
            "target": {"quiet_p99_ms_below": 2000.0, "met": self.p99_ms() < 2000.0},
        })
    }

    pub fn text(&self, args: &BenchArgs) -> String {
        let q = &self.quiet_latencies;
        let mut s = String::new();
        let _ = writeln!(s, "\nmail-dispatch benchmark — scenario fairness");
        let _ = writeln!(
            s,
            "worker: concurrency {}, default pacing; sandbox latency {} ms",
            args.concurrency, args.latency_ms
        );
        let rate = if self.flood_rate > 0.0 {
            format!("{:.0} jobs/s", self.flood_rate)
        } else {
            "a burst".into()
        };
        let _ = writeln!(
            s,
            "flood: {} jobs of {FLOOD_ORG} (Microsoft) published at {rate}; the sandbox lets its mailbox send {} per second",
            self.flood_jobs, self.flood_mailbox_rate
        );
        let _ = writeln!(
            s,
            "quiet: {} jobs of {QUIET_ORG} (Microsoft) published at {:.0} jobs/s from the start",
            self.quiet_jobs, self.quiet_rate
        );
        let _ = writeln!(
            s,
            "\nquiet organization, enqueue → result (ms): p50 {:.0}  p95 {:.0}  p99 {:.0}  max {:.0}   results {:?}",
            percentile_ms(q, 50.0),
            percentile_ms(q, 95.0),
            percentile_ms(q, 99.0),
            percentile_ms(q, 100.0),
            self.quiet_outcomes
        );
        let _ = writeln!(
            s,
            "target p99 < 2000 ms: {}",
            if self.p99_ms() < 2000.0 {
                "met"
            } else {
                "MISSED"
            }
        );
        let _ = writeln!(
            s,
            "\nwhen the quiet organization was done ({:.1} s): flood published {} of {}, results {:?}; sandbox 429s to the flood's mailbox: {}",
            self.wall.as_secs_f64(),
            self.flood_published,
            self.flood_jobs,
            self.flood_outcomes,
            self.flood_throttled
        );
        let _ = writeln!(
            s,
            "worker: {:.0} deliveries taken, deferred by reason {:?}",
            self.deliveries, self.deferred
        );
        s
    }
}

/// Runs the scenario; the worker is started here with its default pacing.
pub async fn run(
    args: &BenchArgs,
    ctx: &Ctx,
    worker_bin: &std::path::Path,
) -> anyhow::Result<FairnessReport> {
    if args.quiet_jobs == 0 {
        bail!("--quiet-jobs must be at least 1");
    }
    if args.quiet_rate <= 0.0 {
        bail!("--quiet-rate must be above 0");
    }
    let http = reqwest::Client::new();
    let standins = StandIns::start_on(std::net::TcpListener::bind("127.0.0.1:0")?).await;
    standins.set_send_delay(Duration::from_millis(args.latency_ms));
    standins.set_fault_rate(args.fault_rate);
    standins.set_mailbox_limit(FLOOD_ACCOUNT, Some(args.flood_mailbox_rate));

    let broker = Broker::connect(&args.amqp_url, "mail-dispatch-bench")
        .await
        .context("cannot reach RabbitMQ (--amqp-url)")?;
    broker.declare(&ctx.topology).await?;
    ctx.declare(&broker).await?;
    let (worker, metrics) =
        crate::worker::spawn(args, ctx, worker_bin, &standins, &http, Pacing::Default).await?;
    {
        let cipher = TokenCipher::new(&SecretString::from(ctx.token_key.clone()), &[])?;
        let store = Store::connect(&ctx.db_url, cipher, PoolSettings::default())?;
        let connections = [
            (
                FLOOD_ORG.to_owned(),
                FLOOD_ACCOUNT.to_owned(),
                Vendor::Microsoft,
            ),
            (
                QUIET_ORG.to_owned(),
                QUIET_ACCOUNT.to_owned(),
                Vendor::Microsoft,
            ),
        ];
        crate::fixtures::store_connections(&store, &standins, connections.into_iter()).await?;
    }
    crate::child::quiesce(worker.pid, Duration::from_secs(30)).await;

    let flood = crate::fixtures::make_jobs_for(args.jobs, |_| FLOOD_ORG.to_owned())?;
    let quiet = crate::fixtures::make_jobs_for(args.quiet_jobs, |_| QUIET_ORG.to_owned())?;
    let quiet_sent: Published = Default::default();
    let flood_sent: Published = Default::default();
    let scrape_url = format!("{metrics}/metrics");
    let before = Scrape::fetch(&http, &scrape_url).await?;

    let consumer_channel = broker.channel().await?;
    let mut results = consumer_channel
        .basic_consume(
            ctx.tap_queue.as_str().into(),
            "bench-fairness".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let started = Instant::now();
    let publish = |jobs: Vec<Job>, rate: f64, sent: Published| {
        let broker = broker.clone();
        let topology = ctx.topology.clone();
        tokio::spawn(async move {
            let channel = broker.channel().await?;
            publish_paced(
                &channel,
                &topology.jobs_exchange,
                &topology.jobs_routing_key,
                &jobs,
                rate,
                &sent,
            )
            .await
        })
    };
    let flood_task = publish(flood, args.flood_rate, flood_sent.clone());
    let quiet_task = publish(quiet, args.quiet_rate, quiet_sent.clone());

    let mut quiet_latencies = Vec::with_capacity(args.quiet_jobs);
    let mut quiet_outcomes = BTreeMap::new();
    let mut flood_outcomes = BTreeMap::new();
    let timeout = Duration::from_secs(120)
        + Duration::from_secs_f64(args.quiet_jobs as f64 / args.quiet_rate);
    let deadline = tokio::time::Instant::now() + timeout;
    while quiet_latencies.len() < args.quiet_jobs {
        let next = match tokio::time::timeout_at(deadline, results.next()).await {
            Ok(Some(Ok(d))) => d,
            Ok(Some(Err(e))) => bail!("results consumer failed: {e}"),
            Ok(None) => bail!("results consumer closed"),
            Err(_) => bail!(
                "only {} of {} quiet results after {:.0} s\nworker log tail:\n{}",
                quiet_latencies.len(),
                args.quiet_jobs,
                started.elapsed().as_secs_f64(),
                worker.log_tail(20)
            ),
        };
        if !next.routing_key.as_str().starts_with("result.") {
            continue;
        }
        let now = Instant::now();
        let Ok(body) = serde_json::from_slice::<Value>(&next.data) else {
            continue;
        };
        let id = body["job_id"].as_str().unwrap_or_default();
        let status = body["status"].as_str().unwrap_or("?").to_owned();
        if let Some(at) = quiet_sent.lock().expect("poisoned").remove(id) {
            quiet_latencies.push(now - at);
            *quiet_outcomes.entry(status).or_insert(0usize) += 1;
        } else if body["organization_id"] == FLOOD_ORG {
            *flood_outcomes.entry(status).or_insert(0usize) += 1;
        }
    }
    let wall = started.elapsed();
    quiet_task.await.context("quiet publisher")??;
    if flood_task.is_finished() {
        flood_task.await.context("flood publisher")??;
    } else {
        flood_task.abort();
    }
    let flood_published = flood_sent.lock().expect("poisoned").len();
    let after = Scrape::fetch(&http, &scrape_url).await?;
    let _ = consumer_channel.close(200, "done".into()).await;
    worker.stop(Duration::from_secs(40)).await?;
    broker.close().await;
    quiet_latencies.sort();

    const RETRIES: &str = "mail_dispatch_retries_scheduled_total";
    let deferred = crate::prom::delta(
        &before.by_label(RETRIES, "reason"),
        &after.by_label(RETRIES, "reason"),
    )
    .into_iter()
    .filter(|(_, v)| *v != 0.0)
    .collect();
    let received = "mail_dispatch_jobs_received_total";
    Ok(FairnessReport {
        flood_jobs: args.jobs,
        flood_rate: args.flood_rate,
        flood_mailbox_rate: args.flood_mailbox_rate,
        quiet_jobs: args.quiet_jobs,
        quiet_rate: args.quiet_rate,
        quiet_latencies,
        quiet_outcomes,
        wall,
        flood_published,
        flood_outcomes,
        flood_throttled: standins.throttled(FLOOD_ACCOUNT),
        deliveries: after.total(received) - before.total(received),
        deferred,
    })
}

/// Job id → when it was published (removed when its result arrives).
type Published = Arc<Mutex<HashMap<String, Instant>>>;

/// Publishes `jobs` at `rate` per second (0: as fast as confirms allow), job `i`
/// at start + i / rate; returns how many were published once all are confirmed.
async fn publish_paced(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    jobs: &[Job],
    rate: f64,
    sent: &Published,
) -> anyhow::Result<usize> {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let exchange = ShortString::from(exchange);
    let routing_key = ShortString::from(routing_key);
    let start = tokio::time::Instant::now();
    let mut confirms = FuturesUnordered::new();
    for (i, job) in jobs.iter().enumerate() {
        if rate > 0.0 {
            tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
        }
        while confirms.len() >= MAX_UNCONFIRMED {
            if let Some(c) = confirms.next().await {
                c?;
            }
        }
        sent.lock()
            .expect("poisoned")
            .insert(job.id.clone(), Instant::now());
        let confirm = channel
            .basic_publish(
                exchange.clone(),
                routing_key.clone(),
                BasicPublishOptions::default(),
                &job.body,
                json_properties()
                    .with_message_id(job.id.as_str().into())
                    .with_timestamp(chrono::Utc::now().timestamp() as u64),
            )
            .await?;
        confirms.push(async move {
            match confirm.await? {
                lapin::Confirmation::Nack(_) => bail!("the broker refused a job (nack)"),
                _ => Ok(()),
            }
        });
    }
    while let Some(c) = confirms.next().await {
        c?;
    }
    Ok(jobs.len())
}
