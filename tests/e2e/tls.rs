//! PostgreSQL over TLS, with libpq's `sslmode` meanings, against a server each
//! test starts itself ([`PgTlsServer`]): a fresh CA, a certificate for
//! `DNS:localhost` only, TLS required for every TCP connection. The machine's own
//! PostgreSQL (and whatever certificate it has) plays no part.

use std::time::Duration;

use mail_dispatch_store::{PoolSettings, Store, TokenCipher};
use mail_dispatch_test_support::{PgTlsServer, TestApp, TestAppOptions, TestDb};
use secrecy::SecretString;
use tokio_postgres::error::SqlState;

use crate::process::Program;
use crate::support::WAIT;

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

fn root(path: &std::path::Path) -> String {
    format!("sslrootcert={}", path.display())
}

#[tokio::test(flavor = "multi_thread")]
async fn sslmode_require_and_verify_full_encrypt_and_verify_full_checks_the_ca_and_the_name() {
    let server = PgTlsServer::start().await;
    let db = TestDb::on(&server.socket_url()).await;
    let url = |host: &str, query: &str| server.tcp_url(host, &db.name, query);
    let ca = root(server.ca_file());

    // require: encrypted, the certificate not checked.
    let s = store(&url(
        "127.0.0.1",
        "sslmode=require&application_name=md-tls-require",
    ))
    .unwrap();
    assert!(s.ping().await.unwrap());
    assert!(all_encrypted(&db, "md-tls-require").await);

    // prefer (the default, no sslmode): encrypted, since the server offers TLS.
    let s = store(&url("127.0.0.1", "application_name=md-tls-prefer")).unwrap();
    assert!(s.ping().await.unwrap());
    assert!(all_encrypted(&db, "md-tls-prefer").await);

    // verify-full: the certificate is checked against the test's CA and the name.
    let s = store(&url(
        "localhost",
        &format!("sslmode=verify-full&{ca}&application_name=md-tls-full"),
    ))
    .unwrap();
    assert!(s.ping().await.unwrap());
    assert!(all_encrypted(&db, "md-tls-full").await);

    // The certificate names DNS:localhost only, not the IP address 127.0.0.1.
    let s = store(&url("127.0.0.1", &format!("sslmode=verify-full&{ca}"))).unwrap();
    assert!(s.ping().await.is_err(), "a name mismatch is refused");
    // verify-ca does not check the name.
    let s = store(&url("127.0.0.1", &format!("sslmode=verify-ca&{ca}"))).unwrap();
    assert!(s.ping().await.unwrap());

    // A CA with the same name but another key signed nothing of the server's.
    let foreign = root(server.foreign_ca_file());
    for mode in ["verify-full", "verify-ca"] {
        let s = store(&url("localhost", &format!("sslmode={mode}&{foreign}"))).unwrap();
        assert!(s.ping().await.is_err(), "{mode}: a wrong CA is refused");
    }
    // Without sslrootcert the Mozilla roots are the trusted CAs: not the test's.
    let s = store(&url("localhost", "sslmode=verify-full")).unwrap();
    assert!(
        s.ping().await.is_err(),
        "the Mozilla roots do not trust the test's CA"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_refuses_a_connection_without_tls() {
    let server = PgTlsServer::start().await;
    let db = TestDb::on(&server.socket_url()).await;

    let s = store(&server.tcp_url("127.0.0.1", &db.name, "sslmode=disable")).unwrap();
    assert!(s.ping().await.is_err(), "sslmode=disable is refused");

    // The refusal is the server's (pg_hba.conf `hostnossl … reject`), not the client's.
    let err = tokio_postgres::connect(
        &server.tcp_url("127.0.0.1", &db.name, "sslmode=disable"),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("a connection without TLS is refused");
    let db_error = err.as_db_error().expect("an error from the server");
    assert_eq!(
        db_error.code(),
        &SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
        "{db_error}"
    );
    assert!(db_error.message().contains("pg_hba.conf"), "{db_error}");

    // The same server, over TLS, takes the connection.
    let s = store(&server.tcp_url("127.0.0.1", &db.name, "sslmode=require")).unwrap();
    assert!(s.ping().await.unwrap());
}

/// The whole service (pools, the LISTEN connection) over verified TLS.
#[tokio::test(flavor = "multi_thread")]
async fn the_worker_runs_over_verified_tls() {
    let server = PgTlsServer::start().await;
    let app = TestApp::spawn_with(TestAppOptions {
        in_process_worker: false,
        database_server: Some(server.socket_url()),
        ..Default::default()
    })
    .await;
    let url = server.tcp_url(
        "localhost",
        &app.db.name,
        &format!(
            "sslmode=verify-full&{}&application_name=md-tls-worker",
            root(server.ca_file())
        ),
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
