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
        Self::on(&crate::postgres_url()).await
    }

    /// The same on another server (`server`: a URL of its maintenance database,
    /// e.g. [`crate::PgTlsServer::socket_url`]).
    pub async fn on(server: &str) -> TestDb {
        let database = TempDatabase::create_on(server, "md_test_").await;
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

    /// The PostgreSQL server's address (for a proxy in front of it).
    pub fn server_addr(&self) -> std::net::SocketAddr {
        let url = url::Url::parse(&self.url).expect("a URL");
        let host = url.host_str().expect("a host");
        let port = url.port().unwrap_or(5432);
        std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
            .expect("the test server's address resolves")
            .next()
            .expect("an address")
    }

    /// This database's URL with the server at `addr` (a proxy) instead.
    pub fn url_at(&self, addr: std::net::SocketAddr) -> String {
        let mut url = url::Url::parse(&self.url).expect("a URL");
        url.set_ip_host(addr.ip()).expect("an IP host");
        url.set_port(Some(addr.port())).expect("a port");
        url.to_string()
    }

    /// Another store on this database, reached at `addr`, with these pools and timeouts.
    pub fn store_at(&self, addr: std::net::SocketAddr, pool: PoolSettings) -> Store {
        Store::connect(
            &self.url_at(addr),
            TokenCipher::new(&self.key, &[]).unwrap(),
            pool,
        )
        .unwrap()
    }

    /// A plain client on the test database, for assertions on raw rows.
    pub async fn client(&self) -> tokio_postgres::Client {
        self.database.client().await
    }
}
