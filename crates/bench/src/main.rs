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
mod ctx;
mod fairness;
mod fixtures;
mod load;
mod perf;
mod pgstats;
mod procfs;
mod prom;
mod report;
mod throughput;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::{Parser, Subcommand, ValueEnum};

use crate::ctx::Ctx;
use crate::report::Printed;

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
    /// Provider pacing limits raised out of the way, in the worker and in the
    /// sandbox (whose Graph mailboxes then take `--concurrency` requests at
    /// once instead of Graph's 4): the worker's own throughput.
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

/// Checks the arguments, names the run's queues and database, and runs the
/// chosen scenario.
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
        Scenario::Throughput => {
            interruptible(&args, &ctx, throughput::run(&args, &ctx, &worker_bin)).await
        }
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
