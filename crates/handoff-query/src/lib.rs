//! DataFusion over Handoff links: read-time projection and filters, each link as a table, and
//! SQL sessions over them.

pub mod filter;
pub mod import;
pub mod limits;
pub mod memory;
pub mod table;

use std::sync::Arc;

use datafusion::error::Result;
use datafusion::prelude::{SessionConfig, SessionContext};

pub use filter::{QueryError, plan_read, planner};
pub use import::{
    ImportError, ImportOutcome, Owns, ParquetListing, StagedImport, import_parquet, list_parquet,
    stage_parquet,
};
pub use table::{LinkTable, RemotePart};

/// A DataFusion session in which each given link is a table named after it, in `catalog.schema`
/// (also the defaults, so bare names work).
/// Its operators reserve memory from `memory`, the server's pool.
pub fn session(
    tables: Vec<LinkTable>,
    catalog: &str,
    schema: &str,
    memory: Arc<handoff_store::MemoryPool>,
) -> Result<SessionContext> {
    let config = SessionConfig::new()
        .with_default_catalog_and_schema(catalog, schema)
        .with_information_schema(true);
    let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(memory::SharedPool::new(memory)))
        .build_arc()?;
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    for table in tables {
        let name = datafusion::common::TableReference::full(catalog, schema, table.name());
        ctx.register_table(name, Arc::new(table))?;
    }
    Ok(ctx)
}
