//! Opening stores: the embedded default's settings and the errors an operator reads.

use herald::store::{self, OpenOptions, StoreError};

#[tokio::test]
async fn sqlite_store_runs_in_wal_mode() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("herald.db");
    let url = format!("sqlite://{}", path.display());
    let store = store::open(
        &url,
        OpenOptions {
            create_if_missing: true,
            ..OpenOptions::default()
        },
    )
    .await
    .expect("open");
    store.migrate().await.expect("migrate");
    let raw = sqlx::SqlitePool::connect(&url).await.expect("raw pool");
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&raw)
        .await
        .expect("pragma");
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn a_missing_sqlite_file_is_not_created_behind_the_operators_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("nope.db");
    let err = store::open(
        &format!("sqlite://{}", path.display()),
        OpenOptions::default(),
    )
    .await
    .err()
    .expect("missing file is an error");
    assert!(matches!(err, StoreError::Missing { .. }));
    assert!(
        err.to_string()
            .contains("nope.db does not exist; run `herald init`"),
        "{err}"
    );
    assert!(!path.exists());
}

#[tokio::test]
async fn an_unmigrated_store_says_what_to_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("herald.db").display());
    let store = store::open(
        &url,
        OpenOptions {
            create_if_missing: true,
            ..OpenOptions::default()
        },
    )
    .await
    .expect("open");
    let err = store.check_schema().await.expect_err("not migrated");
    assert!(err.to_string().contains("run `herald migrate`"), "{err}");
    store.migrate().await.expect("migrate");
    store.check_schema().await.expect("current");
}

#[tokio::test]
async fn an_unreachable_postgres_is_named_without_its_password() {
    // Port 1 on loopback: nothing listens there, the refusal is immediate.
    let err = store::open(
        "postgres://app:hunter2@127.0.0.1:1/events",
        OpenOptions::default(),
    )
    .await
    .err()
    .expect("unreachable");
    let message = err.to_string();
    assert!(
        message.starts_with("cannot open store postgres://app:***@127.0.0.1:1/events"),
        "{message}"
    );
    assert!(!message.contains("hunter2"));
}

#[tokio::test]
async fn an_unknown_scheme_is_refused() {
    let err = store::open("mysql://root@127.0.0.1/test", OpenOptions::default())
        .await
        .err()
        .expect("unsupported");
    assert!(
        err.to_string()
            .contains("expected sqlite://PATH or postgres://"),
        "{err}"
    );
}
