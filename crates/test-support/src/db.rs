//! A migrated database per test.

use mail_dispatch_store::{PoolSettings, Store, TokenCipher};
use secrecy::SecretString;
use tokio_postgres::NoTls;

/// A fresh database, migrated, dropped when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub key: SecretString,
    pub store: Store,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let name = crate::unique("md_test_");
        let admin = crate::postgres_url();
        let (client, conn) = tokio_postgres::connect(&admin, NoTls)
            .await
            .expect("PostgreSQL must run on 127.0.0.1:5432 (see README)");
        let conn = tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        drop(client);
        let _ = conn.await;
        let url = match admin.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("TEST_DATABASE_URL must name a database"),
        };
        let key = SecretString::from(TokenCipher::generate_key());
        let store = Store::connect(
            &url,
            TokenCipher::new(&key, &[]).unwrap(),
            PoolSettings::default(),
        )
        .unwrap();
        store.migrate().await.expect("migrations apply");
        TestDb {
            name,
            url,
            key,
            store,
        }
    }

    /// A plain client on the test database, for assertions on raw rows.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url, NoTls).await.unwrap();
        tokio::spawn(conn);
        client
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside async context: a small runtime on its own thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok((client, conn)) =
                    tokio_postgres::connect(&crate::postgres_url(), NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}
