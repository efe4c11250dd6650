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
