//! Group commit: concurrent requests of one kind merged into one statement.
//!
//! There is no timer and no background task. A caller that finds fewer than
//! [`MAX_IN_FLIGHT`] statements of its kind running becomes a *leader*: it runs
//! one statement at once, for its own request plus everything already pending (at
//! most [`MAX_BATCH`] requests). A caller that finds every slot taken queues its
//! request and waits. When a leader's statement returns, the leader hands its slot
//! to the oldest pending request, whose caller becomes the next leader and takes
//! everything that accumulated meanwhile ("natural batching"), and only then answers
//! the requests of its batch. So a lone request pays no extra latency, a leader runs
//! exactly one statement (no caller is kept serving others), and under load each
//! statement carries what arrived while the previous one ran.
//!
//! One statement of each kind at a time: a statement holds one pooled connection
//! while it runs, and one at a time carries larger batches, which costs PostgreSQL
//! less per job than several smaller ones (BENCHMARKS.md has the measurements).
//!
//! A key (organization and job id) appears at most once per statement (ON
//! CONFLICT cannot touch a row twice): a request for a key already in the batch being formed stays pending
//! for the next one, as does a request with a different lease. A failed statement
//! answers every request of its batch with the error ([`StoreError::Shared`]). A
//! leader whose caller is cancelled mid-statement still hands its slot on (its
//! `Slot` does so when dropped); the requests of that abandoned batch are answered
//! with `StoreError::Unavailable`, so nobody waits forever.
//!
//! The operations themselves (what one statement does) implement [`Op`]; the
//! ledger's are in `ledger_batch.rs`.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::{JobKey, Store, StoreError};

/// At most this many requests per statement.
pub(crate) const MAX_BATCH: usize = 256;
/// At most this many statements of one kind at once.
pub(crate) const MAX_IN_FLIGHT: usize = 1;

/// A kind of batched statement.
pub(crate) trait Op: Sized + 'static {
    /// What a request carries besides its key and lease.
    type Payload: Send + 'static;
    /// The answer to one request.
    type Output: Send + 'static;
    /// Runs one statement for `items` (distinct keys); one output per item, in order.
    fn run(
        store: &Store,
        items: Vec<(JobKey, Self::Payload)>,
        lease: Duration,
    ) -> impl Future<Output = Result<Vec<Self::Output>, StoreError>> + Send;
}

pub(crate) struct Request<P> {
    pub(crate) key: JobKey,
    pub(crate) payload: P,
    pub(crate) lease: Duration,
}

/// A queued request and where to answer it.
pub(crate) struct Entry<O: Op> {
    request: Request<O::Payload>,
    reply: oneshot::Sender<Reply<O>>,
}

enum Reply<O: Op> {
    /// The statement ran: this request's answer.
    Done(Result<O::Output, StoreError>),
    /// The request comes back with a slot: its caller leads the next statement.
    Lead(Request<O::Payload>, Slot<O>),
}

pub(crate) struct State<O: Op> {
    pub(crate) pending: VecDeque<Entry<O>>,
    /// Slots taken: statements running, or handed to a caller about to run one.
    /// Invariant: `pending` is empty unless every slot is taken, and a slot is
    /// only released when `pending` is empty.
    pub(crate) in_flight: usize,
}

pub(crate) struct Queue<O: Op> {
    state: Mutex<State<O>>,
}

impl<O: Op> Default for Queue<O> {
    fn default() -> Self {
        Queue {
            state: Mutex::new(State {
                pending: VecDeque::new(),
                in_flight: 0,
            }),
        }
    }
}

/// The right to run one statement. Dropped — after the statement, or with a
/// cancelled leader, or in an answer nobody received — it passes itself to the
/// oldest pending request, or is released if none is pending.
struct Slot<O: Op> {
    queue: Option<Arc<Queue<O>>>,
}

impl<O: Op> Drop for Slot<O> {
    fn drop(&mut self) {
        if let Some(queue) = self.queue.take() {
            queue.pass_on();
        }
    }
}

fn abandoned() -> StoreError {
    StoreError::Unavailable("ledger batch abandoned: its leader was cancelled".into())
}

impl<O: Op> Queue<O> {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State<O>> {
        // Nothing panics while holding the lock; a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) async fn submit(
        self: &Arc<Self>,
        store: &Store,
        request: Request<O::Payload>,
    ) -> Result<O::Output, StoreError> {
        let waiting = {
            let mut state = self.lock();
            if state.in_flight < MAX_IN_FLIGHT {
                state.in_flight += 1;
                Err(request)
            } else {
                let (reply, receiver) = oneshot::channel();
                state.pending.push_back(Entry { request, reply });
                Ok(receiver)
            }
        };
        let (request, slot) = match waiting {
            Err(request) => (
                request,
                Slot {
                    queue: Some(self.clone()),
                },
            ),
            Ok(receiver) => match receiver.await {
                Ok(Reply::Done(answer)) => return answer,
                Ok(Reply::Lead(request, slot)) => (request, slot),
                Err(_) => return Err(abandoned()),
            },
        };
        self.lead(store, request, slot).await
    }

    /// Runs one statement for `own` and what is pending, then hands `slot` on.
    async fn lead(
        &self,
        store: &Store,
        own: Request<O::Payload>,
        slot: Slot<O>,
    ) -> Result<O::Output, StoreError> {
        let lease = own.lease;
        let others = self.take_batch(&own);
        let mut items = Vec::with_capacity(others.len() + 1);
        let mut replies = Vec::with_capacity(others.len());
        items.push((own.key, own.payload));
        for Entry { request, reply } in others {
            items.push((request.key, request.payload));
            replies.push(reply);
        }
        let result = O::run(store, items, lease).await;
        // What accumulated meanwhile goes out before this batch is answered.
        drop(slot);
        match result {
            Ok(outputs) => {
                let mut outputs = outputs.into_iter();
                let own = outputs.next();
                for (reply, output) in replies.into_iter().zip(outputs) {
                    let _ = reply.send(Reply::Done(Ok(output)));
                }
                own.ok_or_else(|| StoreError::Unavailable("ledger batch gave no answer".into()))
            }
            Err(error) => {
                let error = Arc::new(error);
                for reply in replies {
                    let _ = reply.send(Reply::Done(Err(StoreError::Shared(error.clone()))));
                }
                Err(Arc::try_unwrap(error).unwrap_or_else(StoreError::Shared))
            }
        }
    }

    /// Takes the pending requests that can share a statement with `own`: oldest
    /// first, same lease, keys distinct, at most `MAX_BATCH` in all. Requests
    /// whose caller gave up are dropped.
    fn take_batch(&self, own: &Request<O::Payload>) -> Vec<Entry<O>> {
        let mut state = self.lock();
        if state.pending.is_empty() {
            return Vec::new();
        }
        let mut batch = Vec::new();
        let mut keys = HashSet::from([own.key.clone()]);
        let mut kept = VecDeque::new();
        let mut pending = std::mem::take(&mut state.pending);
        while let Some(entry) = pending.pop_front() {
            if batch.len() + 1 >= MAX_BATCH {
                kept.push_back(entry);
                kept.append(&mut pending);
                break;
            }
            if entry.reply.is_closed() {
                continue;
            }
            if entry.request.lease == own.lease && !keys.contains(&entry.request.key) {
                keys.insert(entry.request.key.clone());
                batch.push(entry);
            } else {
                kept.push_back(entry);
            }
        }
        state.pending = kept;
        batch
    }

    /// A slot was given back: hand it to the oldest pending request whose caller
    /// still waits, or release it.
    fn pass_on(self: Arc<Self>) {
        loop {
            let entry = {
                let mut state = self.lock();
                match state.pending.pop_front() {
                    Some(entry) => entry,
                    None => {
                        state.in_flight -= 1;
                        return;
                    }
                }
            };
            let slot = Slot {
                queue: Some(self.clone()),
            };
            match entry.reply.send(Reply::Lead(entry.request, slot)) {
                Ok(()) => return,
                // Its caller is gone: the slot goes to the next one (not through
                // `Drop`, which would recurse).
                Err(Reply::Lead(_, mut slot)) => slot.queue = None,
                Err(Reply::Done(_)) => {}
            }
        }
    }
}
