//! Integration changes pushed by PostgreSQL (`LISTEN`/`NOTIFY`), so that every
//! replica's cache follows a configuration change within moments.

use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

/// The notification channel the integrations trigger sends on.
pub const CHANNEL: &str = "mail_dispatch_integration";
/// The channel mailbox pauses are announced on (`<organization> <until, ms>`).
pub const PAUSE_CHANNEL: &str = "mail_dispatch_pause";
/// The channel a freed Graph mailbox slot is announced on (`<organization>`).
pub const SLOT_CHANNEL: &str = "mail_dispatch_slot";

/// A change to forward to caches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IntegrationChange {
    /// This organization's integration changed.
    Organization(String),
    /// Notifications may have been missed (the listener reconnected): forget everything.
    All,
    /// A provider throttled this organization's mailbox until this instant.
    Pause {
        organization_id: String,
        until: chrono::DateTime<chrono::Utc>,
    },
    /// A replica gave back one of this organization's Graph mailbox slots.
    SlotFreed(String),
}

/// How often the listening connection is checked. A connection that only waits
/// for notifications sends nothing, so nothing else would notice that it stopped
/// receiving any (a partition that leaves the socket open, where keepalives are
/// answered by something other than the server).
const HEARTBEAT: Duration = Duration::from_secs(10);

/// Listens for integration changes until `changes` is closed, reconnecting with
/// backoff when the connection drops or stops answering. Every (re)connection
/// first sends [`IntegrationChange::All`], because changes made while
/// disconnected were missed. One connection, with the store's connection settings.
pub fn spawn_change_listener(
    store: &crate::Store,
    changes: mpsc::UnboundedSender<IntegrationChange>,
) -> tokio::task::JoinHandle<()> {
    let config = store.pg_config().clone();
    let tls = store.tls();
    let limits = Limits {
        connect: store.settings().timeout,
        statement: store.settings().statement_deadline(),
    };
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(100);
        while !changes.is_closed() {
            match listen(&config, &tls, limits, &changes).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "integration change listener disconnected");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    })
}

#[derive(Clone, Copy)]
struct Limits {
    connect: Duration,
    statement: Duration,
}

async fn bounded<T>(
    limit: Duration,
    what: &str,
    step: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, step).await {
        Ok(done) => done.map_err(|e| e.to_string()),
        Err(_) => Err(format!("{what}: no answer within {} ms", limit.as_millis())),
    }
}

async fn listen(
    config: &tokio_postgres::Config,
    tls: &tokio_postgres_rustls::MakeRustlsConnect,
    limits: Limits,
    changes: &mpsc::UnboundedSender<IntegrationChange>,
) -> Result<(), String> {
    let (client, mut connection) =
        bounded(limits.connect, "connect", config.connect(tls.clone())).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    let change = match n.channel() {
                        PAUSE_CHANNEL => parse_pause(n.payload()),
                        SLOT_CHANNEL => Some(IntegrationChange::SlotFreed(n.payload().to_owned())),
                        _ => Some(IntegrationChange::Organization(n.payload().to_owned())),
                    };
                    if let Some(change) = change {
                        let _ = tx.send(Ok(change));
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
    });
    let listening = async {
        bounded(
            limits.statement,
            "LISTEN",
            client.batch_execute(&format!(
                "LISTEN {CHANNEL}; LISTEN {PAUSE_CHANNEL}; LISTEN {SLOT_CHANNEL}"
            )),
        )
        .await?;
        let _ = changes.send(IntegrationChange::All);
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = rx.recv() => match message {
                    Some(Ok(change)) => {
                        if changes.send(change).is_err() {
                            return Ok(());
                        }
                    }
                    Some(Err(e)) => return Err(e.to_string()),
                    None => return Err("connection closed".to_owned()),
                },
                _ = heartbeat.tick() => {
                    bounded(limits.statement, "heartbeat", client.batch_execute("SELECT 1")).await?;
                }
                () = changes.closed() => return Ok(()),
            }
        }
    };
    let result = listening.await;
    driver.abort();
    result
}

fn parse_pause(payload: &str) -> Option<IntegrationChange> {
    let (org, ms) = payload.rsplit_once(' ')?;
    let until = chrono::DateTime::from_timestamp_millis(ms.parse().ok()?)?;
    Some(IntegrationChange::Pause {
        organization_id: org.to_owned(),
        until,
    })
}
