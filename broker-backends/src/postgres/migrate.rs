//! Versioned migrations, applied at connect.
//!
//! Each component (the Celery result tables, django-celery-results' table, our own chord and
//! idempotency tables; later a broker's) has a list of [`Migration`]s numbered from 1. The
//! versions applied are rows of `celery_rs_schema_version (component, version, name,
//! applied_at)`. [`migrate`] applies the missing ones in order, in one transaction that holds a
//! transaction-level advisory lock for the current schema first, so two processes connecting at
//! once never run the same migration twice: the second waits, then finds it applied.
//!
//! Migrations are written to leave alone what is already there (`CREATE ... IF NOT EXISTS`), so a
//! table that Python Celery created first is adopted as it is.

use deadpool_postgres::Object;

use super::error::PgError;

/// One schema change.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Its number within its component, from 1, in order.
    pub version: i32,
    /// What it does, recorded beside the version.
    pub name: &'static str,
    /// The statements (one `batch_execute`).
    pub sql: &'static str,
}

/// The version table and the lock that orders migrations per schema.
const PREPARE: &str = "
SELECT pg_advisory_xact_lock(hashtext('celery_rs_migrate'), hashtext(coalesce(current_schema(), '')));
CREATE TABLE IF NOT EXISTS celery_rs_schema_version (
    component varchar(64) NOT NULL,
    version integer NOT NULL,
    name text NOT NULL,
    applied_at timestamp with time zone NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
);";

/// Applies `component`'s migrations that are not applied yet; returns its version after.
pub async fn migrate(client: &mut Object, component: &str, migrations: &[Migration]) -> Result<i32, PgError> {
    let tx = client.transaction().await.map_err(PgError::at("migrate"))?;
    tx.batch_execute(PREPARE).await.map_err(PgError::at("migrate"))?;
    let row = tx
        .query_one("SELECT coalesce(max(version), 0) FROM celery_rs_schema_version WHERE component = $1", &[&component])
        .await
        .map_err(PgError::at("migrate"))?;
    let current: i32 = row.get(0);
    let mut version = current;
    for m in migrations.iter().filter(|m| m.version > current) {
        if m.version != version + 1 {
            return Err(PgError::operation(format!(
                "migration {component} {} follows {version}: the list has a gap",
                m.version
            )));
        }
        tracing::info!(component, version = m.version, name = m.name, "postgresql: applying migration");
        tx.batch_execute(m.sql)
            .await
            .map_err(|e| PgError::driver(&format!("migration {component} {} ({})", m.version, m.name), e))?;
        tx.execute(
            "INSERT INTO celery_rs_schema_version (component, version, name) VALUES ($1, $2, $3)",
            &[&component, &m.version, &m.name],
        )
        .await
        .map_err(PgError::at("migrate"))?;
        version = m.version;
    }
    tx.commit().await.map_err(PgError::at("migrate"))?;
    Ok(version)
}
