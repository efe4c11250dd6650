//! PostgreSQL over TLS, with libpq's `sslmode` meanings: the local server runs
//! TLS with Debian's self-signed certificate for `localhost`
//! (/etc/ssl/certs/ssl-cert-snakeoil.pem), which serves as the trusted root here.

use std::time::Duration;

use mail_dispatch_store::{PoolSettings, Store, TokenCipher};
use mail_dispatch_test_support::{TestApp, TestAppOptions, TestDb};
use secrecy::SecretString;

use crate::process::Program;
use crate::support::WAIT;

const ROOT: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

fn with(url: &str, host: &str, query: &str) -> String {
    let url = url.replacen("@127.0.0.1:", &format!("@{host}:"), 1);
    format!("{url}?{query}")
}

fn store(url: &str) -> Result<Store, mail_dispatch_store::StoreError> {
    let key = SecretString::from(TokenCipher::generate_key());
    Store::connect(
        url,
        TokenCipher::new(&key, &[]).unwrap(),
        PoolSettings::default(),
    )
}

/// Whether every session of `application` on the server is encrypted (and there is one).
async fn all_encrypted(db: &TestDb, application: &str) -> bool {
    let rows = db
        .client()
        .await
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = $1",
            &[&application],
        )
        .await
        .unwrap();
    !rows.is_empty() && rows.iter().all(|r| r.get::<_, bool>(0))
}

#[tokio::test(flavor = "multi_thread")]
async fn sslmode_require_and_verify_full_encrypt_and_verify_full_checks_the_name() {
    let db = TestDb::new().await;
    let ssl_on: String = db
        .client()
        .await
        .query_one("SHOW ssl", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        ssl_on, "on",
        "the local PostgreSQL serves TLS (Debian's default)"
    );

    // require: encrypted, the certificate not checked.
    let s = store(&with(
        &db.url,
        "127.0.0.1",
        "sslmode=require&application_name=md-tls-require",
    ))
    .unwrap();
    assert!(s.ping().await.unwrap());
    assert!(all_encrypted(&db, "md-tls-require").await);

    // verify-full: the certificate is checked against the root and the host name.
    let s = store(&with(
        &db.url,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ROOT}&application_name=md-tls-full"),
    ))
    .unwrap();
    assert!(s.ping().await.unwrap());
    assert!(all_encrypted(&db, "md-tls-full").await);

    // The certificate is for localhost, not 127.0.0.1: refused.
    let s = store(&with(
        &db.url,
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ROOT}"),
    ))
    .unwrap();
    assert!(s.ping().await.is_err(), "a name mismatch is refused");
    // verify-ca does not check the name.
    let s = store(&with(
        &db.url,
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={ROOT}"),
    ))
    .unwrap();
    assert!(s.ping().await.unwrap());
    // A root that signed nothing of the server's: refused.
    let s = store(&with(&db.url, "localhost", "sslmode=verify-full")).unwrap();
    assert!(
        s.ping().await.is_err(),
        "the Mozilla roots do not trust a self-signed certificate"
    );
}

/// The whole service (pools, the LISTEN connection) over verified TLS.
#[tokio::test(flavor = "multi_thread")]
async fn the_worker_runs_over_verified_tls() {
    let app = TestApp::spawn_with(TestAppOptions {
        in_process_worker: false,
        ..Default::default()
    })
    .await;
    let url = with(
        &app.db.url,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ROOT}&application_name=md-tls-worker"),
    );
    let program = Program::start_with(&app, "worker", &[("MAIL_DISPATCH_DATABASE_URL", url)]).await;
    let mut tap = app.amqp.tap_results().await;
    let job = app.job("org_1");
    app.amqp.publish_job(&job).await;
    let r = tap.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(r["status"], "sent", "{r}");
    assert!(all_encrypted(&app.db, "md-tls-worker").await);
    let (code, logs) = program.terminate(Duration::from_secs(20)).await;
    assert_eq!(code, 0, "{logs}");
}
