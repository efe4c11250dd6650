//! Child processes under test: the worker (`mail-dispatch worker`) and the bare
//! broker loop (`bench bare-consumer`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::AsyncBufReadExt as _;
use tokio::process::{Child, Command};

/// A running child process, killed when dropped.
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
    pub pid: u32,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &'static str, mut command: Command, log: &Path) -> anyhow::Result<Proc> {
        let log_file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        command
            .stdin(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("starting the {name}"))?;
        let pid = child.id().context("child has no pid")?;
        Ok(Proc {
            name,
            child,
            pid,
            log: log.to_owned(),
        })
    }

    /// The last lines of its stderr.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Fails if it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the {} exited ({status}); its last log lines:\n{}",
                self.name,
                self.log_tail(20)
            );
        }
        Ok(())
    }

    /// Waits for a `ready` line on its stdout (the bare loop).
    pub async fn wait_ready_line(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let stdout = self.child.stdout.take().context("stdout not piped")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        match tokio::time::timeout(timeout, lines.next_line()).await {
            Ok(Ok(Some(l))) if l.trim() == "ready" => Ok(()),
            _ => {
                self.check_alive()?;
                bail!("the {} did not become ready", self.name)
            }
        }
    }

    /// Polls `url` until it answers 2xx (the worker's `/readyz`).
    pub async fn wait_ready_url(
        &mut self,
        http: &reqwest::Client,
        url: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if http
                .get(url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the {} was not ready after {timeout:?} ({url}); its last log lines:\n{}",
                    self.name,
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then up to `grace` to exit, then SIGKILL.
    pub async fn stop(mut self, grace: Duration) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        signal(self.pid, "TERM");
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    eprintln!(
                        "[bench] the {} exited with {status} after SIGTERM",
                        self.name
                    );
                }
            }
            Err(_) => {
                eprintln!(
                    "[bench] the {} did not stop within {grace:?}; killing it",
                    self.name
                );
                self.child.kill().await?;
            }
        }
        Ok(())
    }
}

/// Sends a signal with `kill(1)` (this crate forbids `unsafe`, so no libc call).
pub fn signal(pid: u32, name: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status();
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Waits until the process uses at most one clock tick (10 ms) of CPU over half
/// a second (start-up work, notifications done), at most `max`.
pub async fn quiesce(pid: u32, max: Duration) {
    let deadline = Instant::now() + max;
    while Instant::now() < deadline {
        let Ok(before) = crate::procfs::cpu_ticks(pid) else {
            return;
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Ok(after) = crate::procfs::cpu_ticks(pid) else {
            return;
        };
        if after.saturating_sub(before) <= 1 {
            return;
        }
    }
}
