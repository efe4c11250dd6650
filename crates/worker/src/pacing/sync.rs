//! What the replicas share through PostgreSQL: the rolling-window counts (each
//! replica writes what it sent since its last flush and reads back the total) and the 429
//! pauses still running. The only part of the pacer that knows the store, so the
//! rules stay testable without a database; when to call it is the worker's wiring's
//! business.

use mail_dispatch_store::{Store, WindowTotal};

use super::{Counter, GOOGLE_PROJECT, Pacer};

/// One counter to write (units, possibly 0 to only read the total back).
type Pending = (String, Counter, u32);

impl Pacer {
    /// Writes this worker's counts since the last flush and reads back the
    /// totals over the rolling window (also of the counters whose oldest bucket
    /// left it, to learn the next oldest).
    pub async fn flush_daily(&self, store: &Store) {
        let pending = self.begin_daily_flush();
        if pending.is_empty() {
            return;
        }
        let rows: Vec<(String, i16, i32)> = pending
            .iter()
            .map(|(org, c, n)| (org.clone(), c.code(), *n as i32))
            .collect();
        // The lock is not held over the round trip: admissions go on meanwhile,
        // counting what is being written (`flushing`) and what they add (`unflushed`).
        let written = store.add_window_counts(&rows, self.config.window).await;
        if let Err(e) = &written {
            tracing::warn!(error = %e, "could not flush sending counts; keeping them for the next flush");
        }
        self.end_daily_flush(&pending, written.ok());
    }

    /// Moves the counts to write from `unflushed` to `flushing`, and returns
    /// them with the stale counters to read back.
    pub(super) fn begin_daily_flush(&self) -> Vec<Pending> {
        let mut s = self.state();
        let mut pending = Vec::new();
        for (org, o) in s.orgs.iter_mut() {
            let Some(counts) = o.window.as_mut() else {
                continue;
            };
            for c in Counter::ALL {
                let w = counts.get_mut(c);
                if w.unflushed > 0 || w.stale {
                    let n = std::mem::take(&mut w.unflushed);
                    w.flushing += n;
                    pending.push((org.clone(), c, n));
                }
            }
        }
        pending
    }

    /// Takes the flush's answer: the shared totals, or (`None`) a failure, after
    /// which the counts wait for the next flush.
    pub(super) fn end_daily_flush(&self, pending: &[Pending], totals: Option<Vec<WindowTotal>>) {
        let mut s = self.state();
        for (org, c, n) in pending {
            if let Some(counts) = s.orgs.get_mut(org).and_then(|o| o.window.as_mut()) {
                let w = counts.get_mut(*c);
                w.flushing = w.flushing.saturating_sub(*n);
                if totals.is_none() {
                    w.unflushed += *n;
                }
            }
        }
        for t in totals.unwrap_or_default() {
            let Some(c) = Counter::from_code(t.counter) else {
                continue;
            };
            if let Some(counts) = s
                .orgs
                .get_mut(&t.organization_id)
                .and_then(|o| o.window.as_mut())
            {
                let w = counts.get_mut(c);
                w.shared = t.total.max(0) as u32;
                w.oldest = t
                    .oldest_leaves_at
                    .map(|at| (at, t.oldest_units.unwrap_or(0).max(0) as u32));
                w.stale = false;
            }
        }
    }

    /// Loads the pauses still running (at start: notifications sent before were missed).
    pub async fn load_pauses(&self, store: &Store) {
        if let Ok(pauses) = store.active_pauses().await {
            // Lifts announced while the listener was away were missed too: a
            // pause the store no longer holds is over.
            {
                let active: std::collections::HashSet<&str> =
                    pauses.iter().map(|(org, _)| org.as_str()).collect();
                let mut s = self.state();
                for (org, o) in s.orgs.iter_mut() {
                    if !active.contains(org.as_str()) {
                        o.pause = None;
                    }
                }
                if !active.contains(GOOGLE_PROJECT) {
                    s.google_project_pause = None;
                }
            }
            for (org, until) in pauses {
                self.apply_pause(&org, until);
            }
        }
    }
}
