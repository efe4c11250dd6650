//! What a delivery's runner must know about its work if it has to drop it (the
//! shutdown grace ran out): the job's claim, and whether a send is at the
//! provider. The dispatcher and the sender fill it in as the work goes; the
//! runner reads it after dropping the work, to mark the claim ambiguous (the
//! provider may have accepted the message) or release it (nothing was sent).

use std::sync::{Arc, Mutex};

use mail_dispatch_domain::ProviderKind;
use mail_dispatch_store::{ClaimOwner, JobKey};

/// Shared between a delivery's work and its runner; clones share the state.
#[derive(Clone, Debug, Default)]
pub struct InFlight(Arc<Mutex<State>>);

#[derive(Debug, Default)]
struct State {
    /// The claim held. It is not cleared when the outcome is recorded or the
    /// claim released: the ledger statements the runner uses act only on a
    /// row still `claimed` by this owner, so they leave those alone.
    claim: Option<(JobKey, ClaimOwner)>,
    /// A request went to this provider and its answer does not say the message
    /// was refused: an acceptance, or no answer yet, or a lost one.
    at_provider: Option<ProviderKind>,
}

/// What was under way when the work was dropped.
#[derive(Debug, PartialEq, Eq)]
pub enum Dropped {
    /// Nothing claimed (or the outcome is recorded, or the claim released).
    Nothing,
    /// Claimed; no send at the provider: nothing can have gone out.
    Claimed(JobKey, ClaimOwner),
    /// Claimed, and a send at `provider` may have been accepted.
    AtProvider(JobKey, ClaimOwner, ProviderKind),
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is plain data, consistent after every write: a panic
        // elsewhere does not make it unusable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The job was claimed by `owner`.
    pub(crate) fn claimed(&self, key: &JobKey, owner: ClaimOwner) {
        self.lock().claim = Some((key.clone(), owner));
    }

    /// A request is being handed to `provider`.
    pub(crate) fn handed_to(&self, provider: ProviderKind) {
        self.lock().at_provider = Some(provider);
    }

    /// The provider's answer says the message was not accepted.
    pub(crate) fn refused(&self) {
        self.lock().at_provider = None;
    }

    /// Takes what was under way (the work was dropped).
    pub fn take(&self) -> Dropped {
        let state = std::mem::take(&mut *self.lock());
        match (state.claim, state.at_provider) {
            (None, _) => Dropped::Nothing,
            (Some((key, owner)), None) => Dropped::Claimed(key, owner),
            (Some((key, owner)), Some(provider)) => Dropped::AtProvider(key, owner, provider),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> JobKey {
        JobKey::new("org_a", "job-1")
    }

    const OWNER: ClaimOwner = ClaimOwner(7);

    #[test]
    fn work_dropped_before_its_claim_leaves_nothing_to_settle() {
        let in_flight = InFlight::default();
        assert_eq!(in_flight.take(), Dropped::Nothing);
        // A request without a claim (none is made, but the flag alone must not
        // make the runner touch a ledger row it does not hold).
        in_flight.handed_to(ProviderKind::Google);
        assert_eq!(in_flight.take(), Dropped::Nothing);
    }

    #[test]
    fn a_claim_with_no_request_out_is_released_not_marked_ambiguous() {
        let in_flight = InFlight::default();
        in_flight.claimed(&key(), OWNER);
        assert_eq!(in_flight.take(), Dropped::Claimed(key(), OWNER));
    }

    #[test]
    fn a_request_handed_to_the_provider_may_have_been_accepted() {
        let in_flight = InFlight::default();
        in_flight.claimed(&key(), OWNER);
        in_flight.handed_to(ProviderKind::Microsoft);
        assert_eq!(
            in_flight.take(),
            Dropped::AtProvider(key(), OWNER, ProviderKind::Microsoft)
        );
    }

    #[test]
    fn a_refusal_clears_the_flag_and_the_next_attempt_sets_it_again() {
        let in_flight = InFlight::default();
        in_flight.claimed(&key(), OWNER);
        in_flight.handed_to(ProviderKind::Google);
        // The provider answered that it did not take the message (a 429, a 400).
        in_flight.refused();
        assert_eq!(in_flight.take(), Dropped::Claimed(key(), OWNER));

        in_flight.claimed(&key(), OWNER);
        in_flight.handed_to(ProviderKind::Google);
        in_flight.refused();
        // The retry goes out (to the platform sender, as a fallback would).
        in_flight.handed_to(ProviderKind::Default);
        assert_eq!(
            in_flight.take(),
            Dropped::AtProvider(key(), OWNER, ProviderKind::Default)
        );
    }

    #[test]
    fn a_new_claim_replaces_the_previous_owner() {
        let in_flight = InFlight::default();
        in_flight.claimed(&key(), OWNER);
        in_flight.claimed(&key(), ClaimOwner(8));
        assert_eq!(in_flight.take(), Dropped::Claimed(key(), ClaimOwner(8)));
    }

    #[test]
    fn the_runner_sees_what_the_work_recorded_on_its_clone_and_takes_it_once() {
        let runner = InFlight::default();
        let work = runner.clone();
        work.claimed(&key(), OWNER);
        work.handed_to(ProviderKind::Google);
        assert_eq!(
            runner.take(),
            Dropped::AtProvider(key(), OWNER, ProviderKind::Google)
        );
        // Taken: a second look (by either side) finds nothing left to settle.
        assert_eq!(runner.take(), Dropped::Nothing);
        assert_eq!(work.take(), Dropped::Nothing);
    }

    #[test]
    fn a_panic_while_holding_the_lock_does_not_make_the_state_unreadable() {
        let in_flight = InFlight::default();
        in_flight.claimed(&key(), OWNER);
        let poisoner = in_flight.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.0.lock().unwrap();
            panic!("a panic elsewhere, lock held");
        })
        .join();
        assert!(in_flight.0.is_poisoned());
        in_flight.handed_to(ProviderKind::Google);
        assert_eq!(
            in_flight.take(),
            Dropped::AtProvider(key(), OWNER, ProviderKind::Google)
        );
    }
}
