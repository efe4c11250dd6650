//! `--perf-out`: the worker recorded with `perf record` while the measured load
//! runs, for profiles of where its CPU goes.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;

use crate::child;

/// Starts `perf record` on process `pid`, writing to `out`.
pub fn start(
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

/// Stops `perf record` as Ctrl-C would, so that it writes its file, and waits.
pub async fn stop(mut perf: std::process::Child) {
    child::signal(perf.id(), "INT");
    let _ = tokio::task::spawn_blocking(move || perf.wait()).await;
}
