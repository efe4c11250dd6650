//! Results confirmed by the broker are marked `published` in the ledger in
//! batches: one `UPDATE` per batch instead of one per job. Safe to defer: the
//! delivery is already acked, so only a duplicate publish of the same job id by a
//! producer, within the batching delay, could find the entry still `completed` (and
//! then re-publish its stored result once its publish lease is over).

use std::sync::Mutex;
use std::time::Duration;

use mail_dispatch_store::JobKey;
use tokio::sync::Notify;

use crate::ports::JobLedger;

/// A batch is written when it reaches this size, or after `FLUSH_EVERY`.
const BATCH: usize = 500;
const FLUSH_EVERY: Duration = Duration::from_millis(20);

#[derive(Debug, Default)]
pub struct PublishedMarks {
    pending: Mutex<Vec<JobKey>>,
    full: Notify,
}

impl PublishedMarks {
    pub fn push(&self, key: JobKey) {
        let mut pending = self.pending.lock().expect("poisoned");
        pending.push(key);
        if pending.len() >= BATCH {
            self.full.notify_one();
        }
    }

    /// Writes what is pending now.
    pub async fn flush(&self, ledger: &dyn JobLedger) {
        let batch = std::mem::take(&mut *self.pending.lock().expect("poisoned"));
        if batch.is_empty() {
            return;
        }
        if let Err(e) = ledger.mark_published(&batch).await {
            tracing::warn!(error = %e, jobs = batch.len(), "could not mark results published; retrying with the next batch");
            self.pending.lock().expect("poisoned").extend(batch);
        }
    }

    /// Flushes every `FLUSH_EVERY`, or as soon as a batch is full; never returns.
    pub async fn run(&self, ledger: &dyn JobLedger) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(FLUSH_EVERY) => {}
                () = self.full.notified() => {}
            }
            self.flush(ledger).await;
        }
    }
}
