use super::limits::BUSY_RETRY;
use super::*;
use chrono::TimeZone;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 28, 10, 0, 0).unwrap()
}

fn config() -> PacingConfig {
    PacingConfig {
        org_max_in_flight: 3,
        graph_mailbox_concurrency: 2,
        gmail_mailbox_per_minute: 60,
        microsoft_daily_recipients: 10,
        google_daily_messages: 2,
        ..PacingConfig::default()
    }
}

/// The shared total of `org`'s `counter` read back by a flush, with the oldest
/// bucket leaving the window at `leaves` holding `oldest`.
fn total(
    org: &str,
    counter: Counter,
    total: i32,
    leaves: DateTime<Utc>,
    oldest: i32,
) -> mail_dispatch_store::WindowTotal {
    mail_dispatch_store::WindowTotal {
        organization_id: org.into(),
        counter: counter.code(),
        total,
        oldest_leaves_at: Some(leaves),
        oldest_units: Some(oldest),
    }
}

fn go(a: Admission) -> Permit {
    match a {
        Admission::Go(p) => p,
        Admission::Defer { reason, .. } => panic!("deferred: {reason:?}"),
    }
}

fn reason(a: Admission) -> DeferReason {
    match a {
        Admission::Go(_) => panic!("admitted"),
        Admission::Defer { reason, .. } => reason,
    }
}

#[test]
fn an_organization_gets_at_most_its_share_and_others_are_unaffected() {
    let p = Pacer::new(config());
    let held: Vec<_> = (0..3)
        .map(|_| go(p.admit("a", ProviderKind::Default, 1, now())))
        .collect();
    assert_eq!(
        reason(p.admit("a", ProviderKind::Default, 1, now())),
        DeferReason::OrganizationBusy
    );
    go(p.admit("b", ProviderKind::Default, 1, now()));
    drop(held);
    go(p.admit("a", ProviderKind::Default, 1, now()));
}

fn fleet(limit: usize) -> Arc<dyn crate::ports::MailboxSlots> {
    Arc::new(crate::fakes::FakeSlots::with_limit(limit))
}

/// Graph's cap in this worker: admitted jobs past it wait for a slot of the
/// mailbox, and get one as soon as a send is over.
#[tokio::test]
async fn graph_sends_per_mailbox_are_capped_and_the_next_one_waits_for_a_slot() {
    let p = Pacer::new(config());
    let fleet = fleet(100);
    let mut a = go(p.admit("m", ProviderKind::Microsoft, 1, now()));
    let mut b = go(p.admit("m", ProviderKind::Microsoft, 1, now()));
    assert!(p.take_mailbox_slots(&mut a, &fleet).await.unwrap());
    assert!(p.take_mailbox_slots(&mut b, &fleet).await.unwrap());
    let mut c = go(p.admit("m", ProviderKind::Microsoft, 1, now()));
    let waiting = tokio::spawn({
        let (p, fleet) = (Arc::clone(&p), Arc::clone(&fleet));
        async move {
            let started = std::time::Instant::now();
            let got = p.take_mailbox_slots(&mut c, &fleet).await.unwrap();
            (got, started.elapsed())
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(!waiting.is_finished(), "two sends at once at most");
    a.release_mailbox_slots();
    let (got, waited) = waiting.await.unwrap();
    assert!(got, "the slot went to the waiting job");
    assert!(waited < FLEET_SLOT_WAIT, "{waited:?}");
    drop((a, b));
}

/// A send that is over hands its fleet-wide slot to the next job of the same
/// worker waiting for one, in memory: no release to PostgreSQL, no new lease.
#[tokio::test]
async fn a_fleet_slot_is_handed_over_to_a_waiting_job_of_the_same_worker() {
    let p = Pacer::new(config());
    let slots = Arc::new(crate::fakes::FakeSlots::with_limit(1));
    let fleet: Arc<dyn crate::ports::MailboxSlots> = slots.clone();
    let mut a = go(p.admit("m", ProviderKind::Microsoft, 1, now()));
    assert!(p.take_mailbox_slots(&mut a, &fleet).await.unwrap());
    let mut b = go(p.admit("m", ProviderKind::Microsoft, 1, now()));
    let waiting = tokio::spawn({
        let (p, fleet) = (Arc::clone(&p), Arc::clone(&fleet));
        async move {
            let started = std::time::Instant::now();
            let got = p.take_mailbox_slots(&mut b, &fleet).await.unwrap();
            (got, started.elapsed(), b)
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    a.release_mailbox_slots();
    let (got, waited, mut b) = waiting.await.unwrap();
    assert!(got);
    assert!(waited < std::time::Duration::from_millis(500), "{waited:?}");
    assert_eq!(
        slots.releases.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "handed over, not released and taken again"
    );
    // With nobody waiting, the slot is kept a moment for this worker's next
    // send, then goes back to the fleet.
    b.release_mailbox_slots();
    assert_eq!(slots.releases.load(std::sync::atomic::Ordering::Relaxed), 0);
    let mut c = go(p.admit("m", ProviderKind::Microsoft, 1, now()));
    assert!(
        p.take_mailbox_slots(&mut c, &fleet).await.unwrap(),
        "the kept slot"
    );
    assert_eq!(slots.releases.load(std::sync::atomic::Ordering::Relaxed), 0);
    c.release_mailbox_slots();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(slots.releases.load(std::sync::atomic::Ordering::Relaxed), 1);
}

/// A mailbox that stays full: after the wait the job is told to defer, and
/// what it waited with goes back.
#[tokio::test]
async fn a_graph_job_waits_at_most_the_fleet_slot_wait() {
    let p = Pacer::new(config());
    let fleet = fleet(1);
    let mut a = go(p.admit("m", ProviderKind::Microsoft, 1, now()));
    assert!(p.take_mailbox_slots(&mut a, &fleet).await.unwrap());
    let mut b = go(p.admit("m", ProviderKind::Microsoft, 1, now()));
    let started = std::time::Instant::now();
    assert!(
        !p.take_mailbox_slots(&mut b, &fleet).await.unwrap(),
        "the fleet's only slot is held"
    );
    assert!(started.elapsed() >= FLEET_SLOT_WAIT);
    drop(b);
    // Its 2 s were a wait, not a send: the schedule still expects 0.25 s per
    // send (2 at once: 8 a second, deferred jobs 125 ms apart).
    p.apply_pause("m", now() + chrono::Duration::seconds(10));
    let first = wake(p.admit("m", ProviderKind::Microsoft, 1, now()));
    let second = wake(p.admit("m", ProviderKind::Microsoft, 1, now()));
    assert_eq!((second - first).num_milliseconds(), 125);
    p.lift_pause("m");
    // `b`'s local slot went back with it: `c` has one, and the fleet's once `a` is done.
    a.release_mailbox_slots();
    let mut c = go(p.admit("m", ProviderKind::Microsoft, 1, now()));
    assert!(p.take_mailbox_slots(&mut c, &fleet).await.unwrap());
}

#[test]
fn gmail_sends_per_mailbox_follow_the_rate_after_a_small_burst() {
    let p = Pacer::new(config());
    // 60 per minute = one per second, with 5 s of burst.
    let admitted = (0..10)
        .take_while(|_| {
            matches!(
                p.admit("g", ProviderKind::Google, 1, now()),
                Admission::Go(_)
            )
        })
        .count();
    assert_eq!(admitted, 6);
    let Admission::Defer { until, reason } = p.admit("g", ProviderKind::Google, 1, now()) else {
        panic!()
    };
    assert_eq!(reason, DeferReason::MailboxRate);
    // The deferral inside `take_while` took the slot at +1 s.
    assert_eq!(until, now() + chrono::Duration::seconds(2));
    go(p.admit("g", ProviderKind::Google, 1, until));
}

#[test]
fn a_pause_defers_until_it_ends() {
    let p = Pacer::new(config());
    let until = now() + chrono::Duration::seconds(30);
    p.apply_pause("m", until);
    let Admission::Defer { until: u, reason } = p.admit("m", ProviderKind::Microsoft, 1, now())
    else {
        panic!()
    };
    assert_eq!((u, reason), (until, DeferReason::MailboxPaused));
    go(p.admit(
        "m",
        ProviderKind::Microsoft,
        1,
        until + chrono::Duration::seconds(1),
    ));
    go(p.admit("other", ProviderKind::Microsoft, 1, now()));
}

#[test]
fn limits_count_over_a_rolling_window_and_defer_until_the_oldest_sends_leave_it() {
    let p = Pacer::new(config());
    let hour = chrono::Duration::hours(1);
    go(p.admit("g", ProviderKind::Google, 1, now())).mark_sent();
    go(p.admit("g", ProviderKind::Google, 1, now() + hour)).mark_sent();
    // An admitted job that was not sent gives its reservation back.
    drop(go(p.admit("m", ProviderKind::Microsoft, 10, now())));
    // The flush learns where the sends sit in the window: the first leaves it 24 h
    // (and a bucket) after it was sent.
    let first_leaves = now() + chrono::Duration::hours(24) + chrono::Duration::minutes(5);
    let pending = p.begin_daily_flush();
    p.end_daily_flush(
        &pending,
        Some(vec![
            total("g", Counter::Messages, 2, first_leaves, 1),
            total("g", Counter::Recipients, 2, first_leaves, 1),
        ]),
    );
    // Past midnight UTC the count does not start again: it is a rolling window.
    let after_midnight = Utc.with_ymd_and_hms(2026, 11, 29, 0, 30, 0).unwrap();
    let Admission::Defer { until, reason } = p.admit("g", ProviderKind::Google, 1, after_midnight)
    else {
        panic!("admitted past the limit")
    };
    assert_eq!(reason, DeferReason::DailyLimit);
    assert_eq!(until, first_leaves, "deferred until the oldest send leaves");
    // Microsoft counts recipients: 10 over the window, this message has 11.
    assert_eq!(
        reason_of(p.admit("m", ProviderKind::Microsoft, 11, now())),
        DeferReason::DailyLimit
    );
    go(p.admit("g", ProviderKind::Google, 1, first_leaves)).mark_sent();
    // The second send is still in the window, and the third now too.
    assert_eq!(
        reason_of(p.admit("g", ProviderKind::Google, 1, first_leaves)),
        DeferReason::DailyLimit
    );
}

#[test]
fn google_counts_recipients_and_external_recipients_as_well_as_messages() {
    let p = Pacer::new(PacingConfig {
        google_daily_messages: 100,
        google_daily_recipients: 10,
        google_daily_external_recipients: 4,
        ..config()
    });
    let to = |domains: &[&'static str]| Demand::of("corp.example", domains.iter().copied());
    let admit = |d: Demand| {
        p.admit_message(
            "g",
            ProviderKind::Google,
            d,
            SendingBudget::default(),
            now(),
        )
    };
    assert_eq!(
        to(&["corp.example", "CORP.example", "other.example"]),
        Demand {
            recipients: 3,
            external_recipients: 1
        }
    );
    go(admit(to(&["a.example", "b.example", "c.example"]))).mark_sent();
    // 3 external of 4: two more external recipients are one too many...
    assert_eq!(
        reason(admit(to(&["a.example", "b.example"]))),
        DeferReason::DailyLimit
    );
    // ...while internal ones still go, up to 10 recipients in all.
    go(admit(to(&["corp.example"; 7]))).mark_sent();
    assert_eq!(
        reason(admit(to(&["corp.example"]))),
        DeferReason::DailyLimit
    );
}

#[test]
fn consumer_and_trial_accounts_and_an_organization_share_lower_the_limits() {
    let c = PacingConfig::default();
    let workspace = SendingBudget::default();
    let consumer = SendingBudget {
        consumer: true,
        ..workspace
    };
    let trial = SendingBudget {
        trial: true,
        ..workspace
    };
    let half = SendingBudget {
        limit_percent: 50,
        ..workspace
    };
    use limits::window_limits;
    // Recipients: Google's 3,000 unique per 24 h, each recipient counted.
    assert_eq!(
        window_limits(&c, ProviderKind::Google, workspace),
        [Some(3_000), Some(2_000), Some(2_000)]
    );
    assert_eq!(
        window_limits(&c, ProviderKind::Google, consumer),
        [Some(500), Some(500), Some(500)]
    );
    // Google's trial figures: 500 messages, 500 external recipients.
    assert_eq!(
        window_limits(&c, ProviderKind::Google, trial),
        [Some(3_000), Some(500), Some(500)]
    );
    assert_eq!(
        window_limits(&c, ProviderKind::Google, half),
        [Some(1_500), Some(1_000), Some(1_000)]
    );
    assert_eq!(
        window_limits(&c, ProviderKind::Microsoft, half),
        [Some(5_000), None, None]
    );
    assert_eq!(window_limits(&c, ProviderKind::Default, half), [None; 3]);
    // And the pacer applies them: 2 of 4 messages at 50 %.
    let p = Pacer::new(PacingConfig {
        google_daily_messages: 4,
        ..config()
    });
    let admit = || {
        p.admit_message(
            "g",
            ProviderKind::Google,
            Demand {
                recipients: 1,
                external_recipients: 0,
            },
            half,
            now(),
        )
    };
    go(admit()).mark_sent();
    go(admit()).mark_sent();
    assert_eq!(reason(admit()), DeferReason::DailyLimit);
}

fn reason_of(a: Admission) -> DeferReason {
    reason(a)
}

fn wake(a: Admission) -> DateTime<Utc> {
    match a {
        Admission::Go(_) => panic!("admitted"),
        Admission::Defer { until, .. } => until,
    }
}

fn ms(n: i64) -> chrono::Duration {
    chrono::Duration::milliseconds(n)
}

#[test]
fn deferred_jobs_of_a_busy_organization_get_spaced_slots_not_one_instant() {
    let p = Pacer::new(config());
    let _held: Vec<_> = (0..3)
        .map(|_| go(p.admit("a", ProviderKind::Default, 1, now())))
        .collect();
    // 3 in flight over the prior 0.25 s per send: 12 per second, 83 ms apart.
    let wakes: Vec<_> = (0..4)
        .map(|_| wake(p.admit("a", ProviderKind::Default, 1, now())))
        .collect();
    let first = now() + chrono::Duration::from_std(BUSY_RETRY).unwrap();
    assert_eq!(wakes[0], first);
    for (i, w) in wakes.iter().enumerate() {
        let expected = first + chrono::Duration::microseconds(83_333 * i as i64);
        assert!(
            (*w - expected).num_milliseconds().abs() <= 1,
            "{i}: {w} vs {expected}"
        );
    }
    // Another organization's deferrals do not queue behind them.
    let _b: Vec<_> = (0..3)
        .map(|_| go(p.admit("b", ProviderKind::Default, 1, now())))
        .collect();
    assert_eq!(wake(p.admit("b", ProviderKind::Default, 1, now())), first);
}

#[test]
fn gmail_deferrals_come_back_one_rate_interval_apart() {
    let p = Pacer::new(config());
    while matches!(
        p.admit("g", ProviderKind::Google, 1, now()),
        Admission::Go(_)
    ) {}
    // The first deferral above took the slot at +1 s; the next ones follow at 1/s.
    let next: Vec<_> = (0..3)
        .map(|_| wake(p.admit("g", ProviderKind::Google, 1, now())))
        .collect();
    assert_eq!(
        next,
        vec![
            now() + chrono::Duration::seconds(2),
            now() + chrono::Duration::seconds(3),
            now() + chrono::Duration::seconds(4)
        ]
    );
}

#[test]
fn a_429_halves_the_expected_rate_once_a_second_and_accepted_sends_win_it_back() {
    let p = Pacer::new(PacingConfig {
        microsoft_daily_recipients: 1000,
        ..config()
    });
    let until = now() + chrono::Duration::seconds(10);
    p.apply_pause("m", until);
    let spacing = |p: &Arc<Pacer>| {
        let a = wake(p.admit("m", ProviderKind::Microsoft, 1, now()));
        let b = wake(p.admit("m", ProviderKind::Microsoft, 1, now()));
        (b - a).num_milliseconds()
    };
    // Graph: 2 concurrent over 0.25 s = 8 per second.
    assert_eq!(spacing(&p), 125);
    p.throttled("m", ProviderKind::Microsoft, now());
    assert_eq!(spacing(&p), 250);
    // A second 429 of the same burst does not halve again.
    p.throttled("m", ProviderKind::Microsoft, now() + ms(500));
    assert_eq!(spacing(&p), 250);
    p.throttled("m", ProviderKind::Microsoft, now() + ms(1500));
    assert_eq!(spacing(&p), 500);
    // Accepted sends grow the learnt rate back.
    let later = until + chrono::Duration::seconds(1);
    for _ in 0..40 {
        go(p.admit("m", ProviderKind::Microsoft, 1, later)).mark_sent();
    }
    let rate = p.learnt_rate("m").unwrap();
    assert!(rate > 3.0, "learnt rate after 40 accepted sends: {rate}");
}

#[test]
fn after_a_429_the_rate_the_provider_accepted_is_kept_not_halved_again() {
    let p = Pacer::new(PacingConfig {
        microsoft_daily_recipients: 1000,
        ..config()
    });
    // Four sends accepted (within the last second), then a 429.
    for _ in 0..4 {
        go(p.admit("m", ProviderKind::Microsoft, 1, now())).mark_sent();
    }
    p.throttled("m", ProviderKind::Microsoft, now());
    let rate = |p: &Arc<Pacer>| p.learnt_rate("m").unwrap();
    // 4 accepted over (at least) a second; less if this thread was descheduled.
    let first = rate(&p);
    assert!(first > 1.0 && first <= 4.0, "{first}");
    // More 429s from jobs scheduled at the old rate: the measured rate stands
    // (halving at each would leave a quarter of it).
    p.throttled("m", ProviderKind::Microsoft, now() + ms(1500));
    p.throttled("m", ProviderKind::Microsoft, now() + ms(3000));
    assert!(rate(&p) > first / 2.0, "{} after {first}", rate(&p));
}

#[test]
fn pruning_forgets_idle_mailboxes_and_keeps_what_still_matters() {
    let p = Pacer::new(config());
    for i in 0..100 {
        let org = format!("org-{i}");
        go(p.admit(&org, ProviderKind::Microsoft, 1, now())).mark_sent();
        go(p.admit(&org, ProviderKind::Google, 1, now())).mark_sent();
    }
    let busy = go(p.admit("busy", ProviderKind::Microsoft, 1, now()));
    p.apply_pause("paused", now() + chrono::Duration::seconds(60));
    assert!(p.entries() > 300, "{}", p.entries());
    // A minute later: counts not yet flushed are kept.
    let later = now() + chrono::Duration::minutes(1);
    p.prune(later, 1_000_000);
    let held = p.held();
    assert_eq!(held.daily_counts, 101, "unflushed daily counts are kept");
    assert_eq!(held.gmail_tats, 0);
    assert_eq!(
        held.graph_slots, 1,
        "only the mailbox with a send under way"
    );
    assert!(p.paused_organizations().iter().all(|org| org == "paused"));
    drop(busy);
    // Once nothing is counted any more (flushed, and out of the window), it is gone.
    p.forget_unflushed_daily_counts();
    p.prune(now() + chrono::Duration::days(1), 1_000_000);
    assert_eq!(p.entries(), 0);
}

#[test]
fn sends_being_flushed_still_count_against_the_daily_limit() {
    // Google: 2 messages a day in this config.
    let p = Pacer::new(config());
    go(p.admit("g", ProviderKind::Google, 1, now())).mark_sent();
    go(p.admit("g", ProviderKind::Google, 1, now())).mark_sent();
    let pending = p.begin_daily_flush();
    assert_eq!(pending.len(), 2, "messages and recipients");
    assert_eq!(
        reason(p.admit("g", ProviderKind::Google, 1, now())),
        DeferReason::DailyLimit,
        "while the flush is on its way, its 2 sends still count"
    );
    let leaves = now() + chrono::Duration::hours(24);
    p.end_daily_flush(
        &pending,
        Some(vec![
            total("g", Counter::Messages, 2, leaves, 2),
            total("g", Counter::Recipients, 2, leaves, 2),
        ]),
    );
    assert_eq!(
        reason(p.admit("g", ProviderKind::Google, 1, now())),
        DeferReason::DailyLimit,
        "and after it, the shared total holds them"
    );
}

#[test]
fn a_failed_flush_keeps_its_counts_for_the_next_one() {
    let p = Pacer::new(config());
    go(p.admit("g", ProviderKind::Google, 1, now())).mark_sent();
    let pending = p.begin_daily_flush();
    p.end_daily_flush(&pending, None);
    let again = p.begin_daily_flush();
    assert_eq!(again, pending, "written again next time");
}

#[tokio::test]
async fn the_slot_waiters_of_a_mailbox_nobody_waits_for_are_forgotten() {
    let p = Pacer::new(config());
    let mut a = go(p.admit("m", ProviderKind::Microsoft, 1, now()));
    assert!(p.take_mailbox_slots(&mut a, &fleet(4)).await.unwrap());
    assert_eq!(p.slot_waiters.len(), 1, "the job that asked registered");
    p.prune(now(), usize::MAX);
    assert_eq!(p.slot_waiters.len(), 0, "nobody waits any more");
    // Waking an organization nobody waits for is a no-op.
    p.fleet_slot_freed("m");
    assert_eq!(p.slot_waiters.len(), 0);
}

#[test]
fn a_lifted_pause_lets_the_mailbox_send_at_once() {
    let p = Pacer::new(config());
    p.apply_pause("m", now() + chrono::Duration::hours(1));
    assert_eq!(
        reason(p.admit("m", ProviderKind::Microsoft, 1, now())),
        DeferReason::MailboxPaused
    );
    p.lift_pause("m");
    go(p.admit("m", ProviderKind::Microsoft, 1, now()));
    // Lifting the pause of a mailbox the pacer does not know is a no-op.
    p.lift_pause("unknown");
    assert_eq!(p.pause_of("unknown"), None);
}
