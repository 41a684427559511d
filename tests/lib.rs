//! Support shared by Herald's test suites: an isolated schema on the real Postgres per test,
//! a clear skip (or, in CI, a failure) when Postgres cannot be reached, and a real HTTP
//! receiver to deliver to.

pub mod sink;

use sqlx::{Connection, PgConnection};

/// The Postgres every machine of this project runs; `HERALD_TEST_PG` points elsewhere.
pub const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

pub fn pg_base_url() -> String {
    std::env::var("HERALD_TEST_PG").unwrap_or_else(|_| DEFAULT_PG_URL.to_string())
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// A schema of its own for one test, reached through `url` (its `search_path` is set in
/// the URL, so every connection of a pool lands in it). Dropped by [`PgSchema::drop`];
/// a schema left behind by a failed run is dropped when the same test starts again.
pub struct PgSchema {
    pub url: String,
    pub name: String,
}

impl PgSchema {
    /// `None` when Postgres is unreachable outside CI, after saying so on stderr.
    /// In CI an unreachable Postgres fails the test: the suite must not pass by skipping.
    pub async fn create(test_name: &str) -> Option<PgSchema> {
        let base = pg_base_url();
        let mut admin = match PgConnection::connect(&base).await {
            Ok(conn) => conn,
            Err(err) if !in_ci() => {
                eprintln!(
                    "SKIPPED {test_name} on Postgres: cannot connect to {base}: {err} \
                     (start Postgres or set HERALD_TEST_PG; CI runs these)"
                );
                return None;
            }
            Err(err) => panic!("Postgres at {base} is required in CI: {err}"),
        };
        let name = schema_name(test_name);
        for statement in [
            format!("DROP SCHEMA IF EXISTS {name} CASCADE"),
            format!("CREATE SCHEMA {name}"),
        ] {
            if let Err(err) = sqlx::query(&statement).execute(&mut admin).await {
                panic!("preparing schema {name}: {statement}: {err}");
            }
        }
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-c%20search_path%3D{name}");
        Some(PgSchema { url, name })
    }

    pub async fn drop(self) {
        if let Ok(mut admin) = PgConnection::connect(&pg_base_url()).await {
            let statement = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name);
            if let Err(err) = sqlx::query(&statement).execute(&mut admin).await {
                eprintln!("could not drop test schema {}: {err}", self.name);
            }
        }
    }
}

/// Postgres identifiers: lowercase, alphanumeric and `_`, at most 63 bytes.
fn schema_name(test_name: &str) -> String {
    let cleaned: String = test_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let mut name = format!("herald_t_{cleaned}");
    name.truncate(63);
    name
}

#[cfg(test)]
mod tests {
    #[test]
    fn schema_names_are_valid_identifiers() {
        let name = super::schema_name("store::claim/Expired-Lease");
        assert_eq!(name, "herald_t_store__claim_expired_lease");
        assert!(super::schema_name(&"x".repeat(100)).len() <= 63);
    }
}
