//! What the replicas share through PostgreSQL: the daily counts (each replica
//! writes what it sent since its last flush and reads back the total) and the 429
//! pauses still running. The only part of the pacer that knows the store, so the
//! rules stay testable without a database; when to call it is the worker's wiring's
//! business.

use chrono::NaiveDate;
use mail_dispatch_store::Store;

use super::Pacer;

impl Pacer {
    /// Writes this worker's counts since the last flush and reads back the totals.
    pub async fn flush_daily(&self, store: &Store) {
        let pending = self.begin_daily_flush();
        if pending.is_empty() {
            return;
        }
        // The lock is not held over the round trip: admissions go on meanwhile,
        // counting what is being written (`flushing`) and what they add (`unflushed`).
        let written = store.add_daily_counts(&pending).await;
        if let Err(e) = &written {
            tracing::warn!(error = %e, "could not flush daily sending counts; keeping them for the next flush");
        }
        self.end_daily_flush(&pending, written.ok());
    }

    /// Moves the counts to write from `unflushed` to `flushing`, and returns them.
    pub(super) fn begin_daily_flush(&self) -> Vec<(String, NaiveDate, i32)> {
        let mut s = self.state();
        s.orgs
            .iter_mut()
            .filter_map(|(org, o)| o.daily.as_mut().map(|d| (org, d)))
            .filter(|(_, d)| d.unflushed > 0)
            .filter_map(|(org, d)| {
                let n = std::mem::take(&mut d.unflushed);
                d.flushing += n;
                d.day.map(|day| (org.clone(), day, n as i32))
            })
            .collect()
    }

    /// Takes the flush's answer: the shared totals, or (`None`) a failure, after
    /// which the counts wait for the next flush.
    pub(super) fn end_daily_flush(
        &self,
        pending: &[(String, NaiveDate, i32)],
        totals: Option<Vec<(String, NaiveDate, i32)>>,
    ) {
        let mut s = self.state();
        for (org, day, n) in pending {
            if let Some(d) = s.orgs.get_mut(org).and_then(|o| o.daily.as_mut()) {
                d.flushing = d.flushing.saturating_sub(*n as u32);
                if totals.is_none() && d.day == Some(*day) {
                    d.unflushed += *n as u32;
                }
            }
        }
        for (org, day, total) in totals.unwrap_or_default() {
            if let Some(d) = s.orgs.get_mut(&org).and_then(|o| o.daily.as_mut())
                && d.day == Some(day)
            {
                d.shared = total.max(0) as u32;
            }
        }
    }

    /// Loads the pauses still running (at start: notifications sent before were missed).
    pub async fn load_pauses(&self, store: &Store) {
        if let Ok(pauses) = store.active_pauses().await {
            for (org, until) in pauses {
                self.apply_pause(&org, until);
            }
        }
    }
}
