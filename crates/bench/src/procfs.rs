//! What Linux's `/proc` tells about CPU time and memory.

use std::collections::BTreeMap;

use anyhow::Context as _;

/// Clock ticks per second of `/proc/*/stat` times (`getconf CLK_TCK`, 100 on Linux).
pub fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(100)
}

/// (command name, utime + stime in ticks) of one process.
fn read_stat(path: &str) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(path).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    // After ")": state (field 3), ... utime is field 14, stime field 15.
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// User + system CPU time of a process so far, in ticks.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    read_stat(&format!("/proc/{pid}/stat"))
        .map(|(_, t)| t)
        .with_context(|| format!("cannot read /proc/{pid}/stat"))
}

/// User + system CPU time of this process so far, in ticks.
pub fn own_cpu_ticks() -> u64 {
    read_stat("/proc/self/stat").map(|(_, t)| t).unwrap_or(0)
}

/// A `Vm*` line of `/proc/<pid>/status`, in kB.
fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Peak resident set size (`VmHWM`), in kB.
pub fn peak_rss_kb(pid: u32) -> Option<u64> {
    status_kb(pid, "VmHWM:")
}

/// CPU ticks used so far by the services that share the machine with the worker,
/// summed over their processes: RabbitMQ (`beam.smp`) and PostgreSQL (`postgres`).
/// Processes that exit in between are lost, so this is a lower bound.
pub fn service_ticks() -> BTreeMap<&'static str, u64> {
    let mut sums = BTreeMap::from([("rabbitmq", 0u64), ("postgresql", 0u64)]);
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return sums;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Some((comm, ticks)) = read_stat(&format!("/proc/{pid}/stat")) else {
            continue;
        };
        let group = match comm.as_str() {
            "beam.smp" | "erl_child_setup" | "epmd" => "rabbitmq",
            "postgres" => "postgresql",
            _ => continue,
        };
        *sums.get_mut(group).expect("known group") += ticks;
    }
    sums
}

/// (busy, total) ticks of the whole machine so far, from `/proc/stat`.
pub fn machine_ticks() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest times are in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// Logical CPUs of the machine.
pub fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The CPU model, from `/proc/cpuinfo`.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// A snapshot of every CPU counter a phase reports.
#[derive(Clone, Debug)]
pub struct CpuSnapshot {
    /// The process under test (worker or bare loop).
    pub process: u64,
    /// This process: publisher, result consumer and provider sandbox.
    pub bench: u64,
    pub services: BTreeMap<&'static str, u64>,
    pub machine_busy: u64,
    pub machine_total: u64,
}

impl CpuSnapshot {
    pub fn take(pid: u32) -> anyhow::Result<Self> {
        let (machine_busy, machine_total) = machine_ticks();
        Ok(CpuSnapshot {
            process: cpu_ticks(pid)?,
            bench: own_cpu_ticks(),
            services: service_ticks(),
            machine_busy,
            machine_total,
        })
    }
}
