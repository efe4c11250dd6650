//! Group commit of the idempotency ledger: concurrent claims share one
//! `claim_jobs` statement, concurrent completions one `complete_jobs` statement
//! (the mechanism is `group_commit.rs`). Claims and completions run side by side:
//! each kind has its own queue.

use std::sync::Arc;
use std::time::Duration;

use crate::group_commit::{Op, Queue, Request};
use crate::{Claim, ClaimOwner, JobKey, Store, StoreError};

/// The pending claims and completions, shared by a [`Store`] and its clones.
#[derive(Clone, Default)]
pub(crate) struct LedgerBatcher {
    claims: Arc<Queue<ClaimOp>>,
    completes: Arc<Queue<CompleteOp>>,
}

impl Store {
    /// Claims `key` for `lease` (see [`Store::claim_job_now`] for what a claim
    /// finds), through group commit: concurrent calls (from this store and its
    /// clones) share one statement. See the module documentation.
    pub async fn claim_job(&self, key: &JobKey, lease: Duration) -> Result<Claim, StoreError> {
        let request = Request {
            key: key.clone(),
            payload: (),
            lease,
        };
        self.ledger_batch.claims.submit(self, request).await
    }

    /// Records the outcome of a job claimed by `owner` (before its result is
    /// published); `false` if the claim is no longer `owner`'s: nothing was
    /// recorded, and the caller must not publish. `lease` protects the
    /// publishing that follows from a concurrent redelivery. Through group
    /// commit: concurrent calls share one statement.
    pub async fn complete_job(
        &self,
        key: &JobKey,
        owner: ClaimOwner,
        result: &serde_json::Value,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let request = Request {
            key: key.clone(),
            payload: (result.clone(), owner),
            lease,
        };
        self.ledger_batch.completes.submit(self, request).await
    }
}

struct ClaimOp;

impl Op for ClaimOp {
    type Payload = ();
    type Output = Claim;

    async fn run(
        store: &Store,
        items: Vec<(JobKey, ())>,
        lease: Duration,
    ) -> Result<Vec<Claim>, StoreError> {
        let keys: Vec<JobKey> = items.into_iter().map(|(key, ())| key).collect();
        store.claim_jobs(&keys, lease).await
    }
}

struct CompleteOp;

impl Op for CompleteOp {
    type Payload = (serde_json::Value, ClaimOwner);
    type Output = bool;

    async fn run(
        store: &Store,
        items: Vec<(JobKey, (serde_json::Value, ClaimOwner))>,
        lease: Duration,
    ) -> Result<Vec<bool>, StoreError> {
        store.complete_jobs(&items, lease).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group_commit::MAX_IN_FLIGHT;
    use crate::{PoolSettings, TokenCipher};
    use secrecy::SecretString;
    use serde_json::json;
    use std::sync::atomic::Ordering::Relaxed;

    const LEASE: Duration = Duration::from_secs(60);

    /// A fresh migrated database, dropped with the value.
    struct TestDb {
        database: mail_dispatch_test_db::TempDatabase,
        store: Store,
    }

    impl TestDb {
        async fn new() -> TestDb {
            let database = mail_dispatch_test_db::TempDatabase::create("md_test_").await;
            let key = SecretString::from(TokenCipher::generate_key());
            let store = Store::connect(
                &database.url,
                TokenCipher::new(&key, &[]).unwrap(),
                PoolSettings::default(),
            )
            .unwrap();
            store.migrate().await.expect("migrations apply");
            TestDb { database, store }
        }

        async fn client(&self) -> tokio_postgres::Client {
            self.database.client().await
        }

        /// A session holding an exclusive lock on `job_ledger` until it runs COMMIT:
        /// every ledger statement waits behind it.
        async fn lock_ledger(&self) -> tokio_postgres::Client {
            let client = self.client().await;
            client
                .batch_execute("BEGIN; LOCK TABLE job_ledger IN EXCLUSIVE MODE")
                .await
                .unwrap();
            client
        }

        fn statements(&self) -> u64 {
            self.store.counts().ledger_writes.load(Relaxed)
        }
    }

    /// A claim as the tests compare it: owners are drawn from a sequence, so
    /// they are erased (`ClaimOwner(0)`); tests about owners read them.
    trait Anon {
        fn anon(self) -> Self;
    }

    impl Anon for Claim {
        fn anon(self) -> Claim {
            match self {
                Claim::Acquired { claims, .. } => acquired(claims),
                Claim::Ambiguous { .. } => Claim::Ambiguous {
                    owner: ClaimOwner(0),
                },
                other => other,
            }
        }
    }

    impl Anon for Vec<Claim> {
        fn anon(self) -> Vec<Claim> {
            self.into_iter().map(Anon::anon).collect()
        }
    }

    fn acquired(claims: i32) -> Claim {
        Claim::Acquired {
            claims,
            owner: ClaimOwner(0),
        }
    }

    /// The owner `key`'s row carries now.
    async fn owner_of(store: &Store, key: &JobKey) -> ClaimOwner {
        let client = store.ledger_client().await.unwrap();
        let row = client
            .query_one(
                "SELECT claim_id FROM job_ledger WHERE organization_id = $1 AND job_id = $2",
                &[&key.organization_id, &key.job_id],
            )
            .await
            .unwrap();
        ClaimOwner(row.get(0))
    }

    fn key(id: impl Into<String>) -> JobKey {
        JobKey::new("org_1", id)
    }

    fn items(ids: &[&str]) -> Vec<JobKey> {
        ids.iter().map(|id| key(*id)).collect()
    }

    fn spawn_claim(
        store: &Store,
        id: impl Into<String>,
    ) -> tokio::task::JoinHandle<Result<Claim, StoreError>> {
        let (store, id) = (store.clone(), id.into());
        tokio::spawn(async move { store.claim_job(&key(&id), LEASE).await })
    }

    /// Waits until `n` requests are pending in `queue`.
    async fn pending<O: Op>(queue: &Queue<O>, n: usize) {
        for _ in 0..500 {
            if queue.lock().pending.len() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{n} requests never became pending");
    }

    async fn in_flight<O: Op>(queue: &Queue<O>, n: usize) {
        for _ in 0..500 {
            if queue.lock().in_flight == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("in_flight never became {n}");
    }

    /// The plan PostgreSQL would run for `sql` on a ledger connection, prepared
    /// while the ledger was empty and executed often enough to cache a generic plan,
    /// once the ledger has grown (and no ANALYZE has invalidated that plan yet).
    async fn cached_plan_after_growth(db: &TestDb, sql: &str, args: &str) -> String {
        db.client()
            .await
            .batch_execute("TRUNCATE job_ledger; ANALYZE job_ledger")
            .await
            .unwrap();
        let ledger = db.store.ledger_client().await.unwrap();
        ledger
            .batch_execute(&format!("PREPARE probe AS {sql}"))
            .await
            .unwrap();
        for _ in 0..6 {
            ledger
                .batch_execute(&format!("EXECUTE probe({args})"))
                .await
                .unwrap();
        }
        db.client()
            .await
            .batch_execute(
                "INSERT INTO job_ledger (job_id, organization_id, state)
                 SELECT 'bulk-' || g, 'org_1', 'published' FROM generate_series(1, 20000) g",
            )
            .await
            .unwrap();
        let rows = ledger
            .query(&format!("EXPLAIN EXECUTE probe({args})"), &[])
            .await
            .unwrap();
        let plan: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        ledger.batch_execute("DEALLOCATE probe").await.unwrap();
        plan.join("\n")
    }

    #[tokio::test]
    async fn ledger_statements_prepared_on_an_empty_ledger_never_scan_it_whole() {
        let db = TestDb::new().await;
        let claim = cached_plan_after_growth(
            &db,
            crate::ledger::CLAIM_JOBS,
            "ARRAY['a','b'], ARRAY['org_1','org_1'], 60",
        )
        .await;
        assert!(!claim.contains("Seq Scan on job_ledger"), "{claim}");
        assert!(claim.contains("job_ledger_pkey"), "{claim}");
        let complete = cached_plan_after_growth(
            &db,
            crate::ledger::COMPLETE_JOBS,
            "ARRAY['a','b'], ARRAY['org_1','org_1'], ARRAY['{}','{}']::jsonb[], 60, ARRAY[1,2]::int8[]",
        )
        .await;
        assert!(!complete.contains("Seq Scan on job_ledger"), "{complete}");
        assert!(complete.contains("job_ledger_pkey"), "{complete}");
    }

    #[tokio::test]
    async fn one_claim_statement_answers_every_state_in_input_order() {
        let db = TestDb::new().await;
        let store = &db.store;
        // Unsorted input: the answers still come in input order.
        let ids = [
            "j5", "j1", "j3", "j2", "j4", "j6", "j0", "j7", "j8", "j9", "ja", "jb",
        ];
        let first = store.claim_jobs(&items(&ids), LEASE).await.unwrap().anon();
        assert_eq!(first, vec![acquired(1); ids.len()]);
        assert_eq!(db.statements(), 1);

        let client = db.client().await;
        client
            .batch_execute(
                "UPDATE job_ledger SET state = 'published' WHERE job_id IN ('j1', 'j2');
                 UPDATE job_ledger SET state = 'completed', result = '{\"r\": 3}',
                     lease_until = now() - interval '1 second' WHERE job_id = 'j3';
                 UPDATE job_ledger SET state = 'completed', result = '{\"r\": 4}' WHERE job_id = 'j4';
                 UPDATE job_ledger SET state = 'retrying', lease_until = NULL WHERE job_id = 'j5';
                 UPDATE job_ledger SET lease_until = now() - interval '1 second' WHERE job_id = 'j6';",
            )
            .await
            .unwrap();
        // j0, j7.. are live claims; jz and jy are new.
        let again = store
            .claim_jobs(
                &items(&["jz", "j0", "j1", "j2", "j3", "j4", "j5", "j6", "j7", "jy"]),
                LEASE,
            )
            .await
            .unwrap()
            .anon();
        assert_eq!(
            again,
            vec![
                acquired(1),
                Claim::Busy,
                Claim::Published,
                Claim::Published,
                Claim::Completed(Some(json!({"r": 3}))),
                Claim::Busy,
                acquired(2),
                acquired(2),
                Claim::Busy,
                acquired(1),
            ]
        );
        assert_eq!(db.statements(), 2, "one statement per batch");
        // The handed-over completed job keeps its state and result, with a fresh lease.
        let row = client
            .query_one(
                "SELECT state, result, lease_until > now() FROM job_ledger WHERE job_id = 'j3'",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, &str>(0), "completed");
        assert_eq!(row.get::<_, serde_json::Value>(1), json!({"r": 3}));
        assert!(row.get::<_, bool>(2));

        // The single-item form answers the same way.
        assert_eq!(
            store.claim_job_now(&key("j1"), LEASE).await.unwrap().anon(),
            Claim::Published
        );
        assert_eq!(
            store.claim_job_now(&key("j9"), LEASE).await.unwrap().anon(),
            Claim::Busy
        );
        assert_eq!(
            store
                .claim_job_now(&key("new"), LEASE)
                .await
                .unwrap()
                .anon(),
            acquired(1)
        );
        assert_eq!(db.statements(), 5);
    }

    #[tokio::test]
    async fn the_same_job_id_of_two_organizations_is_two_jobs() {
        let db = TestDb::new().await;
        let store = &db.store;
        let a = JobKey::new("org_a", "task-991");
        let b = JobKey::new("org_b", "task-991");
        let answers = store
            .claim_jobs(&[a.clone(), b.clone()], LEASE)
            .await
            .unwrap()
            .anon();
        assert_eq!(answers, vec![acquired(1); 2]);
        store
            .complete_jobs(
                &[(a.clone(), (json!({"org": "a"}), owner_of(store, &a).await))],
                LEASE,
            )
            .await
            .unwrap();
        store
            .mark_published(std::slice::from_ref(&a))
            .await
            .unwrap();
        store
            .release_job(&b, owner_of(store, &b).await)
            .await
            .unwrap();
        // Each keeps its own state: a is published, b waits for its retry.
        assert_eq!(
            store.claim_jobs(&[a, b], LEASE).await.unwrap().anon(),
            vec![Claim::Published, acquired(1)]
        );
    }

    #[tokio::test]
    async fn claims_count_take_overs_in_a_row_and_a_release_starts_again() {
        let db = TestDb::new().await;
        let store = &db.store;
        let k = key("crashy");
        // Each claim's worker died: its lease ran out, the next claim takes over.
        for n in 1..=3 {
            assert_eq!(
                store
                    .claim_job_now(&k, Duration::ZERO)
                    .await
                    .unwrap()
                    .anon(),
                acquired(n)
            );
        }
        // An attempt that returned (a failure to retry) is an outcome.
        store
            .release_job(&k, owner_of(store, &k).await)
            .await
            .unwrap();
        assert_eq!(
            store.claim_job_now(&k, LEASE).await.unwrap().anon(),
            acquired(1)
        );
        store
            .release_job(&k, owner_of(store, &k).await)
            .await
            .unwrap();
        // A replayed dead letter starts from nothing too.
        store
            .complete_job_now(&k, owner_of(store, &k).await, &json!({}), LEASE)
            .await
            .unwrap();
        store.reopen_job(&k).await.unwrap();
        assert_eq!(
            store.claim_job_now(&k, LEASE).await.unwrap().anon(),
            acquired(1)
        );
    }

    #[tokio::test]
    async fn a_claim_taken_over_can_no_longer_be_completed_released_or_extended_by_its_former_owner()
     {
        let db = TestDb::new().await;
        let store = &db.store;
        let k = key("slow");
        let Claim::Acquired { owner: stale, .. } =
            store.claim_job_now(&k, Duration::ZERO).await.unwrap()
        else {
            panic!("claimed")
        };
        // Its lease ran out: another delivery takes the job over.
        let Claim::Acquired {
            owner: fresh,
            claims,
        } = store.claim_job_now(&k, LEASE).await.unwrap()
        else {
            panic!("taken over")
        };
        assert_eq!(claims, 2);
        assert_ne!(stale, fresh);
        assert!(!store.extend_claim(&k, stale, LEASE).await.unwrap());
        assert!(!store.release_job(&k, stale).await.unwrap());
        assert!(!store.mark_ambiguous(&k, stale).await.unwrap());
        assert!(
            !store
                .complete_job(&k, stale, &json!({"by": "stale"}), LEASE)
                .await
                .unwrap()
        );
        // The row is still the new owner's, live and without a result.
        let row = db
            .client()
            .await
            .query_one(
                "SELECT state, result IS NULL, claim_id, lease_until > now() FROM job_ledger
                 WHERE job_id = 'slow'",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, &str>(0), "claimed");
        assert!(row.get::<_, bool>(1));
        assert_eq!(ClaimOwner(row.get(2)), fresh);
        assert!(row.get::<_, bool>(3));
        // The new owner can do all of it.
        assert!(store.extend_claim(&k, fresh, LEASE).await.unwrap());
        assert!(
            store
                .complete_job(&k, fresh, &json!({"by": "fresh"}), LEASE)
                .await
                .unwrap()
        );
        let result: serde_json::Value = db
            .client()
            .await
            .query_one("SELECT result FROM job_ledger WHERE job_id = 'slow'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(result, json!({"by": "fresh"}));
    }

    #[tokio::test]
    async fn an_ambiguous_claim_is_handed_over_at_once_and_stays_ambiguous() {
        let db = TestDb::new().await;
        let store = &db.store;
        let k = key("maybe-sent");
        let Claim::Acquired { owner, .. } = store.claim_job_now(&k, LEASE).await.unwrap() else {
            panic!("claimed")
        };
        assert!(store.mark_ambiguous(&k, owner).await.unwrap());
        // Not released: the next claim does not wait for the lease, but it is
        // told the send may have happened.
        let Claim::Ambiguous { owner: next } = store.claim_job_now(&k, LEASE).await.unwrap() else {
            panic!("ambiguous")
        };
        assert_ne!(next, owner);
        assert_eq!(store.claim_job_now(&k, LEASE).await.unwrap(), Claim::Busy);
        assert!(
            !store.release_job(&k, next).await.unwrap(),
            "not a claim to retry"
        );
        assert!(
            store
                .complete_job(&k, next, &json!({"maybe": true}), LEASE)
                .await
                .unwrap()
        );
        store
            .mark_published(std::slice::from_ref(&k))
            .await
            .unwrap();
        assert_eq!(
            store.claim_job_now(&k, LEASE).await.unwrap(),
            Claim::Published
        );
    }

    #[tokio::test]
    async fn a_job_id_twice_in_one_claim_call_is_claimed_once() {
        let db = TestDb::new().await;
        let store = &db.store;
        let answers = store
            .claim_jobs(&items(&["a", "b", "a", "a"]), LEASE)
            .await
            .unwrap()
            .anon();
        assert_eq!(
            answers,
            vec![acquired(1), acquired(1), Claim::Busy, Claim::Busy,]
        );
        store.mark_published(&[key("a")]).await.unwrap();
        let answers = store
            .claim_jobs(&items(&["a", "a"]), LEASE)
            .await
            .unwrap()
            .anon();
        assert_eq!(answers, vec![Claim::Published, Claim::Published]);
        let claims: i32 = db
            .client()
            .await
            .query_one("SELECT claims FROM job_ledger WHERE job_id = 'a'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(claims, 1);
    }

    #[tokio::test]
    async fn one_complete_statement_records_results_and_leaves_published_jobs_alone() {
        let db = TestDb::new().await;
        let store = &db.store;
        store
            .claim_jobs(&items(&["c1", "c2", "c3"]), LEASE)
            .await
            .unwrap()
            .anon();
        store.mark_published(&[key("c3")]).await.unwrap();
        let before = db.statements();
        store
            .complete_jobs(
                &[
                    (
                        key("c2"),
                        (json!({"n": 2}), owner_of(store, &key("c2")).await),
                    ),
                    (
                        key("c1"),
                        (json!({"n": 1}), owner_of(store, &key("c1")).await),
                    ),
                    (
                        key("c3"),
                        (json!({"n": 3}), owner_of(store, &key("c3")).await),
                    ),
                    (key("unknown"), (json!({"n": 0}), ClaimOwner(0))),
                    // A job id twice keeps its last result.
                    (
                        key("c2"),
                        (json!({"n": 22}), owner_of(store, &key("c2")).await),
                    ),
                ],
                Duration::from_secs(30),
            )
            .await
            .unwrap();
        assert_eq!(db.statements() - before, 1);
        let rows = db
            .client()
            .await
            .query(
                "SELECT job_id, state, result, lease_until > now() + interval '20 seconds'
                 FROM job_ledger ORDER BY job_id",
                &[],
            )
            .await
            .unwrap();
        let rows: Vec<(String, String, Option<serde_json::Value>, Option<bool>)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        assert_eq!(
            rows,
            vec![
                (
                    "c1".into(),
                    "completed".into(),
                    Some(json!({"n": 1})),
                    Some(true)
                ),
                (
                    "c2".into(),
                    "completed".into(),
                    Some(json!({"n": 22})),
                    Some(true)
                ),
                ("c3".into(), "published".into(), None, Some(true)),
            ]
        );
        // The single-item form.
        store
            .complete_job_now(
                &key("c1"),
                owner_of(store, &key("c1")).await,
                &json!({"n": 11}),
                LEASE,
            )
            .await
            .unwrap();
        assert_eq!(db.statements() - before, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_hundred_concurrent_jobs_share_a_few_statements() {
        let db = TestDb::new().await;
        let claim_all = |prefix: &'static str| {
            let tasks: Vec<_> = (0..200)
                .map(|i| {
                    let store = db.store.clone();
                    tokio::spawn(async move {
                        store
                            .claim_job(&key(format!("{prefix}{i:03}")), LEASE)
                            .await
                    })
                })
                .collect();
            async move {
                let mut answers = Vec::new();
                for task in tasks {
                    answers.push(task.await.unwrap().unwrap().anon());
                }
                answers
            }
        };

        let answers = claim_all("job").await;
        assert_eq!(answers, vec![acquired(1); 200]);
        let claims = db.statements();
        assert!(claims < 40, "200 claims took {claims} statements");

        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let store = db.store.clone();
                tokio::spawn(async move {
                    let k = key(format!("job{i:03}"));
                    let owner = owner_of(&store, &k).await;
                    store
                        .complete_job(&k, owner, &json!({ "i": i }), LEASE)
                        .await
                })
            })
            .collect();
        for task in tasks {
            assert!(task.await.unwrap().unwrap(), "recorded by its owner");
        }
        let completes = db.statements() - claims;
        assert!(
            completes < 40,
            "200 completions took {completes} statements"
        );
        let client = db.client().await;
        let rows = client
            .query(
                "SELECT job_id, result FROM job_ledger WHERE state = 'completed' ORDER BY job_id",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), 200);
        for (i, row) in rows.iter().enumerate() {
            assert_eq!(row.get::<_, String>(0), format!("job{i:03}"));
            assert_eq!(row.get::<_, serde_json::Value>(1), json!({ "i": i }));
        }

        // Mixed answers through the batcher: published, completed with a live
        // lease (busy), completed with an expired lease (handed over), retrying.
        client
            .batch_execute(
                "UPDATE job_ledger SET state = 'published' WHERE job_id < 'job050';
                 UPDATE job_ledger SET lease_until = now() - interval '1 second'
                     WHERE job_id >= 'job100' AND job_id < 'job150';
                 UPDATE job_ledger SET state = 'retrying', lease_until = NULL WHERE job_id >= 'job150';",
            )
            .await
            .unwrap();
        let answers = claim_all("job").await;
        for (i, answer) in answers.iter().enumerate() {
            let expected = match i {
                0..50 => Claim::Published,
                50..100 => Claim::Busy,
                100..150 => Claim::Completed(Some(json!({ "i": i }))),
                _ => acquired(2),
            };
            assert_eq!(*answer, expected, "job{i:03}");
        }
        assert_eq!(db.store.ledger_batch.claims.lock().in_flight, 0);
        assert_eq!(db.store.ledger_batch.completes.lock().in_flight, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_job_id_pending_twice_waits_for_the_next_statement() {
        let db = TestDb::new().await;
        let queue = &db.store.ledger_batch.claims;
        // Hold every slot: the leaders' statements wait on the table lock.
        let blocker = db.lock_ledger().await;
        let leaders: Vec<_> = (0..MAX_IN_FLIGHT)
            .map(|i| spawn_claim(&db.store, ["l0", "l1", "l2", "l3"][i]))
            .collect();
        in_flight(queue, MAX_IN_FLIGHT).await;
        let mut waiters = Vec::new();
        for (n, id) in ["x", "y", "x", "x", "z"].into_iter().enumerate() {
            waiters.push(spawn_claim(&db.store, id));
            pending(queue, n + 1).await;
        }
        blocker.batch_execute("COMMIT").await.unwrap();

        for leader in leaders {
            assert_eq!(leader.await.unwrap().unwrap().anon(), acquired(1));
        }
        let mut answers = Vec::new();
        for waiter in waiters {
            answers.push(waiter.await.unwrap().unwrap().anon());
        }
        // y and z are claimed; x once (with several statements in flight, batches
        // carrying x may run at once, so which of its requests wins is open), the
        // others find it busy.
        assert_eq!(answers[1], acquired(1));
        assert_eq!(answers[4], acquired(1));
        let mut xs = vec![answers[0].clone(), answers[2].clone(), answers[3].clone()];
        xs.sort_by_key(|c| *c == Claim::Busy);
        assert_eq!(xs, vec![acquired(1), Claim::Busy, Claim::Busy]);
        // The leaders, then three batches: each carries x at most once.
        assert_eq!(db.statements(), MAX_IN_FLIGHT as u64 + 3);
        assert_eq!(queue.lock().in_flight, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_failed_statement_answers_every_waiter_with_the_error() {
        let db = TestDb::new().await;
        let client = db.client().await;
        client
            .batch_execute("ALTER TABLE job_ledger RENAME TO job_ledger_away")
            .await
            .unwrap();
        let claims: Vec<_> = (0..100)
            .map(|i| {
                let store = db.store.clone();
                tokio::spawn(async move { store.claim_job(&key(format!("f{i}")), LEASE).await })
            })
            .collect();
        let completes: Vec<_> = (0..100)
            .map(|i| {
                let store = db.store.clone();
                tokio::spawn(async move {
                    store
                        .complete_job(&key(format!("f{i}")), ClaimOwner(0), &json!({}), LEASE)
                        .await
                })
            })
            .collect();
        let all = async {
            for claim in claims {
                let err = claim.await.unwrap().unwrap_err();
                assert!(!err.is_unavailable(), "{err}");
                assert!(format!("{err:?}").contains("job_ledger"), "{err:?}");
            }
            for complete in completes {
                let err = complete.await.unwrap().unwrap_err();
                assert!(!err.is_unavailable(), "{err}");
            }
        };
        tokio::time::timeout(Duration::from_secs(20), all)
            .await
            .expect("every waiter is answered");
        assert!(db.statements() < 100);

        // The batcher works again once the table is back.
        client
            .batch_execute("ALTER TABLE job_ledger_away RENAME TO job_ledger")
            .await
            .unwrap();
        assert_eq!(
            db.store.claim_job(&key("f1"), LEASE).await.unwrap().anon(),
            acquired(1)
        );
        assert_eq!(db.store.ledger_batch.claims.lock().in_flight, 0);
        assert_eq!(db.store.ledger_batch.completes.lock().in_flight, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_closed_pool_answers_every_waiter_as_unavailable() {
        let db = TestDb::new().await;
        db.store.ledger_pool.close();
        let claims: Vec<_> = (0..50)
            .map(|i| {
                let store = db.store.clone();
                tokio::spawn(async move { store.claim_job(&key(format!("p{i}")), LEASE).await })
            })
            .collect();
        let all = async {
            for claim in claims {
                assert!(claim.await.unwrap().unwrap_err().is_unavailable());
            }
        };
        tokio::time::timeout(Duration::from_secs(20), all)
            .await
            .expect("every waiter is answered");
        assert_eq!(db.store.ledger_batch.claims.lock().in_flight, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_cancelled_leader_hands_its_slot_on() {
        let db = TestDb::new().await;
        let queue = &db.store.ledger_batch.claims;
        let blocker = db.lock_ledger().await;
        let leaders: Vec<_> = (0..MAX_IN_FLIGHT)
            .map(|i| spawn_claim(&db.store, format!("leader{i}")))
            .collect();
        in_flight(queue, MAX_IN_FLIGHT).await;
        let waiters: Vec<_> = (0..10)
            .map(|i| spawn_claim(&db.store, format!("w{i}")))
            .collect();
        pending(queue, 10).await;
        // Cancel every leader mid-statement.
        for leader in &leaders {
            leader.abort();
        }
        for leader in leaders {
            assert!(leader.await.unwrap_err().is_cancelled());
        }
        blocker.batch_execute("COMMIT").await.unwrap();
        let all = async {
            for waiter in waiters {
                assert_eq!(waiter.await.unwrap().unwrap().anon(), acquired(1));
            }
        };
        tokio::time::timeout(Duration::from_secs(20), all)
            .await
            .expect("the waiters are answered");
        assert_eq!(queue.lock().in_flight, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn waiters_of_a_cancelled_batch_get_an_error_not_a_hang() {
        let db = TestDb::new().await;
        let queue = &db.store.ledger_batch.claims;
        let blocker = db.lock_ledger().await;
        let mut leaders: Vec<_> = (0..MAX_IN_FLIGHT)
            .map(|i| spawn_claim(&db.store, format!("leader{i}")))
            .collect();
        in_flight(queue, MAX_IN_FLIGHT).await;
        // Queued one by one, so that waiters[0] is the oldest.
        let mut waiters = Vec::new();
        for i in 0..10 {
            waiters.push(spawn_claim(&db.store, format!("w{i}")));
            pending(queue, i + 1).await;
        }
        // Cancelling one leader hands its slot to w0, which takes the nine others
        // into its (blocked) statement.
        let first = leaders.remove(0);
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        pending(queue, 0).await;
        // w0 is cancelled in turn: its batch is abandoned.
        let w0 = waiters.remove(0);
        w0.abort();
        assert!(w0.await.unwrap_err().is_cancelled());
        let all = async {
            for waiter in waiters {
                let err = waiter.await.unwrap().unwrap_err();
                assert!(err.is_unavailable(), "{err}");
            }
        };
        tokio::time::timeout(Duration::from_secs(20), all)
            .await
            .expect("the waiters are answered");
        blocker.batch_execute("COMMIT").await.unwrap();
        for leader in leaders {
            assert_eq!(leader.await.unwrap().unwrap().anon(), acquired(1));
        }
        assert_eq!(queue.lock().in_flight, 0);
        // The batcher goes on.
        assert_eq!(
            db.store
                .claim_job(&key("after"), LEASE)
                .await
                .unwrap()
                .anon(),
            acquired(1)
        );
    }
}
