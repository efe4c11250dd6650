//! The real program as a process: signals, crashes, its commands, its errors.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mail_dispatch_test_support::standins::{self, Vendor};
use mail_dispatch_test_support::{ResultsTap, TestApp, TestAppOptions};
use serde_json::Value;

use crate::support::WAIT;

const PROGRAM: &str = env!("CARGO_BIN_EXE_mail-dispatch-e2e");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The program running as a worker against a test's services.
pub struct Program {
    child: Child,
    pub metrics_port: u16,
    pub log: PathBuf,
}

impl Program {
    pub async fn start(app: &TestApp, command: &str) -> Program {
        Self::start_with(app, command, &[]).await
    }

    pub async fn start_with(app: &TestApp, command: &str, extra_env: &[(&str, String)]) -> Program {
        let metrics_port = free_port();
        let log = std::env::temp_dir().join(mail_dispatch_test_support::unique("md-log-"));
        let child = Command::new(PROGRAM)
            .arg(command)
            .envs(app.program_env())
            .env(
                "MAIL_DISPATCH_METRICS_LISTEN",
                format!("127.0.0.1:{metrics_port}"),
            )
            .env("RUST_LOG", "info")
            .envs(extra_env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("the program starts");
        let p = Program {
            child,
            metrics_port,
            log,
        };
        let deadline = Instant::now() + WAIT;
        while !matches!(p.get("/readyz").await, Some((200, _))) {
            assert!(Instant::now() < deadline, "program not ready: {}", p.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        p
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A GET on the metrics listener: (status, body).
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let port = self.metrics_port;
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            .ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            let status = out.split_whitespace().nth(1)?.parse().ok()?;
            let body = out
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_owned())
                .unwrap_or_default();
            Some((status, body))
        })
        .await
        .ok()
        .flatten()
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    /// SIGTERM, then waits for the exit: its status code and everything it logged.
    pub async fn terminate(mut self, within: Duration) -> (i32, String) {
        self.signal("-TERM");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code().unwrap_or(-1), self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "no exit within {within:?} after SIGTERM: {}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(mut self) {
        self.signal("-KILL");
        let _ = self.child.wait();
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Runs a one-shot command of the program: (exit code, stdout, stderr).
fn run_command(app: &TestApp, args: &[&str], extra_env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(PROGRAM)
        .args(args)
        .envs(app.program_env())
        .env("RUST_LOG", "off")
        .envs(extra_env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every job has exactly one result among `results`.
fn assert_one_result_each(results: &[Value], jobs: &[Value]) {
    let mut per_job: HashMap<&str, usize> = HashMap::new();
    for r in results {
        *per_job
            .entry(r["job_id"].as_str().unwrap_or_default())
            .or_default() += 1;
    }
    for job in jobs {
        let id = job["id"].as_str().unwrap();
        assert_eq!(
            per_job.get(id),
            Some(&1),
            "job {id}: exactly one result per job"
        );
    }
}

/// Every job has its result; one has it twice only where the worker lost a
/// result's publisher confirm (`unconfirmed`, counted by the worker: the next
/// delivery publishes the recorded result again rather than risk none), and
/// then both copies are the same result.
fn assert_results_at_least_once(results: &[Value], jobs: &[Value], unconfirmed: u64) {
    let mut per_job: HashMap<&str, Vec<&Value>> = HashMap::new();
    for r in results {
        per_job
            .entry(r["job_id"].as_str().unwrap_or_default())
            .or_default()
            .push(r);
    }
    let mut extra = 0;
    for job in jobs {
        let id = job["id"].as_str().unwrap();
        let copies = per_job.get(id).map(Vec::as_slice).unwrap_or_default();
        assert!(!copies.is_empty(), "job {id}: no result");
        assert!(
            copies.iter().all(|c| *c == copies[0]),
            "job {id}: two different results {copies:#?}"
        );
        extra += copies.len() - 1;
    }
    assert!(
        extra as u64 <= unconfirmed,
        "{extra} results published twice, but only {unconfirmed} publishes lost their confirm"
    );
}

/// Publishes `n` jobs of `org` and returns them.
async fn publish_jobs(app: &TestApp, org: &str, n: usize) -> Vec<Value> {
    let jobs: Vec<Value> = (0..n).map(|_| app.job(org)).collect();
    for job in &jobs {
        app.amqp.publish_job(job).await;
    }
    jobs
}

async fn all_results(tap: &mut ResultsTap, n: usize, timeout: Duration) -> Vec<Value> {
    let results = tap.results(n, timeout).await;
    let seen = tap.settle(Duration::from_millis(500)).await;
    let all: Vec<Value> = seen
        .iter()
        .filter(|s| s.routing_key.starts_with("result."))
        .map(|s| s.body.clone())
        .collect();
    assert!(all.len() >= results.len());
    all
}

/// Job ids in the Message-IDs of what Gmail received: how often each was sent.
fn gmail_sends_by_job(app: &TestApp) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for raw in app.standins.gmail_messages() {
        let msg = mail_parser::MessageParser::default().parse(&raw).unwrap();
        let id = msg
            .message_id()
            .unwrap()
            .trim_start_matches("job-")
            .split('.')
            .next()
            .unwrap()
            .to_owned();
        *m.entry(id).or_default() += 1;
    }
    m
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_jobs_in_flight_finishes_them_exits_zero_and_loses_nothing() {
    let app = TestApp::spawn_with(TestAppOptions {
        in_process_worker: false,
        concurrency: 8,
        shutdown_grace: Duration::from_secs(10),
        ..Default::default()
    })
    .await;
    app.connect_mailbox("org_g", Vendor::Google, "g@customer.com", "G")
        .await;
    app.standins.set_send_delay(Duration::from_millis(1500));
    let mut tap = app.amqp.tap_results().await;
    let program = Program::start(&app, "worker").await;
    let jobs = publish_jobs(&app, "org_g", 30).await;
    let deadline = Instant::now() + WAIT;
    while app.standins.send_attempts(Vendor::Google) < 8 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, logs) = program.terminate(Duration::from_secs(20)).await;
    assert_eq!(code, 0, "SIGTERM exits 0: {logs}");
    let sent_before_restart = app.standins.send_attempts(Vendor::Google);
    assert!(sent_before_restart < 30, "the worker stopped taking jobs");

    let _again = Program::start(&app, "worker").await;
    let results = all_results(&mut tap, 30, Duration::from_secs(40)).await;
    assert_one_result_each(&results, &jobs);
    assert!(results.iter().all(|r| r["status"] == "sent"));
    let sends = gmail_sends_by_job(&app);
    assert_eq!(sends.len(), 30);
    assert!(
        sends.values().all(|n| *n == 1),
        "in-flight jobs finished within the grace period: no resend"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_with_200_jobs_in_flight_then_restart_gives_every_job_exactly_one_result() {
    let app = TestApp::spawn_with(TestAppOptions {
        in_process_worker: false,
        concurrency: 200,
        claim_lease: Duration::from_secs(3),
        ..Default::default()
    })
    .await;
    app.connect_mailbox("org_g", Vendor::Google, "g@customer.com", "G")
        .await;
    app.standins.set_send_delay(Duration::from_secs(2));
    let mut tap = app.amqp.tap_results().await;
    let program = Program::start(&app, "worker").await;
    let jobs: Vec<Value> = (0..200).map(|_| app.job("org_g")).collect();
    // Staggered, so that at the kill some jobs are finished, some are at the
    // provider, and some have not been attempted yet.
    for batch in jobs.chunks(20) {
        for job in batch {
            app.amqp.publish_job(job).await;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let done = tap
            .settle(Duration::from_millis(10))
            .await
            .iter()
            .filter(|s| s.routing_key.starts_with("result."))
            .count();
        if done >= 40 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "jobs did not complete: {}",
            program.logs()
        );
    }
    program.kill9();
    let accepted_at_kill = app.standins.gmail_messages().len();
    let finished_at_kill: Vec<String> = tap
        .settle(Duration::from_millis(300))
        .await
        .iter()
        .filter(|s| s.routing_key.starts_with("result."))
        .map(|s| s.body["job_id"].as_str().unwrap().to_owned())
        .collect();
    let results_at_kill = finished_at_kill.len();
    // Accepted by the provider, result not recorded: the documented duplicate window.
    let in_window = accepted_at_kill.saturating_sub(results_at_kill);
    assert!(
        in_window > 0 && results_at_kill > 0,
        "the kill must land mid-run"
    );

    let _restarted = Program::start(&app, "worker").await;
    let results = all_results(&mut tap, 200, Duration::from_secs(60)).await;
    assert_one_result_each(&results, &jobs);
    let sends = gmail_sends_by_job(&app);
    assert_eq!(sends.len(), 200, "every job was sent");
    let duplicates: usize = sends.values().map(|n| n - 1).sum();
    println!(
        "kill -9: {accepted_at_kill} accepted by the provider at the kill, {results_at_kill} results published, \
         {in_window} in the duplicate window; duplicate sends after restart: {duplicates}"
    );
    assert!(
        duplicates <= in_window,
        "{duplicates} duplicates, but only {in_window} jobs were in the window"
    );
    for id in &finished_at_kill {
        assert_eq!(
            sends.get(id),
            Some(&1),
            "job {id} had its result before the kill: never sent again"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn closing_every_amqp_connection_mid_run_loses_and_doubles_nothing() {
    let app = TestApp::spawn_with(TestAppOptions {
        concurrency: 8,
        exclusive: true,
        ..Default::default()
    })
    .await;
    app.connect_mailbox("org_g", Vendor::Google, "g@customer.com", "G")
        .await;
    app.standins.set_send_delay(Duration::from_millis(100));
    let mut tap = app.amqp.tap_results().await;
    let jobs = publish_jobs(&app, "org_g", 60).await;
    tap.results(10, WAIT).await;
    let status = Command::new("rabbitmqctl")
        .args(["close_all_connections", "mail-dispatch test"])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let results = all_results(&mut tap, 60, Duration::from_secs(60)).await;
    // A result whose publisher confirm the closed connection took with it may
    // have been routed: it is published again (README, "Delivery guarantees").
    let dispatcher = &app.worker.as_ref().unwrap().dispatcher;
    let unconfirmed = dispatcher.results_unconfirmed.load(Ordering::Relaxed);
    assert_results_at_least_once(&results, &jobs, unconfirmed);
    let sends = gmail_sends_by_job(&app);
    assert_eq!(sends.len(), 60);
    assert!(sends.values().all(|n| *n == 1), "no job sent twice");
    assert!(
        app.worker.as_ref().unwrap().health.amqp(),
        "the worker reconnected"
    );
}

/// The path the test above tolerates, provoked: a message that reached its
/// queue but whose confirm was lost with the connection. The broker's publish
/// fails saying the message may have been routed (`maybe_delivered`), which is
/// what makes the worker count the result as unconfirmed and its next delivery
/// publish it again rather than risk none.
#[tokio::test(flavor = "multi_thread")]
async fn a_publish_whose_confirm_is_lost_says_the_message_may_have_been_routed() {
    use mail_dispatch_broker::{Broker, BrokerError, Outgoing, json_properties};
    let amqp = mail_dispatch_test_support::TestAmqp::new().await;
    let mut url = url::Url::parse(&mail_dispatch_test_support::amqp_url()).unwrap();
    let rabbit = format!(
        "{}:{}",
        url.host_str().unwrap(),
        url.port_or_known_default().unwrap()
    );
    let proxy = mail_dispatch_test_support::FaultProxy::start(rabbit.parse().unwrap()).await;
    url.set_port(Some(proxy.addr().port())).unwrap();
    let broker = Broker::connect(url.as_str(), "mail-dispatch test (lost confirm)")
        .await
        .unwrap();
    let queue = amqp.topology.dead_queue.clone();
    assert_eq!(amqp.queue_len(&queue).await, 0);

    // The broker hears the publish; its confirm does not come back.
    proxy.deaf();
    let publishing = tokio::spawn({
        let queue = queue.clone();
        async move {
            broker
                .publish(Outgoing {
                    exchange: "",
                    routing_key: &queue,
                    body: b"{}",
                    properties: json_properties(),
                    mandatory: true,
                })
                .await
        }
    });
    let deadline = Instant::now() + WAIT;
    while amqp.queue_len(&queue).await == 0 {
        assert!(
            Instant::now() < deadline,
            "the publish never reached the queue"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The connection goes, with the confirm.
    proxy.reset();
    let err = publishing.await.unwrap().unwrap_err();
    assert!(matches!(err, BrokerError::Unconfirmed(_)), "{err:?}");
    assert!(err.maybe_delivered());
    assert_eq!(amqp.queue_len(&queue).await, 1, "and it was routed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgresql_restart_mid_run_delays_jobs_but_loses_none() {
    let app = TestApp::spawn_with(TestAppOptions {
        concurrency: 8,
        exclusive: true,
        ..Default::default()
    })
    .await;
    app.connect_mailbox("org_g", Vendor::Google, "g@customer.com", "G")
        .await;
    app.standins.set_send_delay(Duration::from_millis(100));
    let mut tap = app.amqp.tap_results().await;
    let jobs = publish_jobs(&app, "org_g", 60).await;
    tap.results(10, WAIT).await;
    let version = std::fs::read_dir("/etc/postgresql")
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name();
    let status = Command::new("pg_ctlcluster")
        .args([
            "--skip-systemctl-redirect",
            version.to_str().unwrap(),
            "main",
            "restart",
        ])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let results = all_results(&mut tap, 60, Duration::from_secs(90)).await;
    assert_one_result_each(&results, &jobs);
    assert!(
        results.iter().all(|r| r["status"] == "sent"),
        "{results:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_can_be_listed_and_replayed_and_are_then_sent() {
    let app = TestApp::spawn_with(TestAppOptions {
        max_attempts: 2,
        ..Default::default()
    })
    .await;
    app.connect_mailbox("org_ms", Vendor::Microsoft, "a@customer.com", "A")
        .await;
    app.standins.script(
        Vendor::Microsoft,
        (0..10).map(|_| standins::graph_unavailable()),
    );
    let mut tap = app.amqp.tap_results().await;
    let job = app.job("org_ms");
    let id = job["id"].as_str().unwrap().to_owned();
    app.amqp.publish_job(&job).await;
    assert_eq!(
        tap.result(&id, WAIT).await["error"]["code"],
        "provider_unavailable"
    );

    let (code, out, err) = run_command(&app, &["dead-letters", "list"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&id)
            && out.contains("reason=provider_unavailable")
            && out.contains("attempts=2"),
        "{out}"
    );
    assert!(out.contains("1 dead-lettered job(s) shown"), "{out}");
    // Handed back when the command's channel closed (asynchronously).
    let deadline = Instant::now() + Duration::from_secs(5);
    while app.amqp.queue_len(&app.amqp.topology.dead_queue).await != 1 {
        assert!(Instant::now() < deadline, "listing leaves them in place");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    app.standins.clear_script();
    let (code, out, err) = run_command(&app, &["dead-letters", "replay", "--id", &id], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 job(s) replayed"), "{out}");
    let replayed = tap
        .wait_for(WAIT, |s| {
            s.body["job_id"] == id.as_str() && s.body["status"] == "sent"
        })
        .await
        .expect("the replayed job is sent");
    assert_eq!(replayed.body["attempts"], 1, "a fresh attempt budget");
    assert_eq!(app.amqp.queue_len(&app.amqp.topology.dead_queue).await, 0);
    assert_eq!(app.standins.graph_messages().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn enqueue_publishes_a_job_the_worker_sends() {
    let app = TestApp::spawn().await;
    let mut tap = app.amqp.tap_results().await;
    let (code, out, err) = run_command(
        &app,
        &[
            "enqueue",
            "--org",
            "org_cli",
            "--to",
            "alice@example.com",
            "--subject",
            "Rappel : échéance",
            "--text",
            "Bonjour",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let id = out.trim();
    let r = tap.result(id, WAIT).await;
    assert_eq!(r["status"], "sent");
    assert_eq!(r["provider"], "default");

    let (code, _, err) = run_command(
        &app,
        &[
            "enqueue",
            "--org",
            "o",
            "--to",
            "not-an-address",
            "--subject",
            "s",
            "--text",
            "t",
        ],
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("invalid job"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_configuration_fails_fast_with_one_clear_line_and_a_nonzero_exit() {
    let app = TestApp::spawn_with(TestAppOptions {
        in_process_worker: false,
        ..Default::default()
    })
    .await;
    let cases: [(&[(&str, &str)], &str); 4] = [
        (
            &[("MAIL_DISPATCH_TOKEN_KEY", "")],
            "MAIL_DISPATCH_TOKEN_KEY",
        ),
        (
            &[("MAIL_DISPATCH_TOKEN_KEY", "c2hvcnQ=")],
            "MAIL_DISPATCH_TOKEN_KEY",
        ),
        (
            &[(
                "MAIL_DISPATCH_AMQP_URL",
                "amqp://guest:guest@127.0.0.1:1/%2f",
            )],
            "RabbitMQ",
        ),
        (
            &[(
                "MAIL_DISPATCH_DATABASE_URL",
                "postgres://postgres@127.0.0.1:1/x",
            )],
            "PostgreSQL",
        ),
    ];
    for (env, expected) in cases {
        let mut cmd = Command::new(PROGRAM);
        cmd.arg("worker")
            .envs(app.program_env())
            .env("RUST_LOG", "off");
        for (k, v) in env {
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{env:?} should fail");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(
            err.starts_with("error: ") && err.contains(expected),
            "{env:?}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_whole_flow_through_the_program_never_logs_or_prints_a_token() {
    let app = TestApp::spawn_with(TestAppOptions {
        in_process_worker: false,
        ..Default::default()
    })
    .await;
    let admin_port = free_port();
    let admin = format!("http://127.0.0.1:{admin_port}");
    let program = Program::start_with(
        &app,
        "run",
        &[
            (
                "MAIL_DISPATCH_ADMIN_LISTEN",
                format!("127.0.0.1:{admin_port}"),
            ),
            ("MAIL_DISPATCH_PUBLIC_URL", admin.clone()),
            ("RUST_LOG", "debug".into()),
        ],
    )
    .await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    app.standins.set_consent(
        Vendor::Google,
        standins::Consent::Approve("ops@customer.com".into()),
    );
    let body: Value = http
        .post(format!(
            "{admin}/v1/organizations/org_g/integration/authorize"
        ))
        .bearer_auth(mail_dispatch_test_support::ADMIN_TOKEN)
        .json(
            &serde_json::json!({"provider": "google", "return_to": "https://app.example/settings"}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut url = body["authorization_url"]
        .as_str()
        .expect("authorization_url")
        .to_owned();
    while !url.starts_with("https://app.example") {
        let resp = http.get(&url).send().await.unwrap();
        url = resp.headers()["location"].to_str().unwrap().to_owned();
    }
    assert!(url.contains("status=connected"), "{url}");
    let connection = url::Url::parse(&url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "connection")
        .map(|(_, v)| v.into_owned())
        .expect("a connection to confirm");
    let confirmed: Value = http
        .post(format!(
            "{admin}/v1/organizations/org_g/integration/confirm"
        ))
        .bearer_auth(mail_dispatch_test_support::ADMIN_TOKEN)
        .json(&serde_json::json!({"connection": connection}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(confirmed["status"], "connected", "{confirmed}");
    let outcome: Value = http
        .put(format!("{admin}/v1/organizations/org_g/integration/sender"))
        .bearer_auth(mail_dispatch_test_support::ADMIN_TOKEN)
        .json(&serde_json::json!({"email": "ops@customer.com", "name": "Ops"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(outcome["status"], "sent", "{outcome}");
    assert_eq!(app.standins.gmail_messages().len(), 1, "the test message");
    // Force a refresh too: the provider stops accepting the access token.
    app.standins.invalidate_all_access(Vendor::Google);
    let mut tap = app.amqp.tap_results().await;
    let job = app.job("org_g");
    app.amqp.publish_job(&job).await;
    let r = tap.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(r["provider"], "google");
    assert_eq!(r["status"], "sent");
    assert_eq!(app.standins.refreshes(Vendor::Google).len(), 1);

    let (code, list, _) = run_command(&app, &["integrations", "list"], &[]);
    assert_eq!(code, 0);
    assert!(
        list.contains("org_g") && list.contains("active") && list.contains("ops@customer.com"),
        "{list}"
    );
    let (code, show, _) = run_command(&app, &["integrations", "show", "org_g"], &[]);
    assert_eq!(code, 0);
    let shown: Value = serde_json::from_str(&show).unwrap();
    assert_eq!(shown["status"], "active");
    // What recipients see, as save and test learnt it; Sent Items is Microsoft's.
    assert_eq!(
        shown["recipients_see"]["email"], "ops@customer.com",
        "{show}"
    );
    assert_eq!(shown["recipients_see"]["differs"], false);
    assert_eq!(shown["save_to_sent_items"], Value::Null);

    let (code, logs) = program.terminate(Duration::from_secs(20)).await;
    assert_eq!(code, 0);
    assert!(
        logs.contains("provider connected") && logs.contains("access token refreshed"),
        "logs were captured: {logs}"
    );
    // A healthy run (a first start included: its topology is new) logs no error.
    let errors: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("\"level\":\"ERROR\""))
        .collect();
    assert!(errors.is_empty(), "errors logged: {errors:#?}");
    // Neither tokens nor full addresses (the recipients of jobs and tests).
    for secret in [
        "ya29.g-at-",
        "1//g-rt-",
        "code-",
        connection.as_str(),
        mail_dispatch_test_support::ADMIN_TOKEN,
        "code_verifier",
        "alice@example.com",
    ] {
        for (what, text) in [
            ("logs", &logs),
            ("integrations list", &list),
            ("integrations show", &show),
        ] {
            assert!(!text.contains(secret), "{what} contain `{secret}`");
        }
    }
}

/// `mail-dispatch admin` builds the shared services only: no pacer, no published
/// marks, no ledger pruning. A worker prunes an old finished ledger entry as soon
/// as it starts; an admin-only process leaves it alone.
#[tokio::test(flavor = "multi_thread")]
async fn the_admin_role_runs_none_of_the_workers_background_work() {
    let app = TestApp::spawn_with(TestAppOptions {
        in_process_worker: false,
        ..Default::default()
    })
    .await;
    let (client, connection) = tokio_postgres::connect(&app.db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .execute(
            "INSERT INTO job_ledger (job_id, organization_id, state, updated_at)
             VALUES ('old-job', 'org_1', 'published', now() - interval '30 days')",
            &[],
        )
        .await
        .unwrap();
    let remaining = || async {
        client
            .query_one(
                "SELECT count(*) FROM job_ledger WHERE job_id = 'old-job'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let admin_listen = (
        "MAIL_DISPATCH_ADMIN_LISTEN",
        format!("127.0.0.1:{}", free_port()),
    );
    let admin = Program::start_with(&app, "admin", std::slice::from_ref(&admin_listen)).await;
    // The worker's upkeep prunes at start (its first tick is immediate): give an
    // admin-only process more than that.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(remaining().await, 1, "the admin role pruned the ledger");
    let (code, logs) = admin.terminate(Duration::from_secs(20)).await;
    assert_eq!(code, 0, "{logs}");

    let worker = Program::start(&app, "worker").await;
    let deadline = Instant::now() + WAIT;
    while remaining().await == 1 {
        assert!(
            Instant::now() < deadline,
            "the worker never pruned: {}",
            worker.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Migrations applied once by an owner (`mail-dispatch migrate`), the service runs
/// under a role that may only read and write rows: no DDL, no CREATEDB. An older
/// binary stays ready when the schema is newer than it (rolling updates).
#[tokio::test(flavor = "multi_thread")]
async fn a_runtime_role_without_ddl_rights_runs_the_service_on_a_migrated_database() {
    let app = TestApp::spawn_with(TestAppOptions {
        in_process_worker: false,
        ..Default::default()
    })
    .await;
    let role = mail_dispatch_test_support::unique("md_runtime_");
    let owner = app.db.client().await;
    owner
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD 'pw';
             GRANT USAGE ON SCHEMA public TO {role};
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role};
             GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role};
             REVOKE CREATE ON SCHEMA public FROM PUBLIC;
             -- A newer binary migrated ahead of this one.
             INSERT INTO schema_migrations (version, name) VALUES (999, 'from a newer binary');"
        ))
        .await
        .unwrap();
    let runtime_url = app.db.url.replacen("postgres@", &format!("{role}:pw@"), 1);
    let program = Program::start_with(
        &app,
        "worker",
        &[("MAIL_DISPATCH_DATABASE_URL", runtime_url)],
    )
    .await;
    let mut tap = app.amqp.tap_results().await;
    let job = app.job("org_1");
    app.amqp.publish_job(&job).await;
    let r = tap.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(r["status"], "sent", "{r}");
    let (code, logs) = program.terminate(Duration::from_secs(20)).await;
    assert_eq!(code, 0, "{logs}");
    owner
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role};"))
        .await
        .unwrap();
}

/// Tasks of a dropped connection keep running until their send is over: the new
/// connection's deliveries wait for their slots, so in-flight sends never exceed
/// MAIL_DISPATCH_CONCURRENCY across a reconnect.
#[tokio::test(flavor = "multi_thread")]
async fn a_reconnect_never_raises_sends_in_flight_above_the_concurrency() {
    let app = TestApp::spawn_with(TestAppOptions {
        concurrency: 4,
        exclusive: true,
        ..Default::default()
    })
    .await;
    app.connect_mailbox("org_g", Vendor::Google, "g@customer.com", "G")
        .await;
    let send_time = Duration::from_millis(800);
    app.standins.set_send_delay(send_time);
    let mut tap = app.amqp.tap_results().await;
    let jobs = publish_jobs(&app, "org_g", 24).await;
    let deadline = Instant::now() + WAIT;
    while app.standins.send_attempts(Vendor::Google) < 4 {
        assert!(Instant::now() < deadline, "no sends started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Four sends in flight: drop the connection under them.
    let status = Command::new("rabbitmqctl")
        .args(["close_all_connections", "mail-dispatch test"])
        .output()
        .unwrap();
    assert!(status.status.success());
    let results = all_results(&mut tap, 24, Duration::from_secs(90)).await;
    assert_one_result_each(&results, &jobs);
    let mut starts = app.standins.attempt_times(Vendor::Google);
    starts.sort();
    let window = send_time - Duration::from_millis(50);
    let most_at_once = starts
        .iter()
        .map(|t| {
            starts
                .iter()
                .filter(|u| **u >= *t && **u < *t + window)
                .count()
        })
        .max()
        .unwrap_or(0);
    assert!(
        most_at_once <= 4,
        "{most_at_once} sends at once with MAIL_DISPATCH_CONCURRENCY=4"
    );
}

/// Issue #13 point 3, as an SRE would try it: three replicas with default
/// settings on one queue, one Microsoft mailbox that takes 200 ms per send.
/// Graph allows 4 concurrent requests per app and mailbox whatever the number
/// of processes: the replicas share that through PostgreSQL, so the mailbox
/// sees (almost) no 429 while being driven near its limit of 4 / 200 ms (a
/// freed slot is announced, and a job waiting for one takes it at once).
#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_share_a_graph_mailboxs_four_concurrent_requests() {
    let app = TestApp::spawn_with(TestAppOptions {
        in_process_worker: false,
        // The program's defaults.
        concurrency: 64,
        max_attempts: 8,
        max_age: Duration::from_secs(6 * 3600),
        claim_lease: Duration::from_secs(120),
        pacing: mail_dispatch_worker::pacing::PacingConfig::default(),
        // Three worker processes and a throughput floor: nothing else runs beside it.
        exclusive: true,
        ..Default::default()
    })
    .await;
    let account = "ops@customer.com";
    app.connect_mailbox("org_m", Vendor::Microsoft, account, "Ops")
        .await;
    let latency = Duration::from_millis(200);
    app.standins.set_send_delay(latency);
    let mut tap = app.amqp.tap_results().await;
    let _replicas = [
        Program::start(&app, "worker").await,
        Program::start(&app, "worker").await,
        Program::start(&app, "worker").await,
    ];
    let n = 200;
    let started = Instant::now();
    let jobs = publish_jobs(&app, "org_m", n).await;
    let results = all_results(&mut tap, n, Duration::from_secs(120)).await;
    let elapsed = started.elapsed();
    assert_one_result_each(&results, &jobs);
    assert!(
        results.iter().all(|r| r["status"] == "sent"),
        "every job sent"
    );
    let throttled = app.standins.concurrency_throttled(account);
    let rate = n as f64 / elapsed.as_secs_f64();
    let limit = 4.0 / latency.as_secs_f64();
    let (accepted, busy) = app.standins.mean_concurrency(account);
    println!(
        "3 replicas, one Graph mailbox at {} ms per send: {n} jobs in {:.1} s = {rate:.1} sends/s \
         (limit {limit:.0}/s), {throttled} concurrency 429s, peak {} in flight, \
         {accepted} sends at {busy:.2} in flight on average",
        latency.as_millis(),
        elapsed.as_secs_f64(),
        app.standins.peak_concurrency(account)
    );
    assert!(
        throttled <= 5,
        "{throttled} 429 ApplicationThrottled: the replicas went over the mailbox's 4 concurrent requests"
    );
    // Near the limit: the mailbox's four slots kept busy most of the time
    // (measured 3.5–3.7 on average, 17–18 sends/s overall, also with two CPU
    // hogs beside it; 2.0 and 10/s when a job that found every slot held was
    // deferred instead of waiting for a release).
    assert!(
        busy >= 2.8,
        "the mailbox had {busy:.2} requests in flight on average, of the 4 Graph allows"
    );
    assert!(
        rate >= 0.55 * limit,
        "{rate:.1} sends/s, far below the mailbox's {limit:.0}/s"
    );
}

/// What Microsoft support asks for to trace a Graph request: its
/// `client-request-id`, Graph's `request-id`, and the answer's `Date`, logged
/// for every call in the provider call's span.
#[tokio::test(flavor = "multi_thread")]
async fn every_graph_call_is_logged_with_its_client_request_id_request_id_and_date() {
    let app = TestApp::spawn_with(TestAppOptions {
        in_process_worker: false,
        ..Default::default()
    })
    .await;
    app.connect_mailbox(
        "org_ms",
        Vendor::Microsoft,
        "admin@customer.com",
        "Customer",
    )
    .await;
    let program = Program::start(&app, "worker").await;
    let mut tap = app.amqp.tap_results().await;
    let job = app.job("org_ms");
    app.amqp.publish_job(&job).await;
    let r = tap.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(r["status"], "sent", "{r:#}");
    let (code, logs) = program.terminate(Duration::from_secs(20)).await;
    assert_eq!(code, 0);

    let calls = app.standins.graph_client_request_ids();
    let (_, sent) = calls
        .iter()
        .find(|(path, _)| path == "/v1.0/me/sendMail")
        .expect("a sendMail call");
    let sent = sent.as_deref().expect("a client-request-id");
    let line: Value = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["graph.client_request_id"] == sent)
        .unwrap_or_else(|| panic!("no log line with client-request-id {sent}: {logs}"));
    assert_eq!(line["graph.operation"], "sendMail");
    assert_eq!(line["graph.request_id"], r["provider_message_id"], "{line}");
    assert!(
        chrono::DateTime::parse_from_rfc2822(line["graph.date"].as_str().unwrap()).is_ok(),
        "{line}"
    );
    assert_eq!(line["span"]["name"], "provider_call", "{line}");
    assert_eq!(line["span"]["org.id"], "org_ms", "{line}");
}

/// The same three replicas driving one Graph mailbox, one of them killed (SIGKILL)
/// mid-run: its jobs come back to the other two (claims taken over once their
/// lease ends, fleet slots freed when theirs does), and every job still gets
/// exactly one result, without the survivors going over the mailbox's four
/// concurrent requests.
#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_one_killed_mid_run_still_give_every_job_exactly_one_result() {
    let app = TestApp::spawn_with(TestAppOptions {
        in_process_worker: false,
        concurrency: 64,
        max_attempts: 8,
        max_age: Duration::from_secs(6 * 3600),
        // Short, so that the killed replica's claims are taken over quickly.
        claim_lease: Duration::from_secs(3),
        pacing: mail_dispatch_worker::pacing::PacingConfig::default(),
        ..Default::default()
    })
    .await;
    let account = "ops@customer.com";
    app.connect_mailbox("org_m", Vendor::Microsoft, account, "Ops")
        .await;
    app.standins.set_send_delay(Duration::from_millis(200));
    let mut tap = app.amqp.tap_results().await;
    let doomed = Program::start(&app, "worker").await;
    let _survivors = [
        Program::start(&app, "worker").await,
        Program::start(&app, "worker").await,
    ];
    let n = 200;
    let jobs = publish_jobs(&app, "org_m", n).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let done = tap
            .settle(Duration::from_millis(10))
            .await
            .iter()
            .filter(|s| s.routing_key.starts_with("result."))
            .count();
        if done >= 60 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "jobs did not complete: {}",
            doomed.logs()
        );
    }
    doomed.kill9();
    let at_kill = tap
        .settle(Duration::from_millis(10))
        .await
        .iter()
        .filter(|s| s.routing_key.starts_with("result."))
        .count();
    assert!(at_kill < n, "the kill must land mid-run");
    let results = all_results(&mut tap, n, Duration::from_secs(180)).await;
    assert_one_result_each(&results, &jobs);
    let throttled = app.standins.concurrency_throttled(account);
    println!(
        "3 replicas, one killed after {at_kill} results: {} sent, {throttled} concurrency 429s, peak {} in flight",
        results.iter().filter(|r| r["status"] == "sent").count(),
        app.standins.peak_concurrency(account)
    );
    assert!(
        throttled <= 5,
        "{throttled} 429 ApplicationThrottled: the survivors went over the mailbox's 4 concurrent requests"
    );
}
