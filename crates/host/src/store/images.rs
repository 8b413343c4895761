//! The image library's rows: one per image, added and removed with a ledger row in the same
//! transaction.

use rusqlite::params;

use super::{sql, Result, Store};
use crate::ledger::NewEvent;
use crate::time::now_ms;

/// The schema of the library (migration 6).
pub const SCHEMA: &str = "CREATE TABLE images (
    name TEXT PRIMARY KEY,
    format TEXT NOT NULL,
    file TEXT NOT NULL,
    virtual_size INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    source TEXT NOT NULL
 );";

/// An image as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRow {
    pub name: String,
    /// `raw` or `qcow2`.
    pub format: String,
    /// Its file's absolute path.
    pub file: String,
    pub virtual_size: u64,
    pub created_ms: i64,
    pub source: String,
}

impl Store {
    pub fn images(&self) -> Result<Vec<ImageRow>> {
        self.select_images("ORDER BY name", None)
    }

    pub fn image(&self, name: &str) -> Result<Option<ImageRow>> {
        Ok(self.select_images("WHERE name = ?1", Some(name))?.pop())
    }

    /// The image rows `clause` picks (with `name` as its one parameter, if any).
    fn select_images(&self, clause: &str, name: Option<&str>) -> Result<Vec<ImageRow>> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT name, format, file, virtual_size, created_ms, source FROM images {clause}"
            ))
            .map_err(sql("listing images"))?;
        let params: Vec<&dyn rusqlite::ToSql> =
            name.iter().map(|n| n as &dyn rusqlite::ToSql).collect();
        let rows = stmt
            .query_map(params.as_slice(), |r| {
                Ok(ImageRow {
                    name: r.get(0)?,
                    format: r.get(1)?,
                    file: r.get(2)?,
                    virtual_size: r.get::<_, i64>(3)? as u64,
                    created_ms: r.get(4)?,
                    source: r.get(5)?,
                })
            })
            .map_err(sql("listing images"))?;
        rows.collect::<std::result::Result<Vec<_>, _>>()
            .map_err(sql("reading an image row"))
    }

    /// Adds `image`, recording `event` with it.
    pub fn add_image(&mut self, image: &ImageRow, event: &NewEvent) -> Result<()> {
        let tx = self
            .conn
            .transaction()
            .map_err(sql("starting a transaction"))?;
        tx.execute(
            "INSERT INTO images (name, format, file, virtual_size, created_ms, source) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                image.name,
                image.format,
                image.file,
                image.virtual_size as i64,
                image.created_ms,
                image.source
            ],
        )
        .map_err(sql(format!("adding image {}", image.name)))?;
        let recorded = self.chain.append(&tx, event, now_ms())?;
        tx.commit().map_err(sql("committing an image"))?;
        self.chain.committed(&recorded);
        Ok(())
    }

    /// Removes image `name`, recording `event` with it; false when there was none.
    pub fn remove_image(&mut self, name: &str, event: &NewEvent) -> Result<bool> {
        let tx = self
            .conn
            .transaction()
            .map_err(sql("starting a transaction"))?;
        let n = tx
            .execute("DELETE FROM images WHERE name = ?1", [name])
            .map_err(sql(format!("removing image {name}")))?;
        if n == 0 {
            return Ok(false);
        }
        let recorded = self.chain.append(&tx, event, now_ms())?;
        tx.commit().map_err(sql("committing an image's removal"))?;
        self.chain.committed(&recorded);
        Ok(true)
    }
}
