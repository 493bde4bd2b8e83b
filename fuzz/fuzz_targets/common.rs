//! What the targets share: a runtime, the link schema, and how raw bytes become frames.

#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use arrow_schema::{DataType, Field, Schema, SchemaRef};
use bytes::Bytes;

/// One current-thread runtime per process: the store's reads spawn tasks.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

/// Panics the code under test catches on purpose (arrow's decoders on hostile bytes, turned into
/// INVALID_ARGUMENT by `guard_panic`) should not print; libFuzzer still sees every panic that
/// escapes, because libfuzzer-sys aborts on those. `HANDOFF_FUZZ_PANICS=1` prints them all, to
/// see what a crashing input hit.
pub fn quiet_caught_panics() {
    if std::env::var_os("HANDOFF_FUZZ_PANICS").is_none() {
        std::panic::set_hook(Box::new(|_| {}));
    }
}

/// Every kind of column the store validates: fixed width, nullable, variable width, nested,
/// bit-packed and Null.
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("x", DataType::Float32, true),
        Field::new("name", DataType::Utf8, true),
        Field::new(
            "emb",
            DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float32, true)), 4),
            true,
        ),
        Field::new(
            "tags",
            DataType::List(Arc::new(Field::new("item", DataType::Int32, true))),
            true,
        ),
        Field::new("flag", DataType::Boolean, true),
        Field::new("nothing", DataType::Null, true),
    ]))
}

/// Splits `data` into (header, body) messages: each is a little-endian u32 header length, a u32
/// body length, then the bytes (lengths are cut to what is left). The seeds are written this way
/// by `fuzz/seeds.py`.
pub fn messages(mut data: &[u8]) -> Vec<(Bytes, Bytes)> {
    let mut out = Vec::new();
    while data.len() >= 8 {
        let header_len = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let body_len = u32::from_le_bytes([data[4], data[5], data[6], data[7]]) as usize;
        data = &data[8..];
        let header_len = header_len.min(data.len());
        let (header, rest) = data.split_at(header_len);
        let body_len = body_len.min(rest.len());
        let (body, rest) = rest.split_at(body_len);
        out.push((Bytes::copy_from_slice(header), Bytes::copy_from_slice(body)));
        data = rest;
    }
    out
}

/// How long a target waits for a stream's next message before it stops reading: a streaming
/// read, or one of an unsealed link, waits for rows that never come.
pub const SETTLE: std::time::Duration = std::time::Duration::from_millis(50);
