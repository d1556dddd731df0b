//! Storage: one [`Store`] trait, two implementations (SQLite, the embedded default; Postgres, for
//! production) with identical behaviour, generated from the same SQL by one macro.
//!
//! **Invariant:** every write is one transaction; a replace is a conditional
//! `UPDATE … WHERE etag = $old`, so of two writers holding the same etag exactly one wins.

use std::{future::Future, path::Path, pin::Pin, str::FromStr};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{
    Row,
    error::ErrorKind,
    postgres::{PgPool, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions},
};

/// A boxed future, so the trait stays object-safe.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Storage failures the engine distinguishes.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The write's expectation (absent / etag) no longer holds.
    #[error("the resource changed concurrently")]
    Conflict,
    /// The parent row does not exist.
    #[error("the parent resource does not exist")]
    ParentMissing,
    /// Anything else from the database.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// A stored body is not JSON (corruption).
    #[error("stored body is not valid JSON: {0}")]
    Corrupt(#[from] serde_json::Error),
    /// Migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// One stored resource.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResource {
    /// Full ARM id as first given.
    pub id: String,
    /// Lower-cased id (identity).
    pub id_key: String,
    /// Lower-cased parent id.
    pub parent_key: Option<String>,
    /// Lower-cased subscription id.
    pub subscription_key: String,
    /// Lower-cased resource group ("" for subscription scope).
    pub resource_group_key: String,
    /// Lower-cased type name.
    pub type_key: String,
    /// Resource JSON (without provisioningState).
    pub body: Value,
    /// Current etag.
    pub etag: String,
    /// Current provisioning state.
    pub provisioning_state: String,
    /// Last write.
    pub updated_at: DateTime<Utc>,
}

/// What a write expects to find.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// No row with this id (create).
    Absent,
    /// A row with exactly this etag (replace).
    Etag(String),
}

/// An asynchronous operation record.
#[derive(Debug, Clone, PartialEq)]
pub struct OperationRecord {
    /// Operation id (a UUID).
    pub id: String,
    /// Lower-cased subscription.
    pub subscription_key: String,
    /// Lower-cased resource group.
    pub resource_group_key: String,
    /// The resource the operation acts on.
    pub resource_id: String,
    /// `put` or `delete`.
    pub kind: String,
    /// Accepted / Provisioning / Succeeded / Failed / Canceled.
    pub status: String,
    /// Start.
    pub start_time: DateTime<Utc>,
    /// End, once terminal.
    pub end_time: Option<DateTime<Utc>>,
    /// ARM error object when Failed.
    pub error: Option<Value>,
}

/// Which rows a list reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListScope {
    /// Children of one parent (lower-cased parent id).
    Parent(String),
    /// One resource group: (subscription, resource group), lower-cased.
    ResourceGroup(String, String),
    /// A whole subscription (lower-cased).
    Subscription(String),
}

/// One part of a [`Store::read_consistent`] read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadSelector {
    /// The row with exactly this lower-cased id.
    Id(String),
    /// Rows whose lower-cased id starts with this prefix (end it with `/` to read only
    /// descendants of a resource).
    IdPrefix(String),
    /// Every row of one lower-cased type in one lower-cased subscription.
    TypeInSubscription {
        /// Lower-cased type name, e.g. `microsoft.eventgrid/namespaces`.
        type_key: String,
        /// Lower-cased subscription id.
        subscription_key: String,
    },
}

/// The smallest string greater than every string that starts with `prefix` and is not itself
/// such a string, so `prefix <= id < bound` selects exactly the ids starting with `prefix`
/// (bytewise order: SQLite's BINARY collation, Postgres `COLLATE "C"`). UTF-8 byte order is code
/// point order, so bumping the last code point works.
fn prefix_upper_bound(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        // Skip the surrogate gap; a char at the very top of the range has no successor, so drop it
        // and bump the one before.
        let next = match last as u32 {
            0xD7FF => Some('\u{E000}'),
            n => char::from_u32(n + 1),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// The storage contract of the engine.
pub trait Store: Send + Sync + 'static {
    /// Reads one resource by lower-cased id.
    fn get<'a>(&'a self, id_key: &'a str) -> StoreFuture<'a, Option<StoredResource>>;
    /// Creates or replaces `res` if `expect` holds, and records `op`, in one transaction.
    fn put<'a>(
        &'a self,
        res: &'a StoredResource,
        expect: Expect,
        op: &'a OperationRecord,
    ) -> StoreFuture<'a, ()>;
    /// Deletes a resource and (by cascade) its descendants, records `op`; false when absent.
    fn delete<'a>(&'a self, id_key: &'a str, op: &'a OperationRecord) -> StoreFuture<'a, bool>;
    /// Lists one type in `scope`, ordered by id, after `after` (exclusive), at most `limit`.
    fn list<'a>(
        &'a self,
        type_key: &'a str,
        scope: &'a ListScope,
        after: Option<&'a str>,
        limit: i64,
    ) -> StoreFuture<'a, Vec<StoredResource>>;
    /// Sets the provisioning state if the resource still has `etag` (a later write wins).
    fn set_provisioning_state<'a>(
        &'a self,
        id_key: &'a str,
        etag: &'a str,
        state: &'a str,
    ) -> StoreFuture<'a, bool>;
    /// Reads an operation.
    fn get_operation<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<OperationRecord>>;
    /// Updates an operation's status (and end time / error when terminal).
    fn update_operation<'a>(&'a self, op: &'a OperationRecord) -> StoreFuture<'a, ()>;
    /// Reads every row any selector matches, all from one read transaction (one consistent view
    /// of the database: no write commits "between" the selectors), without duplicates, ordered
    /// by id key. The config compiler reads a broker's whole desired state with it.
    fn read_consistent<'a>(
        &'a self,
        selectors: &'a [ReadSelector],
    ) -> StoreFuture<'a, Vec<StoredResource>>;
}

fn map_write_error(e: sqlx::Error) -> StoreError {
    if let sqlx::Error::Database(db) = &e {
        match db.kind() {
            ErrorKind::ForeignKeyViolation => return StoreError::ParentMissing,
            ErrorKind::UniqueViolation => return StoreError::Conflict,
            _ => {}
        }
    }
    StoreError::Db(e)
}

fn row_to_resource<R>(row: &R) -> Result<StoredResource, StoreError>
where
    R: Row,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database>,
    for<'r> DateTime<Utc>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let body: String = row.try_get("body")?;
    Ok(StoredResource {
        id: row.try_get("id")?,
        id_key: row.try_get("id_key")?,
        parent_key: row.try_get("parent_key")?,
        subscription_key: row.try_get("subscription_key")?,
        resource_group_key: row.try_get("resource_group_key")?,
        type_key: row.try_get("type_key")?,
        body: serde_json::from_str(&body)?,
        etag: row.try_get("etag")?,
        provisioning_state: row.try_get("provisioning_state")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn row_to_operation<R>(row: &R) -> Result<OperationRecord, StoreError>
where
    R: Row,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database>,
    for<'r> DateTime<Utc>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<DateTime<Utc>>: sqlx::Decode<'r, R::Database>,
{
    let error: Option<String> = row.try_get("error")?;
    Ok(OperationRecord {
        id: row.try_get("id")?,
        subscription_key: row.try_get("subscription_key")?,
        resource_group_key: row.try_get("resource_group_key")?,
        resource_id: row.try_get("resource_id")?,
        kind: row.try_get("kind")?,
        status: row.try_get("status")?,
        start_time: row.try_get("start_time")?,
        end_time: row.try_get("end_time")?,
        error: error.map(|e| serde_json::from_str(&e)).transpose()?,
    })
}

const COLUMNS: &str = "id_key, id, parent_key, subscription_key, resource_group_key, type_key, \
                       body, etag, provisioning_state, updated_at";

/// Generates the `Store` impl for one sqlx pool type from shared SQL (placeholders are `$n`,
/// which both drivers accept). `$begin` is how a write transaction starts: SQLite takes the write
/// lock up front (`BEGIN IMMEDIATE`) so two writers queue instead of failing to upgrade.
/// `$read_begin` starts a multi-statement read that sees one snapshot: a deferred `BEGIN` in
/// SQLite (WAL readers keep the snapshot of their first read until the end), `REPEATABLE READ`
/// in Postgres (its default, READ COMMITTED, takes a new snapshot per statement).
macro_rules! impl_store {
    ($store:ty, $begin:expr, $read_begin:expr) => {
        impl Store for $store {
            fn get<'a>(&'a self, id_key: &'a str) -> StoreFuture<'a, Option<StoredResource>> {
                Box::pin(async move {
                    let sql = format!("SELECT {COLUMNS} FROM resources WHERE id_key = $1");
                    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(id_key)
                        .fetch_optional(&self.pool)
                        .await?;
                    row.as_ref().map(row_to_resource).transpose()
                })
            }

            fn put<'a>(
                &'a self,
                res: &'a StoredResource,
                expect: Expect,
                op: &'a OperationRecord,
            ) -> StoreFuture<'a, ()> {
                Box::pin(async move {
                    let mut tx = self.pool.begin_with($begin).await?;
                    let body = serde_json::to_string(&res.body)?;
                    match expect {
                        Expect::Absent => {
                            let sql = format!(
                                "INSERT INTO resources ({COLUMNS}) \
                                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                            );
                            sqlx::query(sqlx::AssertSqlSafe(sql))
                                .bind(&res.id_key)
                                .bind(&res.id)
                                .bind(&res.parent_key)
                                .bind(&res.subscription_key)
                                .bind(&res.resource_group_key)
                                .bind(&res.type_key)
                                .bind(&body)
                                .bind(&res.etag)
                                .bind(&res.provisioning_state)
                                .bind(res.updated_at)
                                .execute(&mut *tx)
                                .await
                                .map_err(map_write_error)?;
                        }
                        Expect::Etag(old) => {
                            let done = sqlx::query(
                                "UPDATE resources SET body = $1, etag = $2, \
                                 provisioning_state = $3, updated_at = $4 \
                                 WHERE id_key = $5 AND etag = $6",
                            )
                            .bind(&body)
                            .bind(&res.etag)
                            .bind(&res.provisioning_state)
                            .bind(res.updated_at)
                            .bind(&res.id_key)
                            .bind(&old)
                            .execute(&mut *tx)
                            .await
                            .map_err(map_write_error)?;
                            if done.rows_affected() != 1 {
                                return Err(StoreError::Conflict);
                            }
                        }
                    }
                    insert_operation!(&mut *tx, op);
                    tx.commit().await?;
                    Ok(())
                })
            }

            fn delete<'a>(
                &'a self,
                id_key: &'a str,
                op: &'a OperationRecord,
            ) -> StoreFuture<'a, bool> {
                Box::pin(async move {
                    let mut tx = self.pool.begin_with($begin).await?;
                    let done = sqlx::query("DELETE FROM resources WHERE id_key = $1")
                        .bind(id_key)
                        .execute(&mut *tx)
                        .await?;
                    if done.rows_affected() == 0 {
                        return Ok(false);
                    }
                    insert_operation!(&mut *tx, op);
                    tx.commit().await?;
                    Ok(true)
                })
            }

            fn list<'a>(
                &'a self,
                type_key: &'a str,
                scope: &'a ListScope,
                after: Option<&'a str>,
                limit: i64,
            ) -> StoreFuture<'a, Vec<StoredResource>> {
                Box::pin(async move {
                    let after = after.unwrap_or("");
                    let (filter, a, b) = match scope {
                        ListScope::Parent(p) => ("parent_key = $2", p.as_str(), ""),
                        ListScope::ResourceGroup(s, rg) => (
                            "subscription_key = $2 AND resource_group_key = $5",
                            s.as_str(),
                            rg.as_str(),
                        ),
                        ListScope::Subscription(s) => ("subscription_key = $2", s.as_str(), ""),
                    };
                    // `$5 = $5` keeps every placeholder used whatever the scope.
                    let sql = format!(
                        "SELECT {COLUMNS} FROM resources WHERE type_key = $1 AND {filter} \
                         AND id_key > $3 AND ($5 = $5) ORDER BY id_key LIMIT $4"
                    );
                    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(type_key)
                        .bind(a)
                        .bind(after)
                        .bind(limit)
                        .bind(b)
                        .fetch_all(&self.pool)
                        .await?;
                    rows.iter().map(row_to_resource).collect()
                })
            }

            fn set_provisioning_state<'a>(
                &'a self,
                id_key: &'a str,
                etag: &'a str,
                state: &'a str,
            ) -> StoreFuture<'a, bool> {
                Box::pin(async move {
                    let done = sqlx::query(
                        "UPDATE resources SET provisioning_state = $1 \
                         WHERE id_key = $2 AND etag = $3",
                    )
                    .bind(state)
                    .bind(id_key)
                    .bind(etag)
                    .execute(&self.pool)
                    .await?;
                    Ok(done.rows_affected() == 1)
                })
            }

            fn get_operation<'a>(
                &'a self,
                id: &'a str,
            ) -> StoreFuture<'a, Option<OperationRecord>> {
                Box::pin(async move {
                    let row = sqlx::query(
                        "SELECT id, subscription_key, resource_group_key, resource_id, kind, \
                         status, start_time, end_time, error FROM operations WHERE id = $1",
                    )
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?;
                    row.as_ref().map(row_to_operation).transpose()
                })
            }

            fn update_operation<'a>(&'a self, op: &'a OperationRecord) -> StoreFuture<'a, ()> {
                Box::pin(async move {
                    let error = op.error.as_ref().map(|e| e.to_string());
                    sqlx::query(
                        "UPDATE operations SET status = $1, end_time = $2, error = $3 \
                         WHERE id = $4",
                    )
                    .bind(&op.status)
                    .bind(op.end_time)
                    .bind(error)
                    .bind(&op.id)
                    .execute(&self.pool)
                    .await?;
                    Ok(())
                })
            }

            fn read_consistent<'a>(
                &'a self,
                selectors: &'a [ReadSelector],
            ) -> StoreFuture<'a, Vec<StoredResource>> {
                Box::pin(async move {
                    let mut tx = self.pool.begin_with($read_begin).await?;
                    let mut rows = std::collections::BTreeMap::new();
                    for selector in selectors {
                        let found = match selector {
                            ReadSelector::Id(id) => {
                                let sql =
                                    format!("SELECT {COLUMNS} FROM resources WHERE id_key = $1");
                                sqlx::query(sqlx::AssertSqlSafe(sql))
                                    .bind(id)
                                    .fetch_all(&mut *tx)
                                    .await?
                            }
                            ReadSelector::IdPrefix(prefix) => match prefix_upper_bound(prefix) {
                                Some(bound) => {
                                    let sql = format!(
                                        "SELECT {COLUMNS} FROM resources \
                                         WHERE id_key >= $1 AND id_key < $2"
                                    );
                                    sqlx::query(sqlx::AssertSqlSafe(sql))
                                        .bind(prefix)
                                        .bind(bound)
                                        .fetch_all(&mut *tx)
                                        .await?
                                }
                                None => {
                                    let sql = format!(
                                        "SELECT {COLUMNS} FROM resources WHERE id_key >= $1"
                                    );
                                    sqlx::query(sqlx::AssertSqlSafe(sql))
                                        .bind(prefix)
                                        .fetch_all(&mut *tx)
                                        .await?
                                }
                            },
                            ReadSelector::TypeInSubscription {
                                type_key,
                                subscription_key,
                            } => {
                                let sql = format!(
                                    "SELECT {COLUMNS} FROM resources \
                                     WHERE type_key = $1 AND subscription_key = $2"
                                );
                                sqlx::query(sqlx::AssertSqlSafe(sql))
                                    .bind(type_key)
                                    .bind(subscription_key)
                                    .fetch_all(&mut *tx)
                                    .await?
                            }
                        };
                        for row in &found {
                            let res = row_to_resource(row)?;
                            rows.insert(res.id_key.clone(), res);
                        }
                    }
                    tx.commit().await?;
                    Ok(rows.into_values().collect())
                })
            }
        }
    };
}

macro_rules! insert_operation {
    ($conn:expr, $op:expr) => {{
        let op: &OperationRecord = $op;
        sqlx::query(
            "INSERT INTO operations (id, subscription_key, resource_group_key, resource_id, kind, \
             status, start_time, end_time, error) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&op.id)
        .bind(&op.subscription_key)
        .bind(&op.resource_group_key)
        .bind(&op.resource_id)
        .bind(&op.kind)
        .bind(&op.status)
        .bind(op.start_time)
        .bind(op.end_time)
        .bind(op.error.as_ref().map(|e| e.to_string()))
        .execute($conn)
        .await?;
    }};
}

/// The embedded default store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating) the database file at `path` and runs the migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(std::time::Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        sqlx::migrate!("../migrations/sqlite").run(&pool).await?;
        Ok(Self { pool })
    }

    /// Opens a `sqlite:` URL naming a file (`sqlite::memory:` would give each pooled connection
    /// its own empty database).
    pub async fn open_url(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(std::time::Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new().connect_with(options).await?;
        sqlx::migrate!("../migrations/sqlite").run(&pool).await?;
        Ok(Self { pool })
    }
}

impl_store!(SqliteStore, "BEGIN IMMEDIATE", "BEGIN");

/// The production store.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to `url` and runs the migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect(url)
            .await?;
        sqlx::migrate!("../migrations/postgres").run(&pool).await?;
        Ok(Self { pool })
    }
}

impl_store!(
    PostgresStore,
    "BEGIN",
    "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
);
