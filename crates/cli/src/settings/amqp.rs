//! RabbitMQ: where the broker is and how this deployment's exchanges and queues
//! are named.

use clap::Args;

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "RabbitMQ")]
pub struct AmqpSettings {
    // Hidden in `--help`: the URL usually carries a password.
    #[arg(long, env = "MAIL_DISPATCH_AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    pub amqp_url: String,
    #[arg(long, env = "MAIL_DISPATCH_QUEUE_PREFIX", default_value = "")]
    pub queue_prefix: String,
}

impl AmqpSettings {
    pub fn topology(&self) -> mail_dispatch_broker::Topology {
        mail_dispatch_broker::Topology::with_prefix(&self.queue_prefix)
    }
}
