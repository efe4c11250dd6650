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
        let pending: Vec<(String, NaiveDate, i32)> = {
            let mut s = self.state();
            s.orgs
                .iter_mut()
                .filter_map(|(org, o)| o.daily.as_mut().map(|d| (org, d)))
                .filter(|(_, d)| d.unflushed > 0)
                .filter_map(|(org, d)| {
                    let n = std::mem::take(&mut d.unflushed);
                    d.day.map(|day| (org.clone(), day, n as i32))
                })
                .collect()
        };
        if pending.is_empty() {
            return;
        }
        // The lock is not held over the round trip: admissions go on meanwhile, and
        // what they count lands in `unflushed` for the next flush.
        match store.add_daily_counts(&pending).await {
            Ok(totals) => {
                let mut s = self.state();
                for (org, day, total) in totals {
                    if let Some(d) = s.orgs.get_mut(&org).and_then(|o| o.daily.as_mut())
                        && d.day == Some(day)
                    {
                        d.shared = total.max(0) as u32;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not flush daily sending counts; keeping them for the next flush");
                let mut s = self.state();
                for (org, day, n) in pending {
                    if let Some(d) = s.orgs.get_mut(&org).and_then(|o| o.daily.as_mut())
                        && d.day == Some(day)
                    {
                        d.unflushed += n as u32;
                    }
                }
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
