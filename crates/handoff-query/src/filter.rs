//! Read-time projection and filters: a reader's column names and SQL predicate, planned by
//! DataFusion against the link's schema. The predicate is parsed as an expression, never spliced
//! into a statement.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow_array::{Array, BooleanArray, RecordBatch};
use arrow_schema::{DataType, SchemaRef};
use datafusion::common::DFSchema;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::SessionContext;
use handoff_store::{QueryPlanner, ReadQuery, RowFilter};

use handoff_store::echo;

use crate::limits::{MAX_FILTER_BYTES, check_expression};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueryError {
    #[error("{0}")]
    Invalid(String),
}

/// A filter planned by DataFusion, evaluated on the columns it reads.
struct PlannedFilter {
    columns: Vec<usize>,
    expr: Arc<dyn PhysicalExpr>,
    sql: String,
}

impl RowFilter for PlannedFilter {
    fn columns(&self) -> &[usize] {
        &self.columns
    }

    fn evaluate(&self, batch: &RecordBatch) -> Result<BooleanArray, String> {
        let value = self.expr.evaluate(batch).map_err(|e| e.to_string())?;
        let array = value
            .into_array(batch.num_rows())
            .map_err(|e| e.to_string())?;
        array
            .as_any()
            .downcast_ref::<BooleanArray>()
            .cloned()
            .ok_or_else(|| format!("the filter gave {} values, not booleans", array.data_type()))
    }

    fn key(&self) -> &str {
        &self.sql
    }
}

fn column_index(schema: &SchemaRef, name: &str) -> Result<usize, QueryError> {
    schema.index_of(name).map_err(|_| {
        let known: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        QueryError::Invalid(format!(
            "the link has no column '{}'; its columns are {}",
            echo(name),
            known.join(", ")
        ))
    })
}

/// Plan `columns` (empty: all) and `filter` (empty: none) against the link's schema.
pub fn plan_read(
    schema: &SchemaRef,
    columns: &[String],
    filter: &str,
) -> Result<ReadQuery, QueryError> {
    let projection = if columns.is_empty() {
        None
    } else {
        let mut seen = BTreeSet::new();
        let mut indices = Vec::with_capacity(columns.len());
        for name in columns {
            let index = column_index(schema, name)?;
            if !seen.insert(index) {
                return Err(QueryError::Invalid(format!(
                    "column '{}' is asked for twice",
                    echo(name)
                )));
            }
            indices.push(index);
        }
        Some(indices)
    };
    let filter = filter.trim();
    let filter: Option<Arc<dyn RowFilter>> = if filter.is_empty() {
        None
    } else {
        Some(Arc::new(plan_filter(schema, filter)?))
    };
    Ok(ReadQuery { projection, filter })
}

fn plan_filter(schema: &SchemaRef, sql: &str) -> Result<PlannedFilter, QueryError> {
    check_expression("filter", sql, MAX_FILTER_BYTES)?;
    let invalid = |e: datafusion::error::DataFusionError| {
        QueryError::Invalid(format!(
            "filter '{}': {}",
            echo(sql),
            crate::limits::brief(&e.strip_backtrace())
        ))
    };
    let ctx = SessionContext::new();
    let whole = DFSchema::try_from(schema.as_ref().clone()).map_err(invalid)?;
    let expr = ctx.parse_sql_expr(sql, &whole).map_err(invalid)?;
    // Every rank evaluates the filter and all must agree on the rows, or shards would overlap.
    if expr.is_volatile() {
        return Err(QueryError::Invalid(format!(
            "filter '{}' calls a function whose result changes between calls (such as random()), so ranks would disagree on the rows; sample deterministically instead, e.g. id % 10 = 0",
            echo(sql)
        )));
    }
    // Evaluate on the referenced columns only, so the others are never decoded.
    let mut columns: Vec<usize> = Vec::new();
    for column in expr.column_refs() {
        let index = column_index(schema, &column.name)?;
        if !columns.contains(&index) {
            columns.push(index);
        }
    }
    columns.sort_unstable();
    let narrow = Arc::new(
        schema
            .project(&columns)
            .map_err(|e| QueryError::Invalid(e.to_string()))?,
    );
    let narrow_df = DFSchema::try_from(narrow.as_ref().clone()).map_err(invalid)?;
    let expr = ctx.parse_sql_expr(sql, &narrow_df).map_err(invalid)?;
    let physical = ctx
        .create_physical_expr(expr, &narrow_df)
        .map_err(invalid)?;
    let kind = physical.data_type(&narrow).map_err(invalid)?;
    if kind != DataType::Boolean {
        return Err(QueryError::Invalid(format!(
            "filter '{}' gives {kind} values; it must be a true/false condition, e.g. split = 'train'",
            echo(sql)
        )));
    }
    Ok(PlannedFilter {
        columns,
        expr: physical,
        sql: sql.to_string(),
    })
}

/// A planner for the store, which calls it once the link's schema is known.
pub fn planner(columns: Vec<String>, filter: String) -> QueryPlanner {
    Arc::new(move |schema: &SchemaRef| {
        plan_read(schema, &columns, &filter).map_err(|e| e.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Float64Array, Int64Array, StringArray};
    use arrow_schema::{Field, Schema};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("split", DataType::Utf8, true),
            Field::new("score", DataType::Float64, true),
        ]))
    }

    #[test]
    fn filters_read_only_their_columns_and_treat_null_as_not_passing() {
        let query =
            plan_read(&schema(), &["score".into(), "id".into()], "split = 'train'").expect("plans");
        assert_eq!(query.projection, Some(vec![2, 0]));
        let filter = query.filter.expect("filter");
        assert_eq!(filter.columns(), &[1]);
        let narrow = Arc::new(schema().project(&[1]).expect("project"));
        let batch = RecordBatch::try_new(
            narrow,
            vec![Arc::new(StringArray::from(vec![
                Some("train"),
                None,
                Some("test"),
            ]))],
        )
        .expect("batch");
        let passed = filter.evaluate(&batch).expect("evaluates");
        let passed = arrow_select_free_true_count(&passed);
        assert_eq!(passed, 1);

        let two = plan_read(&schema(), &[], "score > 0.5 AND id % 2 = 0").expect("plans");
        assert_eq!(two.filter.expect("filter").columns(), &[0, 2]);
        let _ = (Int64Array::from(vec![1]), Float64Array::from(vec![1.0]));
    }

    /// The deepest tree the limits allow (every operator one level: 255 `+` and a `>`) plans
    /// and evaluates on a 2 MiB stack, a quarter of what the server's workers get.
    #[test]
    fn the_deepest_allowed_filter_runs_on_a_small_stack() {
        let sql = format!("id{} > 0", " + 1".repeat(255));
        crate::limits::check_expression("filter", &sql, crate::limits::MAX_FILTER_BYTES)
            .expect("at the limit");
        let worker = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let query = plan_read(&schema(), &[], &sql).expect("plans");
                let filter = query.filter.expect("filter");
                let narrow = Arc::new(schema().project(&[0]).expect("project"));
                let ids = Int64Array::from(vec![-300, -255, 0]);
                let batch = RecordBatch::try_new(narrow, vec![Arc::new(ids)]).expect("batch");
                let passed = filter.evaluate(&batch).expect("evaluates");
                arrow_select_free_true_count(&passed)
            })
            .expect("spawn");
        assert_eq!(worker.join().expect("no overflow"), 1);
        let err = plan_read(&schema(), &[], &format!("id{} > 0", " + 1".repeat(300)))
            .expect_err("past the limit");
        assert!(err.to_string().contains("operators"), "{err}");
    }

    /// Every shape that chains or nests, made as deep as the limits let it: each plans (or is
    /// refused with a sentence) and evaluates on a 2 MiB stack. Shapes the tokenizer's count
    /// let through unbounded once (`IN`, `AT TIME ZONE`) are among them.
    #[test]
    fn every_deep_shape_the_limits_allow_runs_on_a_small_stack() {
        use crate::limits::{MAX_FILTER_BYTES, MAX_NESTING, MAX_OPERATORS, check_expression};
        // The deepest `shape(n)` that the limits accept.
        let deepest_of = |shape: &dyn Fn(usize) -> String| {
            (0..=MAX_OPERATORS)
                .rev()
                .map(shape)
                .find(|text| check_expression("filter", text, MAX_FILTER_BYTES).is_ok())
                .expect("a shape the limits accept")
        };
        // The most copies of `unit` after `head` (and before `tail`).
        let deepest = |head: &str, unit: &str, tail: &str| {
            deepest_of(&|n| format!("{head}{}{tail}", unit.repeat(n)))
        };
        let nested = format!(
            "{}id{} > 0",
            "(".repeat(MAX_NESTING),
            " + 1)".repeat(MAX_NESTING)
        );
        let shapes = [
            deepest("id", " IN (1)", ""),
            deepest("id", " + 1", " > 0"),
            deepest("", "NOT ", "id = 1"),
            deepest("", "- ", "id > 0"),
            deepest("score", " AT TIME ZONE 'UTC'", " IS NULL"),
            deepest("id", "::BIGINT", " > 0"),
            deepest("id IS NULL", " IS NULL", ""),
            deepest_of(&|n| {
                format!(
                    "{}TRUE{}",
                    "CASE WHEN id > 0 THEN ".repeat(n),
                    " END".repeat(n)
                )
            }),
            deepest("split", " || 'x'", " = 'x'"),
            nested,
        ];
        for sql in shapes {
            let shown = sql.chars().take(60).collect::<String>();
            let worker = std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(move || {
                    let batch = RecordBatch::try_new(
                        schema(),
                        vec![
                            Arc::new(Int64Array::from(vec![-1, 0, 1])),
                            Arc::new(StringArray::from(vec![Some("a"), None, Some("x")])),
                            Arc::new(Float64Array::from(vec![Some(0.5), None, Some(1.0)])),
                        ],
                    )
                    .expect("batch");
                    match plan_read(&schema(), &[], &sql) {
                        Ok(query) => {
                            let filter = query.filter.expect("filter");
                            let input = batch.project(filter.columns()).expect("columns");
                            filter.evaluate(&input).map(|mask| mask.len()).ok()
                        }
                        Err(e) => {
                            assert!(e.to_string().starts_with("filter '"), "{e}");
                            None
                        }
                    }
                })
                .expect("spawn");
            let evaluated = worker.join().expect("no overflow");
            assert!(evaluated.is_none_or(|rows| rows == 3), "{shown}…");
        }
    }

    fn arrow_select_free_true_count(a: &BooleanArray) -> usize {
        (0..a.len())
            .filter(|&i| a.is_valid(i) && a.value(i))
            .count()
    }

    #[test]
    fn bad_columns_and_filters_say_what_to_do() {
        let err = |columns: &[&str], filter: &str| {
            let columns: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
            plan_read(&schema(), &columns, filter)
                .expect_err("refused")
                .to_string()
        };
        assert!(err(&["nope"], "").contains("its columns are id, split, score"));
        assert!(err(&["id", "id"], "").contains("asked for twice"));
        assert!(err(&[], "wat = 1").contains("wat"));
        assert!(err(&[], "score + 1").contains("true/false condition"));
        assert!(err(&[], "id = 1; DROP TABLE x").contains("filter"));
        assert!(err(&[], "split = ").contains("filter"));
        assert!(err(&[], "random() < 0.5").contains("deterministically"));
    }
}
