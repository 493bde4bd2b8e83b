//! Filters and projections: any text a reader sends as `filter` (and any column list) is refused
//! with a sentence, or plans and evaluates. Planning runs on an 8 MiB stack, what the server's
//! workers have: the size and depth limits must keep every accepted filter inside it. This build
//! leaves DataFusion and the SQL parser unoptimised, with stack frames several times those of
//! the shipped one (40 nested `NOT`s took 2 MiB here), so that is the margin; the unit test
//! `every_deep_shape_the_limits_allow_runs_on_a_small_stack` checks 2 MiB at the tests' opt-level.
//!
//! A stack overflow kills the process before libFuzzer can save the input (its handler runs on
//! the overflowed stack): a run that dies with SIGSEGV and no artifact is most likely one.

#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::Arc;

use arrow_array::builder::{FixedSizeListBuilder, Float32Builder, Int32Builder, ListBuilder};
use arrow_array::{
    ArrayRef, BooleanArray, Float32Array, Int64Array, NullArray, RecordBatch, StringArray,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: common::quiet_caught_panics(),
    |data: &[u8]| filter(data)
);

const STACK: usize = 8 << 20;

fn batch() -> RecordBatch {
    let rows = 8;
    let mut emb = FixedSizeListBuilder::new(Float32Builder::new(), 4);
    let mut tags = ListBuilder::new(Int32Builder::new());
    for i in 0..rows {
        for k in 0..4 {
            emb.values().append_value((i * 4 + k) as f32);
        }
        emb.append(i % 3 != 0);
        tags.values().append_value(i as i32);
        tags.append(i % 2 == 0);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(0..rows as i64)),
        Arc::new(Float32Array::from_iter(
            (0..rows).map(|i| (i % 4 != 0).then_some(i as f32 / 2.0)),
        )),
        Arc::new(StringArray::from_iter(
            (0..rows).map(|i| (i % 5 != 0).then(|| format!("n{i}"))),
        )),
        Arc::new(emb.finish()),
        Arc::new(tags.finish()),
        Arc::new(BooleanArray::from_iter(
            (0..rows).map(|i| (i % 3 != 1).then_some(i % 2 == 0)),
        )),
        Arc::new(NullArray::new(rows)),
    ];
    RecordBatch::try_new(common::schema(), columns).expect("batch")
}

fn filter(data: &[u8]) {
    // First byte: which columns to project (bit i: column i); the rest is the filter text.
    let Some((&mask, text)) = data.split_first() else {
        return;
    };
    let schema = common::schema();
    let columns: Vec<String> = schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, f)| f.name().clone())
        .collect();
    let text = String::from_utf8_lossy(text).into_owned();
    let worker = std::thread::Builder::new()
        .stack_size(STACK)
        .spawn(move || {
            let query = match handoff_query::plan_read(&schema, &columns, &text) {
                Ok(query) => query,
                Err(e) => {
                    let message = e.to_string();
                    assert!(!message.is_empty());
                    assert!(message.len() < 2048, "{} bytes echoed", message.len());
                    return;
                }
            };
            if let Some(filter) = &query.filter {
                let batch = batch();
                let input = batch
                    .project(filter.columns())
                    .expect("the filter's columns");
                if let Ok(mask) = filter.evaluate(&input) {
                    assert_eq!(mask.len(), batch.num_rows());
                }
            }
        });
    worker
        .expect("a thread")
        .join()
        .expect("no panic while planning or evaluating");
}
