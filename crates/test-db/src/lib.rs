#![doc = include_str!("../README.md")]

use tokio_postgres::NoTls;

/// The PostgreSQL server the tests use (a URL naming its maintenance database).
pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database created for one test, dropped with the value.
#[derive(Debug)]
pub struct TempDatabase {
    pub name: String,
    /// Its connection URL.
    pub url: String,
    server: String,
}

impl TempDatabase {
    /// Creates `<prefix><random>` on the test server. Panics if PostgreSQL does not
    /// answer: the tests need it (see the README).
    pub async fn create(prefix: &str) -> TempDatabase {
        Self::create_on(&server_url(), prefix).await
    }

    /// Creates `<prefix><random>` on another server (`server`: a URL naming its
    /// maintenance database, reachable without TLS, e.g. over its Unix socket).
    pub async fn create_on(server: &str, prefix: &str) -> TempDatabase {
        let server = server.to_owned();
        let name = format!(
            "{prefix}{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        let (client, conn) = tokio_postgres::connect(&server, NoTls)
            .await
            .unwrap_or_else(|e| panic!("the test PostgreSQL server must answer (see README): {e}"));
        let conn = tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        drop(client);
        let _ = conn.await;
        let url = match server.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("TEST_DATABASE_URL must name a database"),
        };
        TempDatabase { name, url, server }
    }

    /// A plain client on the database, for assertions on raw rows.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url, NoTls).await.unwrap();
        tokio::spawn(conn);
        client
    }
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        let (name, server) = (self.name.clone(), self.server.clone());
        // Drop runs outside async context: a small runtime on its own thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok((client, conn)) = tokio_postgres::connect(&server, NoTls).await {
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
