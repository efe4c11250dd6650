//! A migrated database per test (on a `mail-dispatch-test-db` temporary database).

use mail_dispatch_store::{PoolSettings, Store, TokenCipher};
use mail_dispatch_test_db::TempDatabase;
use secrecy::SecretString;

/// A fresh database, migrated, dropped when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub key: SecretString,
    pub store: Store,
    database: TempDatabase,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let database = TempDatabase::create("md_test_").await;
        let key = SecretString::from(TokenCipher::generate_key());
        let store = Store::connect(
            &database.url,
            TokenCipher::new(&key, &[]).unwrap(),
            PoolSettings::default(),
        )
        .unwrap();
        store.migrate().await.expect("migrations apply");
        TestDb {
            name: database.name.clone(),
            url: database.url.clone(),
            key,
            store,
            database,
        }
    }

    /// A plain client on the test database, for assertions on raw rows.
    pub async fn client(&self) -> tokio_postgres::Client {
        self.database.client().await
    }
}
