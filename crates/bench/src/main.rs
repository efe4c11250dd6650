//! `bench`: throughput, latency, CPU, memory and PostgreSQL work of the real
//! worker process, against the local RabbitMQ and PostgreSQL and the provider
//! sandbox (configurable latency and faults), compared in the same run with a
//! bare lapin loop doing the same broker work. See BENCHMARKS.md.
//!
//! ```sh
//! cargo build --release -p mail-dispatch -p mail-dispatch-bench
//! target/release/bench --jobs 20000 --orgs 30 --concurrency 64
//! ```

mod bare;
mod child;
mod fairness;
mod load;
mod pgstats;
mod procfs;
mod prom;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use futures_util::{StreamExt as _, TryStreamExt as _};
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use mail_dispatch_broker::{Broker, Topology};
use mail_dispatch_domain::ProviderKind;
use mail_dispatch_store::{Fallback, NewConnection, PoolSettings, Store, TokenCipher};
use mail_dispatch_test_support::StandIns;
use mail_dispatch_test_support::standins::Vendor;
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::process::Command;

use crate::child::Proc;
use crate::load::{Job, LoadOutcome, LoadSpec};
use crate::pgstats::PgStats;
use crate::procfs::CpuSnapshot;
use crate::prom::Scrape;

#[derive(Parser, Debug)]
#[command(
    name = "bench",
    version,
    about = "Benchmarks the mail-dispatch worker process against RabbitMQ, PostgreSQL and the provider sandbox, and a bare lapin loop in the same run",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    internal: Option<Internal>,
    #[command(flatten)]
    args: BenchArgs,
}

#[derive(Subcommand, Debug)]
enum Internal {
    /// The bare broker loop (the benchmark starts it itself).
    #[command(hide = true)]
    BareConsumer(bare::BareArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// N jobs over M organizations, as fast as the worker takes them.
    Throughput,
    /// One organization floods (`--jobs`) against a mailbox the sandbox throttles,
    /// while a quiet one sends `--quiet-jobs`: the quiet one's latency.
    Fairness,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Pacing {
    /// Provider pacing limits raised out of the way (the sandbox has none): the
    /// worker's own throughput.
    Lifted,
    /// The worker's default pacing (per-organization in-flight cap, Graph
    /// per-mailbox concurrency, Gmail per-mailbox rate).
    Default,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(clap::Args, Debug, Clone)]
struct BenchArgs {
    /// Jobs to publish (N).
    #[arg(long, default_value_t = 5000)]
    jobs: usize,
    /// Organizations (M): a third Microsoft, a third Google, a third the platform sender.
    #[arg(long, default_value_t = 30)]
    orgs: usize,
    /// MAIL_DISPATCH_CONCURRENCY of the worker, and the bare loop's prefetch (C).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Delay of every sandbox send answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Share of sandbox sends answering 503, from 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    fault_rate: f64,
    #[arg(long, value_enum, default_value_t = Scenario::Throughput)]
    scenario: Scenario,
    /// Fairness: the flooding organization's publish rate, jobs/s (0: a burst).
    #[arg(long, default_value_t = 2000.0)]
    flood_rate: f64,
    /// Fairness: sends per second the sandbox accepts from the flooding mailbox
    /// (beyond: 429 with Retry-After).
    #[arg(long, default_value_t = 10.0)]
    flood_mailbox_rate: f64,
    /// Fairness: the quiet organization's jobs.
    #[arg(long, default_value_t = 200)]
    quiet_jobs: usize,
    /// Fairness: the quiet organization's publish rate, jobs/s.
    #[arg(long, default_value_t = 20.0)]
    quiet_rate: f64,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// At most this many jobs published and still without a result (0: publish all
    /// N as fast as the broker confirms them).
    #[arg(long, default_value_t = 0)]
    window: usize,
    /// Before the measured load, send one job per organization (not measured), so
    /// that the worker's configuration and token caches are warm: steady state.
    #[arg(long)]
    warmup: bool,
    /// Provider pacing of the worker.
    #[arg(long, value_enum, default_value_t = Pacing::Lifted)]
    pacing: Pacing,
    /// Skip the bare broker loop (no worker/bare ratio).
    #[arg(long)]
    no_bare: bool,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// A database of the PostgreSQL server to create and drop the benchmark's own
    /// database from.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    postgres_url: String,
    /// The `mail-dispatch` binary (default: the one next to this executable).
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// Parent directory of the platform sender's outbox (default: /dev/shm, a
    /// tmpfs, when it exists; else the temporary directory).
    #[arg(long)]
    outbox: Option<PathBuf>,
    /// Record the worker with `perf record` while the load runs, into this file.
    #[arg(long)]
    perf_out: Option<PathBuf>,
    /// Options of `perf record` (with --perf-out).
    #[arg(long, default_value = "-F 499 -g", allow_hyphen_values = true)]
    perf_args: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.internal {
            Some(Internal::BareConsumer(args)) => bare::consume(args).await,
            None => run(cli.args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Names and places of one run, all unique to it.
struct Ctx {
    prefix: String,
    topology: Topology,
    /// Our queue on the worker's results exchange.
    tap_queue: String,
    bare_jobs: String,
    bare_results: String,
    db_name: String,
    db_url: String,
    token_key: String,
    tmp: PathBuf,
    /// Where the platform sender writes its `.eml` files.
    outbox: PathBuf,
}

impl Ctx {
    fn new(args: &BenchArgs) -> anyhow::Result<Ctx> {
        let suffix = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
        let prefix = format!("bench-{suffix}.");
        let db_name = format!("mail_dispatch_bench_{suffix}");
        let db_url = match args.postgres_url.rsplit_once('/') {
            Some((base, _)) if base.contains("://") && !base.ends_with('/') => {
                format!("{base}/{db_name}")
            }
            _ => bail!("--postgres-url must name a database (postgres://user@host:port/postgres)"),
        };
        let tmp = std::env::temp_dir().join(format!("mail-dispatch-bench-{suffix}"));
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        // The platform sender writes one file per job. On a disk file system that
        // has seen many files come and go, creating them costs the worker more
        // kernel time than sending; tmpfs keeps that cost out of the figures.
        let outbox = match &args.outbox {
            Some(dir) => dir.join(format!("mail-dispatch-bench-{suffix}")),
            None if std::path::Path::new("/dev/shm").is_dir() => {
                PathBuf::from(format!("/dev/shm/mail-dispatch-bench-{suffix}"))
            }
            None => tmp.join("outbox"),
        };
        std::fs::create_dir_all(&outbox)
            .with_context(|| format!("creating {}", outbox.display()))?;
        Ok(Ctx {
            topology: Topology::with_prefix(&prefix),
            tap_queue: format!("{prefix}bench.results"),
            bare_jobs: format!("{prefix}bare.jobs"),
            bare_results: format!("{prefix}bare.results"),
            prefix,
            db_name,
            db_url,
            token_key: TokenCipher::generate_key(),
            tmp,
            outbox,
        })
    }

    /// Deletes our queues, exchanges, database and files. Best effort.
    async fn cleanup(&self, args: &BenchArgs) {
        match Broker::connect(&args.amqp_url, "mail-dispatch-bench-cleanup").await {
            Ok(broker) => {
                if let Ok(channel) = broker.channel().await {
                    let mut queues = self.topology.queues();
                    queues.extend([
                        self.tap_queue.clone(),
                        self.bare_jobs.clone(),
                        self.bare_results.clone(),
                    ]);
                    for q in queues {
                        let _ = channel
                            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                    let mut exchanges = self.topology.exchanges();
                    exchanges.push(self.bare_results.clone());
                    for x in exchanges {
                        let _ = channel
                            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                            .await;
                    }
                }
                broker.close().await;
            }
            Err(e) => eprintln!(
                "[bench] cleanup: cannot reach RabbitMQ ({e}); delete the queues and exchanges named {}* by hand",
                self.prefix
            ),
        }
        match tokio_postgres::connect(&args.postgres_url, tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                let conn = tokio::spawn(conn);
                if let Err(e) = client
                    .batch_execute(&format!(
                        "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                        self.db_name
                    ))
                    .await
                {
                    eprintln!("[bench] cleanup: cannot drop {}: {e}", self.db_name);
                }
                drop(client);
                let _ = conn.await;
            }
            Err(e) => eprintln!(
                "[bench] cleanup: cannot reach PostgreSQL ({e}); drop {} by hand",
                self.db_name
            ),
        }
        let _ = std::fs::remove_dir_all(&self.tmp);
        let _ = std::fs::remove_dir_all(&self.outbox);
    }
}

async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.jobs == 0 || args.orgs == 0 {
        bail!("--jobs and --orgs must be at least 1");
    }
    if !(1..=2000).contains(&args.concurrency) {
        bail!("--concurrency must be from 1 to 2000 (as MAIL_DISPATCH_CONCURRENCY)");
    }
    if !(0.0..=1.0).contains(&args.fault_rate) {
        bail!("--fault-rate must be from 0 to 1");
    }
    let worker_bin = match &args.worker_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("mail-dispatch"),
    };
    if !worker_bin.is_file() {
        bail!(
            "the worker binary {} is missing: build it with `cargo build --release -p mail-dispatch -p mail-dispatch-bench` (or pass --worker-bin)",
            worker_bin.display()
        );
    }
    let ctx = Ctx::new(&args)?;
    eprintln!(
        "[bench] prefix {}, database {}, worker {}",
        ctx.prefix,
        ctx.db_name,
        worker_bin.display()
    );
    match args.scenario {
        Scenario::Fairness => {
            interruptible(&args, &ctx, fairness::run(&args, &ctx, &worker_bin)).await
        }
        Scenario::Throughput => interruptible(&args, &ctx, phases(&args, &ctx, &worker_bin)).await,
    }
}

/// What a scenario reports, as text or JSON.
trait Printed {
    fn text(&self, args: &BenchArgs) -> String;
    fn json(&self, args: &BenchArgs) -> Value;
}

impl Printed for Report {
    fn text(&self, args: &BenchArgs) -> String {
        Report::text(self, args)
    }
    fn json(&self, args: &BenchArgs) -> Value {
        Report::json(self, args)
    }
}

impl Printed for fairness::FairnessReport {
    fn text(&self, args: &BenchArgs) -> String {
        fairness::FairnessReport::text(self, args)
    }
    fn json(&self, args: &BenchArgs) -> Value {
        fairness::FairnessReport::json(self, args)
    }
}

/// Runs a scenario until it ends or Ctrl-C (which drops it, killing its child
/// processes); cleans up either way, then prints its report.
async fn interruptible<R: Printed>(
    args: &BenchArgs,
    ctx: &Ctx,
    scenario: impl Future<Output = anyhow::Result<R>>,
) -> anyhow::Result<()> {
    let outcome = tokio::select! {
        r = scenario => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    ctx.cleanup(args).await;
    let report = outcome?;
    match args.output {
        Output::Text => print!("{}", report.text(args)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&report.json(args))?),
    }
    Ok(())
}

/// Everything a run measured.
struct Report {
    bare: Option<Phase>,
    worker: Phase,
    /// Worker metrics deltas over the load, per job.
    db_per_job: BTreeMap<String, f64>,
    token_refreshes: f64,
    /// Deliveries taken from the jobs queue per job (above 1: delays, redeliveries).
    deliveries_per_job: f64,
    /// Jobs sent to a delay queue, by reason.
    retries: BTreeMap<String, f64>,
    setup_secs: f64,
    /// Time of the warm-up pass (`--warmup`).
    warmup_secs: Option<f64>,
    /// PostgreSQL's own counters over the load (until the worker stopped).
    pg: PgStats,
}

/// One measured load.
struct Phase {
    outcome: LoadOutcome,
    before: CpuSnapshot,
    after: CpuSnapshot,
    peak_rss_kb: Option<u64>,
    max_in_flight: Option<f64>,
}

async fn phases(
    args: &BenchArgs,
    ctx: &Ctx,
    worker_bin: &std::path::Path,
) -> anyhow::Result<Report> {
    let http = reqwest::Client::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let standins = StandIns::start_on(listener).await;
    standins.set_send_delay(Duration::from_millis(args.latency_ms));
    standins.set_fault_rate(args.fault_rate);
    let jobs = make_jobs(args.jobs, args.orgs)?;
    let timeout = Duration::from_secs(60)
        + Duration::from_millis(20) * args.jobs as u32
        + Duration::from_millis(args.latency_ms) * (3 * args.jobs / args.concurrency) as u32;

    let broker = Broker::connect(&args.amqp_url, "mail-dispatch-bench")
        .await
        .context("cannot reach RabbitMQ (--amqp-url)")?;
    broker.declare(&ctx.topology).await?;
    declare_ours(&broker, ctx).await?;

    let bare = if args.no_bare {
        None
    } else {
        eprintln!("[bench] bare broker loop: {} jobs", args.jobs);
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["bare-consumer", "--amqp-url", &args.amqp_url, "--queue"])
            .arg(&ctx.bare_jobs)
            .arg("--results-exchange")
            .arg(&ctx.bare_results)
            .arg("--concurrency")
            .arg(args.concurrency.to_string())
            .stdout(Stdio::piped());
        let mut p = Proc::spawn("bare broker loop", cmd, &ctx.tmp.join("bare.log"))?;
        p.wait_ready_line(Duration::from_secs(30)).await?;
        child::quiesce(p.pid, Duration::from_secs(10)).await;
        let spec = LoadSpec {
            label: "bare loop",
            exchange: String::new(),
            routing_key: ctx.bare_jobs.clone(),
            results_queue: ctx.bare_results.clone(),
            window: args.window,
            timeout,
        };
        let phase = measure(&broker, &mut p, None, &http, &spec, &jobs).await?;
        p.stop(Duration::from_secs(10)).await?;
        Some(phase)
    };

    let (mut worker, metrics) =
        spawn_worker(args, ctx, worker_bin, &standins, &http, args.pacing).await?;

    // The worker created and migrated the database; store the integrations as a
    // finished connect flow would.
    let setup = Instant::now();
    {
        let cipher = TokenCipher::new(&SecretString::from(ctx.token_key.clone()), &[])?;
        let store = Store::connect(&ctx.db_url, cipher, PoolSettings::default())?;
        store_integrations(&store, &standins, args.orgs).await?;
    }
    let setup_secs = setup.elapsed().as_secs_f64();
    eprintln!(
        "[bench] {} integrations stored in {setup_secs:.1} s; waiting for the worker to settle",
        args.orgs - args.orgs / 3
    );
    child::quiesce(worker.pid, Duration::from_secs(120)).await;
    worker.check_alive()?;
    let mut warmup_secs = None;
    if args.warmup {
        eprintln!("[bench] warm-up: one job per organization ({})", args.orgs);
        let warm = make_jobs(args.orgs, args.orgs)?;
        let spec = LoadSpec {
            label: "warm-up",
            exchange: ctx.topology.jobs_exchange.clone(),
            routing_key: ctx.topology.jobs_routing_key.clone(),
            results_queue: ctx.tap_queue.clone(),
            window: args.window,
            timeout: Duration::from_secs(60) + Duration::from_millis(20) * args.orgs as u32,
        };
        let t = Instant::now();
        load::run(
            broker.channel().await?,
            broker.channel().await?,
            &spec,
            &warm,
        )
        .await?;
        warmup_secs = Some(t.elapsed().as_secs_f64());
        child::quiesce(worker.pid, Duration::from_secs(60)).await;
    }

    eprintln!("[bench] worker: {} jobs", args.jobs);
    let scrape_url = format!("{metrics}/metrics");
    // Idle backends report their counters within 10 s (PostgreSQL's idle
    // statistics interval); wait for that so the setup is not counted.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let pg_before = PgStats::take(&ctx.db_url).await?;
    let before = Scrape::fetch(&http, &scrape_url).await?;
    let perf = match &args.perf_out {
        Some(out) => Some(start_perf(&args.perf_args, out, worker.pid)?),
        None => None,
    };
    let spec = LoadSpec {
        label: "worker",
        exchange: ctx.topology.jobs_exchange.clone(),
        routing_key: ctx.topology.jobs_routing_key.clone(),
        results_queue: ctx.tap_queue.clone(),
        window: args.window,
        timeout,
    };
    let measured = measure(&broker, &mut worker, Some(&scrape_url), &http, &spec, &jobs).await;
    if let Some(perf) = perf {
        stop_perf(perf).await;
    }
    let phase = match measured {
        Ok(p) => p,
        Err(e) => {
            return Err(e.context(format!("worker log tail:\n{}", worker.log_tail(20))));
        }
    };
    let after = Scrape::fetch(&http, &scrape_url).await?;
    worker.stop(Duration::from_secs(40)).await?;
    broker.close().await;
    // The worker's connections reported their counters when they closed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pg = PgStats::take(&ctx.db_url).await?.since(&pg_before);

    const DB: &str = "mail_dispatch_db_statements_total";
    let n = args.jobs as f64;
    let db_per_job = prom::delta(&before.by_label(DB, "kind"), &after.by_label(DB, "kind"))
        .into_iter()
        .map(|(k, v)| (k, v / n))
        .collect();
    let refreshes = "mail_dispatch_token_refreshes_total";
    let received = "mail_dispatch_jobs_received_total";
    const RETRIES: &str = "mail_dispatch_retries_scheduled_total";
    let retries = prom::delta(
        &before.by_label(RETRIES, "reason"),
        &after.by_label(RETRIES, "reason"),
    )
    .into_iter()
    .filter(|(_, v)| *v != 0.0)
    .collect();
    Ok(Report {
        warmup_secs,
        deliveries_per_job: (after.total(received) - before.total(received)) / n,
        retries,
        bare,
        worker: phase,
        db_per_job,
        token_refreshes: after.total(refreshes) - before.total(refreshes),
        setup_secs,
        pg,
    })
}

/// Starts `mail-dispatch worker` against this run's queues, database and sandbox,
/// and waits until it is ready. Returns it and its metrics base URL.
async fn spawn_worker(
    args: &BenchArgs,
    ctx: &Ctx,
    worker_bin: &std::path::Path,
    standins: &StandIns,
    http: &reqwest::Client,
    pacing: Pacing,
) -> anyhow::Result<(Proc, String)> {
    eprintln!("[bench] starting the worker");
    let metrics = format!("http://127.0.0.1:{}", child::free_port()?);
    let sb = standins.graph.uri();
    let mut cmd = Command::new(worker_bin);
    cmd.arg("worker");
    for (k, _) in std::env::vars() {
        if k.starts_with("MAIL_DISPATCH_") {
            cmd.env_remove(k);
        }
    }
    let env = [
        ("MAIL_DISPATCH_AMQP_URL", args.amqp_url.clone()),
        ("MAIL_DISPATCH_DATABASE_URL", ctx.db_url.clone()),
        ("MAIL_DISPATCH_TOKEN_KEY", ctx.token_key.clone()),
        ("MAIL_DISPATCH_QUEUE_PREFIX", ctx.prefix.clone()),
        ("MAIL_DISPATCH_CONCURRENCY", args.concurrency.to_string()),
        (
            "MAIL_DISPATCH_METRICS_LISTEN",
            metrics.trim_start_matches("http://").to_owned(),
        ),
        (
            "MAIL_DISPATCH_DEFAULT_TRANSPORT",
            format!("file://{}", ctx.outbox.display()),
        ),
        (
            "MAIL_DISPATCH_DEFAULT_SENDER",
            "no-reply@platform.example".into(),
        ),
        (
            "MAIL_DISPATCH_DEFAULT_SENDER_NAME",
            "Compliance Platform".into(),
        ),
        (
            "MAIL_DISPATCH_MICROSOFT_CLIENT_ID",
            "sandbox-microsoft-client".into(),
        ),
        (
            "MAIL_DISPATCH_MICROSOFT_CLIENT_SECRET",
            "sandbox-secret".into(),
        ),
        ("MAIL_DISPATCH_MICROSOFT_LOGIN_URL", sb.clone()),
        ("MAIL_DISPATCH_GRAPH_URL", sb.clone()),
        (
            "MAIL_DISPATCH_GOOGLE_CLIENT_ID",
            "sandbox-google-client.apps.googleusercontent.com".into(),
        ),
        (
            "MAIL_DISPATCH_GOOGLE_CLIENT_SECRET",
            "sandbox-secret".into(),
        ),
        (
            "MAIL_DISPATCH_GOOGLE_AUTH_URL",
            format!("{sb}/o/oauth2/v2/auth"),
        ),
        ("MAIL_DISPATCH_GOOGLE_TOKEN_URL", format!("{sb}/token")),
        ("MAIL_DISPATCH_GOOGLE_REVOKE_URL", format!("{sb}/revoke")),
        ("MAIL_DISPATCH_GMAIL_URL", sb.clone()),
        ("RUST_LOG", "warn".into()),
    ];
    cmd.envs(env).stdout(Stdio::null());
    if pacing == Pacing::Lifted {
        let c = args.concurrency.to_string();
        cmd.envs([
            ("MAIL_DISPATCH_ORG_MAX_IN_FLIGHT", c.as_str()),
            ("MAIL_DISPATCH_GRAPH_MAILBOX_CONCURRENCY", c.as_str()),
            ("MAIL_DISPATCH_GMAIL_MAILBOX_PER_MINUTE", "100000000"),
            ("MAIL_DISPATCH_MICROSOFT_DAILY_RECIPIENTS", "2000000000"),
            ("MAIL_DISPATCH_GOOGLE_DAILY_MESSAGES", "2000000000"),
        ]);
    }
    let mut worker = Proc::spawn("worker", cmd, &ctx.tmp.join("worker.log"))?;
    worker
        .wait_ready_url(http, &format!("{metrics}/readyz"), Duration::from_secs(60))
        .await?;
    Ok((worker, metrics))
}

/// Our results queues (quorum, like the jobs queues) and the bare loop's objects.
async fn declare_ours(broker: &Broker, ctx: &Ctx) -> anyhow::Result<()> {
    let channel = broker.channel().await?;
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    for q in [&ctx.tap_queue, &ctx.bare_jobs, &ctx.bare_results] {
        channel
            .queue_declare(q.as_str().into(), durable, quorum.clone())
            .await?;
    }
    channel
        .exchange_declare(
            ctx.bare_results.as_str().into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    for (queue, exchange) in [
        (&ctx.tap_queue, &ctx.topology.results_exchange),
        (&ctx.bare_results, &ctx.bare_results),
    ] {
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

fn org_id(i: usize) -> String {
    format!("bench-org-{i}")
}

/// Organization `i`: Microsoft, Google or the platform sender, in turn.
fn vendor_of(i: usize) -> Option<Vendor> {
    match i % 3 {
        0 => Some(Vendor::Microsoft),
        1 => Some(Vendor::Google),
        _ => None,
    }
}

/// N jobs, round-robin over the organizations, no attachments.
fn make_jobs(n: usize, orgs: usize) -> anyhow::Result<Vec<Job>> {
    make_jobs_for(n, |i| org_id(i % orgs))
}

/// N jobs, job `i` for organization `org(i)`, no attachments.
fn make_jobs_for(n: usize, org: impl Fn(usize) -> String) -> anyhow::Result<Vec<Job>> {
    let jobs: Vec<Job> = (0..n)
        .map(|i| {
            let id = uuid::Uuid::new_v4().to_string();
            let org = org(i);
            let body = json!({
                "id": id,
                "organization_id": org,
                "workspace_id": format!("{org}-main"),
                "category": "task_assigned",
                "to": [{"email": "alice@example.com", "name": "Alice Martin"}],
                "subject": "Nouvelle tâche : revue du registre des traitements",
                "text": "Bonjour Alice,\n\nLa tâche « Revue du registre des traitements » vous a été assignée. Échéance : 5 décembre.",
                "html": "<p>Bonjour Alice,</p><p>La tâche « Revue du registre des traitements » vous a été assignée. Échéance : 5 décembre.</p>",
                "headers": {"X-Entity-Ref-ID": format!("task-{i}")},
            });
            Job {
                id,
                body: serde_json::to_vec(&body).expect("serializable"),
            }
        })
        .collect();
    if let Some(first) = jobs.first() {
        mail_dispatch_domain::Job::decode(&first.body)
            .map_err(|e| anyhow::anyhow!("the benchmark's job is invalid: {e}"))?;
    }
    Ok(jobs)
}

/// Stores a connected, tested, active integration for every Microsoft and Google
/// organization, with tokens the sandbox accepts (valid 50 minutes).
async fn store_integrations(store: &Store, standins: &StandIns, orgs: usize) -> anyhow::Result<()> {
    let connections = (0..orgs)
        .filter_map(|i| vendor_of(i).map(|v| (org_id(i), format!("admin@org{i}.example"), v)));
    store_connections(store, standins, connections).await
}

/// Stores a connected, tested, active integration for each (organization,
/// account, vendor).
async fn store_connections(
    store: &Store,
    standins: &StandIns,
    connections: impl Iterator<Item = (String, String, Vendor)>,
) -> anyhow::Result<()> {
    futures_util::stream::iter(connections)
        .map(|(org, account, vendor)| async move {
            let (access, refresh) = standins.issue(vendor, &account);
            store
                .save_connection(&NewConnection {
                    organization_id: org.clone(),
                    provider: match vendor {
                        Vendor::Microsoft => ProviderKind::Microsoft,
                        Vendor::Google => ProviderKind::Google,
                    },
                    account_email: account.clone(),
                    refresh_token: SecretString::from(refresh),
                    access_token: Some((
                        SecretString::from(access),
                        chrono::Utc::now() + chrono::Duration::minutes(50),
                    )),
                    granted_scopes: None,
                    account_id: None,
                    account_tenant: None,
                })
                .await?;
            store
                .save_sender(&org, &account, Some("Bench Notifications"), Fallback::None)
                .await?;
            store
                .record_test(&org, &json!({"status": "sent"}), true)
                .await?;
            Ok::<_, anyhow::Error>(())
        })
        .buffer_unordered(16)
        .try_collect::<()>()
        .await
        .context("storing the integrations")
}

/// Runs one load against the process `p`, with CPU snapshots around it and RSS
/// (and, for the worker, jobs in flight) sampled every second.
async fn measure(
    broker: &Broker,
    p: &mut Proc,
    metrics_url: Option<&str>,
    http: &reqwest::Client,
    spec: &LoadSpec,
    jobs: &[Job],
) -> anyhow::Result<Phase> {
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sampler = {
        let http = http.clone();
        let url = metrics_url.map(str::to_owned);
        tokio::spawn(async move {
            let mut max_in_flight: Option<f64> = None;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = &mut stop_rx => break,
                    _ = tick.tick() => {}
                }
                if let Some(url) = &url
                    && let Ok(s) = Scrape::fetch(&http, url).await
                {
                    let v = s.total("mail_dispatch_jobs_in_flight");
                    max_in_flight = Some(max_in_flight.map_or(v, |m: f64| m.max(v)));
                }
            }
            max_in_flight
        })
    };
    let before = CpuSnapshot::take(p.pid)?;
    let outcome = load::run(broker.channel().await?, broker.channel().await?, spec, jobs).await;
    let after = CpuSnapshot::take(p.pid);
    let peak_rss_kb = procfs::peak_rss_kb(p.pid);
    let _ = stop_tx.send(());
    let max_in_flight = sampler.await.unwrap_or(None);
    let outcome = outcome?;
    p.check_alive()?;
    Ok(Phase {
        outcome,
        before,
        after: after?,
        peak_rss_kb,
        max_in_flight,
    })
}

fn start_perf(
    perf_args: &str,
    out: &std::path::Path,
    pid: u32,
) -> anyhow::Result<std::process::Child> {
    let child = std::process::Command::new("perf")
        .arg("record")
        .args(perf_args.split_whitespace())
        .arg("-o")
        .arg(out)
        .arg("-p")
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting `perf record` (is perf installed?)")?;
    // Let perf attach before the load begins.
    std::thread::sleep(Duration::from_millis(500));
    Ok(child)
}

async fn stop_perf(mut perf: std::process::Child) {
    child::signal(perf.id(), "INT");
    let _ = tokio::task::spawn_blocking(move || perf.wait()).await;
}

impl Phase {
    fn ticks(&self) -> f64 {
        procfs::clock_ticks() as f64
    }

    /// CPU milliseconds per job of a tick counter.
    fn ms_per_job(&self, before: u64, after: u64) -> f64 {
        after.saturating_sub(before) as f64 * 1000.0 / self.ticks() / self.outcome.jobs as f64
    }

    fn process_ms_per_job(&self) -> f64 {
        self.ms_per_job(self.before.process, self.after.process)
    }

    fn bench_ms_per_job(&self) -> f64 {
        self.ms_per_job(self.before.bench, self.after.bench)
    }

    fn service_ms_per_job(&self) -> BTreeMap<&'static str, f64> {
        self.after
            .services
            .iter()
            .map(|(k, after)| {
                let before = self.before.services.get(k).copied().unwrap_or(0);
                (*k, self.ms_per_job(before, *after))
            })
            .collect()
    }

    /// CPU of everything else on the machine (another build, …): a disturbed run.
    fn other_ms_per_job(&self) -> f64 {
        let busy = self.ms_per_job(self.before.machine_busy, self.after.machine_busy);
        let known = self.process_ms_per_job()
            + self.bench_ms_per_job()
            + self.service_ms_per_job().values().sum::<f64>();
        (busy - known).max(0.0)
    }

    /// Average busy CPUs of the whole machine during the load.
    fn machine_busy_cpus(&self) -> f64 {
        let busy = self
            .after
            .machine_busy
            .saturating_sub(self.before.machine_busy) as f64;
        let total = self
            .after
            .machine_total
            .saturating_sub(self.before.machine_total) as f64;
        if total == 0.0 {
            return 0.0;
        }
        busy / total * procfs::cpus() as f64
    }

    fn json(&self) -> Value {
        let o = &self.outcome;
        json!({
            "jobs": o.jobs,
            "wall_s": o.wall.as_secs_f64(),
            "throughput_jobs_per_s": o.throughput(),
            "throughput_to_99_percent_jobs_per_s": o.throughput_99(),
            "publish_rate_jobs_per_s": o.publish_rate(),
            "latency_ms": {
                "mean": o.mean_ms(),
                "p50": o.percentile_ms(50.0),
                "p95": o.percentile_ms(95.0),
                "p99": o.percentile_ms(99.0),
                "max": o.percentile_ms(100.0),
            },
            "cpu_ms_per_job": {
                "process": self.process_ms_per_job(),
                "bench": self.bench_ms_per_job(),
                "services": self.service_ms_per_job(),
                "everything_else": self.other_ms_per_job(),
            },
            "machine_busy_cpus": self.machine_busy_cpus(),
            "peak_rss_mb": self.peak_rss_kb.map(|k| k as f64 / 1024.0),
            "max_in_flight_sampled": self.max_in_flight,
            "results": o.outcomes,
            "duplicate_results": o.duplicates,
        })
    }
}

impl Report {
    fn ratio(&self) -> Option<f64> {
        self.bare
            .as_ref()
            .map(|b| self.worker.outcome.throughput() / b.outcome.throughput())
    }

    fn json(&self, args: &BenchArgs) -> Value {
        json!({
            "scenario": "throughput",
            "parameters": {
                "jobs": args.jobs,
                "orgs": args.orgs,
                "concurrency": args.concurrency,
                "latency_ms": args.latency_ms,
                "fault_rate": args.fault_rate,
                "window": args.window,
            },
            "machine": {"cpus": procfs::cpus(), "model": procfs::cpu_model()},
            "setup_s": self.setup_secs,
            "warmup_s": self.warmup_secs,
            "worker": self.worker.json(),
            "bare": self.bare.as_ref().map(Phase::json),
            "worker_to_bare_throughput": self.ratio(),
            "db_statements_per_job": self.db_per_job,
            "db_statements_per_job_total": self.db_per_job.values().sum::<f64>(),
            "token_refreshes": self.token_refreshes,
            "deliveries_per_job": self.deliveries_per_job,
            "retries_scheduled": self.retries,
            "postgresql": {
                "transactions_per_job": self.pg.transactions as f64 / args.jobs as f64,
                "sessions_opened": self.pg.sessions,
                "tables_per_job": self.pg.tables.iter().map(|(name, t)| {
                    let n = args.jobs as f64;
                    (name.clone(), json!({
                        "scans": t.scans as f64 / n,
                        "inserted": t.inserted as f64 / n,
                        "updated": t.updated as f64 / n,
                        "deleted": t.deleted as f64 / n,
                    }))
                }).collect::<serde_json::Map<String, Value>>(),
            },
            "pacing": format!("{:?}", args.pacing).to_lowercase(),
            "warmup": args.warmup,
        })
    }

    fn text(&self, args: &BenchArgs) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let (ms, google, platform) = (args.orgs.div_ceil(3), (args.orgs + 1) / 3, args.orgs / 3);
        let _ = writeln!(s, "\nmail-dispatch benchmark — scenario throughput");
        let _ = writeln!(
            s,
            "jobs {}, organizations {} ({ms} Microsoft, {google} Google, {platform} platform), concurrency {}, provider latency {} ms, fault rate {}, window {}, pacing {:?}, warm-up {}",
            args.jobs,
            args.orgs,
            args.concurrency,
            args.latency_ms,
            args.fault_rate,
            if args.window == 0 {
                "none".to_owned()
            } else {
                args.window.to_string()
            },
            args.pacing,
            if args.warmup { "yes" } else { "no" }
        );
        let _ = writeln!(
            s,
            "machine: {} CPUs, {}\n",
            procfs::cpus(),
            procfs::cpu_model()
        );
        let phases: Vec<(&str, &Phase)> = std::iter::once(("worker", &self.worker))
            .chain(self.bare.iter().map(|b| ("bare loop", b)))
            .collect();
        let row = |s: &mut String, name: &str, f: &dyn Fn(&Phase) -> String| {
            let _ = write!(s, "{name:<34}");
            for (_, p) in &phases {
                let _ = write!(s, "{:>16}", f(p));
            }
            let _ = writeln!(s);
        };
        let _ = write!(s, "{:<34}", "");
        for (name, _) in &phases {
            let _ = write!(s, "{name:>16}");
        }
        let _ = writeln!(s);
        row(&mut s, "throughput (jobs/s)", &|p| {
            format!("{:.0}", p.outcome.throughput())
        });
        row(&mut s, "throughput to 99 % of results", &|p| {
            format!("{:.0}", p.outcome.throughput_99())
        });
        row(&mut s, "publish rate (jobs/s)", &|p| {
            format!("{:.0}", p.outcome.publish_rate())
        });
        row(&mut s, "first publish → last result (s)", &|p| {
            format!("{:.2}", p.outcome.wall.as_secs_f64())
        });
        for (label, q) in [
            ("latency p50 (ms)", 50.0),
            ("latency p95 (ms)", 95.0),
            ("latency p99 (ms)", 99.0),
            ("latency max (ms)", 100.0),
        ] {
            row(&mut s, label, &|p| {
                format!("{:.1}", p.outcome.percentile_ms(q))
            });
        }
        row(&mut s, "CPU per job, process (ms)", &|p| {
            format!("{:.3}", p.process_ms_per_job())
        });
        row(&mut s, "CPU per job, bench+sandbox (ms)", &|p| {
            format!("{:.3}", p.bench_ms_per_job())
        });
        row(&mut s, "CPU per job, RabbitMQ (ms)", &|p| {
            format!("{:.3}", p.service_ms_per_job()["rabbitmq"])
        });
        row(&mut s, "CPU per job, PostgreSQL (ms)", &|p| {
            format!("{:.3}", p.service_ms_per_job()["postgresql"])
        });
        row(&mut s, "CPU per job, everything else (ms)", &|p| {
            format!("{:.3}", p.other_ms_per_job())
        });
        row(&mut s, "machine busy (CPUs of 2)", &|p| {
            format!("{:.2}", p.machine_busy_cpus())
        });
        row(&mut s, "peak RSS (MB)", &|p| {
            p.peak_rss_kb
                .map(|k| format!("{:.1}", k as f64 / 1024.0))
                .unwrap_or_else(|| "?".into())
        });
        row(&mut s, "max jobs in flight (sampled 1/s)", &|p| {
            p.max_in_flight
                .map(|v| format!("{v:.0}"))
                .unwrap_or_else(|| "-".into())
        });
        let _ = writeln!(s);
        if let Some(r) = self.ratio() {
            let _ = writeln!(s, "worker / bare loop throughput: {:.1} %", r * 100.0);
        }
        let total: f64 = self.db_per_job.values().sum();
        let kinds: Vec<String> = self
            .db_per_job
            .iter()
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect();
        let _ = writeln!(
            s,
            "PostgreSQL statements per job: {total:.4} ({})",
            kinds.join(", ")
        );
        let n = args.jobs as f64;
        let _ = writeln!(
            s,
            "PostgreSQL (its own counters): {:.3} transactions per job, {} sessions opened",
            self.pg.transactions as f64 / n,
            self.pg.sessions
        );
        for (name, t) in &self.pg.tables {
            let _ = writeln!(
                s,
                "  {name:<24} per job: {:.4} scans, {:.4} inserted, {:.4} updated, {:.4} deleted",
                t.scans as f64 / n,
                t.inserted as f64 / n,
                t.updated as f64 / n,
                t.deleted as f64 / n
            );
        }
        let _ = writeln!(s, "token refreshes: {}", self.token_refreshes);
        let retries: Vec<String> = self
            .retries
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(
            s,
            "deliveries per job: {:.3}; sent to a delay queue: {}",
            self.deliveries_per_job,
            if retries.is_empty() {
                "none".to_owned()
            } else {
                retries.join(", ")
            }
        );
        let results: Vec<String> = self
            .worker
            .outcome
            .outcomes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(
            s,
            "worker results: {}; duplicates {}",
            results.join(", "),
            self.worker.outcome.duplicates
        );
        let _ = writeln!(s, "integrations stored in {:.1} s", self.setup_secs);
        if let Some(w) = self.warmup_secs {
            let _ = writeln!(
                s,
                "warm-up (one job per organization, not measured): {w:.1} s"
            );
        }
        s
    }
}
