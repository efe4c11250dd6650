//! What the process tells its operators: the log format and the address of the
//! metrics and health endpoints.

use std::net::SocketAddr;

use clap::Args;

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Logs and metrics")]
pub struct TelemetrySettings {
    #[arg(long, env = "MAIL_DISPATCH_LOG_FORMAT", default_value = "pretty")]
    pub log_format: String,
    #[arg(
        long,
        env = "MAIL_DISPATCH_METRICS_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    pub metrics_listen: SocketAddr,
}

impl TelemetrySettings {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            matches!(self.log_format.as_str(), "pretty" | "json"),
            "MAIL_DISPATCH_LOG_FORMAT must be `pretty` or `json`"
        );
        Ok(())
    }
}
