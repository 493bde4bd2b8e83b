//! DataFusion over Handoff links: read-time projection and filters, each link as a table, and
//! SQL sessions over them.

pub mod filter;
pub mod import;
pub mod limits;
pub mod table;

use std::sync::Arc;

use datafusion::error::Result;
use datafusion::prelude::{SessionConfig, SessionContext};

pub use filter::{QueryError, plan_read, planner};
pub use import::{ImportError, ImportOutcome, import_parquet};
pub use table::LinkTable;

/// A DataFusion session in which each given link is a table named after it, in `catalog.schema`
/// (also the defaults, so bare names work).
pub fn session(tables: Vec<LinkTable>, catalog: &str, schema: &str) -> Result<SessionContext> {
    let config = SessionConfig::new()
        .with_default_catalog_and_schema(catalog, schema)
        .with_information_schema(true);
    let ctx = SessionContext::new_with_config(config);
    for table in tables {
        let name = datafusion::common::TableReference::full(catalog, schema, table.name());
        ctx.register_table(name, Arc::new(table))?;
    }
    Ok(ctx)
}
