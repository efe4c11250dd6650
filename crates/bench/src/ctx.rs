//! One run's context: the names of its queues, exchanges and database (unique to
//! the run, so runs and the test suite can share a broker and a server), its token
//! key and files, and the cleanup that removes them all.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use mail_dispatch_broker::{Broker, Topology};
use mail_dispatch_store::TokenCipher;

use crate::BenchArgs;

/// Names and places of one run, all unique to it.
pub struct Ctx {
    pub prefix: String,
    pub topology: Topology,
    /// Our queue on the worker's results exchange.
    pub tap_queue: String,
    pub bare_jobs: String,
    pub bare_results: String,
    pub db_name: String,
    pub db_url: String,
    pub token_key: String,
    pub tmp: PathBuf,
    /// Where the platform sender writes its `.eml` files.
    pub outbox: PathBuf,
}

impl Ctx {
    pub fn new(args: &BenchArgs) -> anyhow::Result<Ctx> {
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

    /// Declares our results queue (quorum, like the jobs queues) on the worker's
    /// results exchange, and the bare loop's queues and exchange.
    pub async fn declare(&self, broker: &Broker) -> anyhow::Result<()> {
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
        for q in [&self.tap_queue, &self.bare_jobs, &self.bare_results] {
            channel
                .queue_declare(q.as_str().into(), durable, quorum.clone())
                .await?;
        }
        channel
            .exchange_declare(
                self.bare_results.as_str().into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        for (queue, exchange) in [
            (&self.tap_queue, &self.topology.results_exchange),
            (&self.bare_results, &self.bare_results),
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

    /// Deletes our queues, exchanges, database and files. Best effort.
    pub async fn cleanup(&self, args: &BenchArgs) {
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
