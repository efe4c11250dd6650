//! `--scenario throughput` (the default): N jobs over M organizations, as fast as
//! the worker takes them, measured against a bare lapin loop doing the same broker
//! work in the same run.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use mail_dispatch_broker::Broker;
use mail_dispatch_standins::StandIns;
use mail_dispatch_store::{PoolSettings, Store, TokenCipher};
use secrecy::SecretString;
use tokio::process::Command;

use crate::BenchArgs;
use crate::child::{self, Proc};
use crate::ctx::Ctx;
use crate::fixtures::{make_jobs, store_integrations};
use crate::load::{self, Job, LoadSpec};
use crate::pgstats::PgStats;
use crate::procfs::{self, CpuSnapshot};
use crate::prom::{self, Scrape};
use crate::report::{Phase, Report};
use crate::{perf, worker};

/// Runs the scenario: the bare loop (unless `--no-bare`), then the worker with
/// `--pacing`, on the same jobs.
pub async fn run(
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
    ctx.declare(&broker).await?;

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
        worker::spawn(args, ctx, worker_bin, &standins, &http, args.pacing).await?;

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
        Some(out) => Some(perf::start(&args.perf_args, out, worker.pid)?),
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
        perf::stop(perf).await;
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
