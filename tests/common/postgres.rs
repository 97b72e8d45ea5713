//! A fresh PostgreSQL database per test on the shared server, dropped when the test ends (even
//! when it panics).

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The server tests create their databases on: `TEST_DATABASE_URL`, else the local one.
pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

pub struct TestDatabase {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDatabase {
    /// Runs the service's binary with `arguments` against this database (logs off): its exit
    /// status, stdout and stderr.
    pub fn cli(&self, arguments: &[&str]) -> (Option<i32>, String, String) {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
            .args(arguments)
            .env("DATABASE_URL", &self.url)
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8(output.stdout).unwrap(),
            String::from_utf8(output.stderr).unwrap(),
        )
    }

    /// Creates an empty database with a unique name.
    pub async fn create() -> TestDatabase {
        let server = server_url();
        let name = format!("fqo_test_{}", uuid::Uuid::new_v4().simple());
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&server)
            .await
            .expect("connect to the test server");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let options: PgConnectOptions = server.parse().unwrap();
        let options = options.database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .connect_with(options)
            .await
            .unwrap();
        let url = format!("{}/{name}", server.rsplit_once('/').unwrap().0);
        TestDatabase { name, url, pool }
    }

    /// Creates a database with every migration applied.
    pub async fn migrated() -> TestDatabase {
        let database = TestDatabase::create().await;
        fraiseql_observers::migrate::run(&database.pool)
            .await
            .expect("migrations apply");
        database
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Synchronous, so it also runs while a failing test unwinds.
        let _ = std::process::Command::new("psql")
            .arg(server_url())
            .arg("-qc")
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .output();
    }
}
