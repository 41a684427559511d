//! What a scenario runs on: a fresh database per scenario and backend (a SQLite file in a
//! temporary directory, or a Postgres schema of its own), the benchmark's own pool beside
//! Herald's store for its SQL (preloading, producing, counting), and a Herald assembled
//! from config text the way `herald serve` assembles it.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use herald::config::Config;
use herald::service::Service;
use herald::store::{self, redact_url, EventStore};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{Connection, PgConnection};

use crate::sink::Sink;
use crate::tuning::{ENTITIES, ROUTE_ORDERING};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// The Postgres the benchmark uses: `HERALD_BENCH_PG`, else the test suite's.
pub fn pg_base_url() -> String {
    std::env::var("HERALD_BENCH_PG")
        .ok()
        .filter(|url| !url.trim().is_empty())
        .unwrap_or_else(herald_tests::pg_base_url)
}

/// Where `tests/build-plugins` put `NAME.wasm`: `HERALD_BENCH_PLUGINS`, else
/// `$CARGO_TARGET_DIR/plugins`, else the workspace's `target/plugins`.
pub fn built_plugins_dir() -> anyhow::Result<PathBuf> {
    let dir = if let Some(dir) = std::env::var_os("HERALD_BENCH_PLUGINS") {
        PathBuf::from(dir)
    } else {
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
            .join("plugins")
    };
    for name in ["noop", "webhook"] {
        let file = dir.join(format!("{name}.wasm"));
        if !file.is_file() {
            bail!(
                "{} is missing: run tests/build-plugins first (tests/bench does), or set \
                 HERALD_BENCH_PLUGINS",
                file.display()
            );
        }
    }
    Ok(dir)
}

/// The benchmark's own connections to a scenario's database.
#[derive(Clone)]
pub enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl Db {
    pub async fn execute(&self, sql: &str) -> anyhow::Result<u64> {
        let rows = match self {
            Db::Sqlite(pool) => sqlx::query(sql).execute(pool).await?.rows_affected(),
            Db::Postgres(pool) => sqlx::query(sql).execute(pool).await?.rows_affected(),
        };
        Ok(rows)
    }

    /// A query answering one integer (a count).
    pub async fn scalar(&self, sql: &str) -> anyhow::Result<i64> {
        let value = match self {
            Db::Sqlite(pool) => sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await,
            Db::Postgres(pool) => sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await,
        };
        value.with_context(|| format!("running `{sql}`"))
    }

    /// Where every recorded attempt can be read: on Postgres a view over the attempts log
    /// and the outcome batches (migration 0013).
    pub fn attempts(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "herald_attempts",
            Db::Postgres(_) => "herald_attempt_records",
        }
    }

    /// Attempts the store has recorded so far: the attempts log's id counter, read in
    /// constant time (a count would walk the log, or the backlog, that a drain is
    /// writing), and on Postgres the outcome batches' entries (a row per hundreds).
    pub async fn attempts_numbered(&self) -> anyhow::Result<i64> {
        self.scalar(match self {
            Db::Sqlite(_) => {
                "SELECT coalesce((SELECT seq FROM sqlite_sequence \
                   WHERE name = 'herald_attempts'), 0)"
            }
            Db::Postgres(_) => {
                "SELECT coalesce(pg_sequence_last_value(\
                   pg_get_serial_sequence('herald_attempts', 'attempt_id')), 0) \
                 + (SELECT coalesce(sum(cardinality(delivery_ids)), 0) \
                   FROM herald_outcome_batches)::bigint"
            }
        })
        .await
    }

    /// Events still READY.
    pub async fn ready_events(&self) -> anyhow::Result<i64> {
        self.scalar(&self.ready_events_sql("")).await
    }

    /// Events of `event_type` still READY.
    pub async fn ready_events_of_type(&self, event_type: &str) -> anyhow::Result<i64> {
        self.scalar(&self.ready_events_sql(&format!(" AND event_type = '{event_type}'")))
            .await
    }

    /// Counts READY events (narrowed by `filter`) the way Herald's backlog gauge does:
    /// those not fanned out yet, and those with a delivery still open. Counted while a
    /// drain runs, so on Postgres, where no index names the status, it must not scan the
    /// table it measures: new events are found through the fan-out queue there
    /// (migration 0008), and above the fan-out cursor on SQLite (its migration 0005).
    fn ready_events_sql(&self, filter: &str) -> String {
        // On Postgres an open delivery is a row or a claim item (migration 0013).
        let (not_fanned_out, claimed) = match self {
            Db::Sqlite(_) => (
                "event_id > (SELECT last_event_id FROM herald_fan_out_cursor)",
                "",
            ),
            Db::Postgres(_) => (
                "event_id IN (SELECT event_id FROM herald_fan_out_queue)",
                " UNION SELECT unnest(event_ids) FROM herald_claims",
            ),
        };
        format!(
            "SELECT (SELECT count(*) FROM events WHERE {not_fanned_out} \
               AND event_status = 'READY'{filter}) \
             + (SELECT count(*) FROM events WHERE event_status = 'READY'{filter} \
               AND event_id IN (SELECT event_id FROM herald_deliveries \
                 WHERE status IN ('PENDING', 'RETRY'){claimed}))"
        )
    }

    pub async fn events_with_status(&self, status: &str) -> anyhow::Result<i64> {
        self.scalar(&format!(
            "SELECT count(*) FROM events WHERE event_status = '{status}'"
        ))
        .await
    }

    /// `STATUS=COUNT, ...` of the events table, for error messages.
    pub async fn status_summary(&self) -> String {
        let sql = "SELECT event_status, count(*) FROM events GROUP BY event_status ORDER BY 1";
        let rows: Result<Vec<(String, i64)>, sqlx::Error> = match self {
            Db::Sqlite(pool) => sqlx::query_as(sql).fetch_all(pool).await,
            Db::Postgres(pool) => sqlx::query_as(sql).fetch_all(pool).await,
        };
        match rows {
            Ok(rows) => rows
                .iter()
                .map(|(status, count)| format!("{status}={count}"))
                .collect::<Vec<_>>()
                .join(", "),
            Err(err) => format!("(cannot count: {err})"),
        }
    }

    /// Insert events `first..=last` into `table` (the events table or one of its shape)
    /// in one statement: event type `event_type`, entity `bench`/`seq % ENTITIES`, data
    /// `{"seq": seq}`.
    pub async fn insert_range(
        &self,
        table: &str,
        event_type: &str,
        first: i64,
        last: i64,
    ) -> anyhow::Result<()> {
        self.insert_mixed(table, event_type, None, (first, last), 0)
            .await
    }

    /// Like [`Db::insert_range`], with every `every`-th event of `other_type` instead: two
    /// kinds of events interleaved over the same entities; with `padding` bytes, the data
    /// is `{"seq": seq, "pad": "…"}`, the pad a string of that many bytes.
    pub async fn insert_mixed(
        &self,
        table: &str,
        event_type: &str,
        other: Option<(&str, i64)>,
        (first, last): (i64, i64),
        padding: usize,
    ) -> anyhow::Result<()> {
        let (other_type, every) = other.unwrap_or((event_type, i64::MAX));
        let padding = i64::try_from(padding).context("--payload-bytes is too large")?;
        match self {
            Db::Sqlite(pool) => {
                let sql = format!(
                    "WITH RECURSIVE s(g) AS (SELECT ?2 UNION ALL SELECT g + 1 FROM s WHERE g < ?3) \
                     INSERT INTO {table} (event_type, entity_type, entity_id, event_data) \
                     SELECT CASE WHEN g % ?5 = 0 THEN ?4 ELSE ?1 END, 'bench', \
                     CAST(g % {ENTITIES} AS TEXT), \
                     CASE WHEN ?6 > 0 THEN json_object('seq', g, 'pad', \
                       substr(hex(zeroblob(?6)), 1, ?6)) ELSE json_object('seq', g) END FROM s"
                );
                sqlx::query(&sql)
                    .bind(event_type)
                    .bind(first)
                    .bind(last)
                    .bind(other_type)
                    .bind(every)
                    .bind(padding)
                    .execute(pool)
                    .await?;
            }
            Db::Postgres(pool) => {
                let sql = format!(
                    "INSERT INTO {table} (event_type, entity_type, entity_id, event_data) \
                     SELECT CASE WHEN g % $5 = 0 THEN $4 ELSE $1 END, 'bench', \
                     (g % {ENTITIES})::text, CASE WHEN $6 > 0 THEN \
                       jsonb_build_object('seq', g, 'pad', repeat('x', $6::int)) \
                       ELSE jsonb_build_object('seq', g) END \
                     FROM generate_series($2::bigint, $3::bigint) AS g"
                );
                sqlx::query(&sql)
                    .bind(event_type)
                    .bind(first)
                    .bind(last)
                    .bind(other_type)
                    .bind(every)
                    .bind(padding)
                    .execute(pool)
                    .await?;
            }
        }
        Ok(())
    }

    /// One event in its own transaction, as a producer writes it. Returns the instant the
    /// producer had its connection and sent the insert: the event's creation, as its
    /// `created_at` records it (the wait for a pooled connection is the producer's own).
    pub async fn insert_one(&self, event_type: &str, seq: i64) -> anyhow::Result<Instant> {
        let entity = (seq.rem_euclid(ENTITIES as i64)).to_string();
        let data = format!("{{\"seq\":{seq}}}");
        match self {
            Db::Sqlite(pool) => {
                let mut conn = pool.acquire().await?;
                let created = Instant::now();
                sqlx::query(
                    "INSERT INTO events (event_type, entity_type, entity_id, event_data) \
                     VALUES (?1, 'bench', ?2, ?3)",
                )
                .bind(event_type)
                .bind(entity)
                .bind(data)
                .execute(&mut *conn)
                .await?;
                Ok(created)
            }
            Db::Postgres(pool) => {
                let mut conn = pool.acquire().await?;
                let created = Instant::now();
                sqlx::query(
                    "INSERT INTO events (event_type, entity_type, entity_id, event_data) \
                     VALUES ($1, 'bench', $2, $3::jsonb)",
                )
                .bind(event_type)
                .bind(entity)
                .bind(data)
                .execute(&mut *conn)
                .await?;
                Ok(created)
            }
        }
    }

    async fn close(&self) {
        match self {
            Db::Sqlite(pool) => pool.close().await,
            Db::Postgres(pool) => pool.close().await,
        }
    }
}

/// A scenario's database and directory, dropped by [`Env::finish`].
pub struct Env {
    pub backend: Backend,
    pub dir: tempfile::TempDir,
    /// Herald's store, opened and migrated.
    pub store: Arc<dyn EventStore>,
    pub db: Db,
    /// Bytes of padding in each preloaded event's data (`--payload-bytes`).
    pub payload_bytes: usize,
    /// The Postgres schema to drop at the end.
    schema: Option<(String, String)>,
}

impl Env {
    pub async fn create(
        backend: Backend,
        scenario: &str,
        payload_bytes: usize,
    ) -> anyhow::Result<Env> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("herald-bench-{scenario}-"))
            .tempdir()
            .context("creating a temporary directory")?;
        let (url, schema) = match backend {
            Backend::Sqlite => (
                format!("sqlite://{}", dir.path().join("herald.db").display()),
                None,
            ),
            Backend::Postgres => {
                let base = pg_base_url();
                let name = format!("herald_bench_{scenario}");
                recreate_schema(&base, &name).await?;
                let separator = if base.contains('?') { '&' } else { '?' };
                let url = format!("{base}{separator}options=-c%20search_path%3D{name}");
                (url, Some((base, name)))
            }
        };
        let store: Arc<dyn EventStore> = Arc::from(
            store::open_migrated(&url)
                .await
                .with_context(|| format!("opening and migrating {}", redact_url(&url)))?,
        );
        let db = match backend {
            Backend::Sqlite => {
                // The same settings as Herald's own SQLite store.
                let options = SqliteConnectOptions::new()
                    .filename(dir.path().join("herald.db"))
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(sqlx::sqlite::SqliteSynchronous::Full)
                    .busy_timeout(Duration::from_secs(10));
                Db::Sqlite(
                    SqlitePoolOptions::new()
                        .max_connections(4)
                        .connect_with(options)
                        .await
                        .context("opening the benchmark's SQLite pool")?,
                )
            }
            Backend::Postgres => Db::Postgres(
                PgPoolOptions::new()
                    .max_connections(8)
                    .connect(&url)
                    .await
                    .with_context(|| format!("connecting to {}", redact_url(&url)))?,
            ),
        };
        Ok(Env {
            backend,
            dir,
            store,
            db,
            payload_bytes,
            schema,
        })
    }

    /// Copy the built plugins `names` into this scenario's own `plugins` directory (a
    /// scenario may deploy into it, and Herald keeps its compile cache there).
    pub fn install_plugins(&self, source: &Path, names: &[&str]) -> anyhow::Result<PathBuf> {
        let own = self.plugins_dir();
        std::fs::create_dir_all(&own).with_context(|| format!("creating {}", own.display()))?;
        for name in names {
            let file = format!("{name}.wasm");
            std::fs::copy(source.join(&file), own.join(&file))
                .with_context(|| format!("copying {file} into {}", own.display()))?;
        }
        Ok(own)
    }

    pub fn plugins_dir(&self) -> PathBuf {
        self.dir.path().join("plugins")
    }

    /// A Herald on this store: `[dispatch]` and `[[routes]]` as TOML text.
    pub async fn herald(&self, dispatch: &str, routes: &str) -> anyhow::Result<Arc<Service>> {
        let text = format!("plugins_dir = \"plugins\"\n\n[dispatch]\n{dispatch}\n\n{routes}");
        let path = self.dir.path().join("herald.toml");
        let config = Config::parse(&text, &path)
            .with_context(|| format!("the benchmark's config:\n{text}"))?;
        let service = Service::build(&config, self.store.clone())
            .await
            .context("building the service")?;
        Ok(Arc::new(service))
    }

    /// Close the pools and drop the Postgres schema; the directory goes with `self`.
    pub async fn finish(self) {
        self.db.close().await;
        drop(self.store);
        if let Some((base, name)) = self.schema {
            if let Err(err) = drop_schema(&base, &name).await {
                eprintln!("could not drop schema {name}: {err:#}");
            }
        }
    }
}

async fn recreate_schema(base: &str, name: &str) -> anyhow::Result<()> {
    let mut admin = PgConnection::connect(base).await.with_context(|| {
        format!(
            "connecting to Postgres at {} (start it with tests/ensure-postgres, or set \
             HERALD_BENCH_PG)",
            redact_url(base)
        )
    })?;
    for statement in [
        format!("DROP SCHEMA IF EXISTS {name} CASCADE"),
        format!("CREATE SCHEMA {name}"),
    ] {
        sqlx::query(&statement)
            .execute(&mut admin)
            .await
            .with_context(|| format!("preparing schema {name}: {statement}"))?;
    }
    Ok(())
}

async fn drop_schema(base: &str, name: &str) -> anyhow::Result<()> {
    let mut admin = PgConnection::connect(base).await?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
        .execute(&mut admin)
        .await?;
    Ok(())
}

/// What a server says it is, for the report's header.
pub async fn pg_version(base: &str) -> anyhow::Result<String> {
    let mut conn = PgConnection::connect(base).await.with_context(|| {
        format!(
            "connecting to Postgres at {} (start it with tests/ensure-postgres, or set \
             HERALD_BENCH_PG)",
            redact_url(base)
        )
    })?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&mut conn)
        .await?;
    Ok(version)
}

pub async fn sqlite_version() -> anyhow::Result<String> {
    let options = SqliteConnectOptions::from_str("sqlite::memory:")?;
    let mut conn = sqlx::SqliteConnection::connect_with(&options).await?;
    let version: String = sqlx::query_scalar("SELECT sqlite_version()")
        .fetch_one(&mut conn)
        .await?;
    Ok(version)
}

/// A route of every `bench.*` event to the no-op plugin.
pub fn noop_route(event_types: &str) -> String {
    format!(
        "[[routes]]\nname = \"bench-noop\"\nevent_types = [\"{event_types}\"]\nplugin = \"noop\"\nordering = \"{ROUTE_ORDERING}\"\n"
    )
}

/// A route of every `bench.*` event to the webhook plugin, POSTing to `sink` (loopback,
/// so the route must allow private addresses explicitly).
pub fn webhook_route(event_types: &str, sink: &Sink) -> String {
    format!(
        "[[routes]]\nname = \"bench-webhook\"\nevent_types = [\"{event_types}\"]\nplugin = \"webhook\"\nordering = \"{ROUTE_ORDERING}\"\nallowed_hosts = [\"{}\"]\nallow_private = true\n[routes.config]\nurl = \"{}\"\n",
        sink.host(),
        sink.url()
    )
}
