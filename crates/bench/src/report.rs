//! What the throughput scenario reports, as a table for people or as JSON for
//! scripts, and the [`Printed`] trait that both scenarios' reports implement.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::BenchArgs;
use crate::fairness::FairnessReport;
use crate::load::LoadOutcome;
use crate::pgstats::PgStats;
use crate::procfs::{self, CpuSnapshot};

/// What a scenario reports, as text or JSON.
pub trait Printed {
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

impl Printed for FairnessReport {
    fn text(&self, args: &BenchArgs) -> String {
        FairnessReport::text(self, args)
    }
    fn json(&self, args: &BenchArgs) -> Value {
        FairnessReport::json(self, args)
    }
}

/// Everything a run measured.
pub struct Report {
    pub bare: Option<Phase>,
    pub worker: Phase,
    /// Worker metrics deltas over the load, per job.
    pub db_per_job: BTreeMap<String, f64>,
    pub token_refreshes: f64,
    /// Deliveries taken from the jobs queue per job (above 1: delays, redeliveries).
    pub deliveries_per_job: f64,
    /// Jobs sent to a delay queue, by reason.
    pub retries: BTreeMap<String, f64>,
    pub setup_secs: f64,
    /// Time of the warm-up pass (`--warmup`).
    pub warmup_secs: Option<f64>,
    /// PostgreSQL's own counters over the load (until the worker stopped).
    pub pg: PgStats,
}

/// One measured load.
pub struct Phase {
    pub outcome: LoadOutcome,
    pub before: CpuSnapshot,
    pub after: CpuSnapshot,
    pub peak_rss_kb: Option<u64>,
    pub max_in_flight: Option<f64>,
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

    pub fn json(&self, args: &BenchArgs) -> Value {
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

    pub fn text(&self, args: &BenchArgs) -> String {
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
