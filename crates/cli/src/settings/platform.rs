//! The platform sender: the address, name and transport of organizations that
//! send through the platform rather than their own provider.

use anyhow::Context as _;
use clap::Args;
use mail_dispatch_domain::{EmailAddress, Mailbox};

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Platform sender")]
pub struct PlatformSettings {
    #[arg(
        long,
        env = "MAIL_DISPATCH_DEFAULT_SENDER",
        default_value = "no-reply@localhost"
    )]
    pub default_sender: String,
    #[arg(
        long,
        env = "MAIL_DISPATCH_DEFAULT_SENDER_NAME",
        default_value = "Notifications"
    )]
    pub default_sender_name: String,
    // Hidden in `--help`: an SMTP URL may carry a password.
    #[arg(
        long,
        env = "MAIL_DISPATCH_DEFAULT_TRANSPORT",
        default_value = "file://./outbox",
        hide_env_values = true
    )]
    pub default_transport: String,
}

impl PlatformSettings {
    pub fn default_sender(&self) -> anyhow::Result<Mailbox> {
        let email =
            EmailAddress::parse(&self.default_sender).context("MAIL_DISPATCH_DEFAULT_SENDER")?;
        let name = (!self.default_sender_name.is_empty()).then(|| self.default_sender_name.clone());
        Ok(Mailbox::new(email, name))
    }
}
