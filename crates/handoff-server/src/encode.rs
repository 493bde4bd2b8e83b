//! Turning read chunks into FlightData, and FlightData into gRPC frames without copying bodies.

use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_flight::FlightData;
use arrow_ipc::writer::{DictionaryTracker, IpcDataGenerator, IpcWriteContext, IpcWriteOptions};
use bytes::{BufMut, Bytes, BytesMut};
use handoff_store::{Chunk, Held};
use tonic::Status;

/// Encodes chunks of one read stream. Stored frames pass through untouched; cut or gathered
/// batches are IPC-encoded, split so that no message exceeds `max_flight_data_size` by much.
pub struct ChunkEncoder {
    max_flight_data_size: usize,
    generator: IpcDataGenerator,
    tracker: DictionaryTracker,
    options: IpcWriteOptions,
    context: IpcWriteContext,
}

impl ChunkEncoder {
    pub fn new(max_flight_data_size: usize) -> Self {
        Self {
            max_flight_data_size,
            generator: IpcDataGenerator::default(),
            tracker: DictionaryTracker::new(false),
            options: IpcWriteOptions::default(),
            context: IpcWriteContext::default(),
        }
    }

    /// Encode `chunk` into `out`; returns the memory the chunk held, for the caller to keep
    /// until `out` is sent.
    pub fn encode(&mut self, chunk: Chunk, out: &mut Vec<FlightData>) -> Result<Held, Status> {
        let mut kept = Held::default();
        match chunk {
            Chunk::Schema(schema) => out.push(FlightData {
                data_header: schema.header,
                ..Default::default()
            }),
            Chunk::Frame(frame) => out.push(FlightData {
                data_header: frame.header,
                data_body: frame.body,
                ..Default::default()
            }),
            Chunk::Batch(batch, held) => {
                kept = held;
                self.encode_batch(&batch, out)?;
            }
        }
        Ok(kept)
    }

    /// One message for the batch, or as many as keep each near `max_flight_data_size`. The
    /// size is the rows' own ([`rows_bytes`]), known before encoding, so each row is encoded
    /// once.
    fn encode_batch(
        &mut self,
        batch: &RecordBatch,
        out: &mut Vec<FlightData>,
    ) -> Result<(), Status> {
        let rows = batch.num_rows();
        let size = batch_bytes(batch);
        if size <= self.max_flight_data_size || rows <= 1 {
            out.push(self.encode_one(batch)?);
            return Ok(());
        }
        let pieces = size.div_ceil(self.max_flight_data_size).min(rows);
        let per = rows.div_ceil(pieces);
        for start in (0..rows).step_by(per) {
            let piece = batch.slice(start, per.min(rows - start));
            out.push(self.encode_one(&piece)?);
        }
        Ok(())
    }

    fn encode_one(&mut self, batch: &RecordBatch) -> Result<FlightData, Status> {
        let (_dictionaries, encoded) = self
            .generator
            .encode(batch, &mut self.tracker, &self.options, &mut self.context)
            .map_err(|e| Status::internal(format!("encoding a batch failed: {e}")))?;
        Ok(FlightData {
            data_header: Bytes::from(encoded.ipc_message),
            data_body: Bytes::from(encoded.arrow_data),
            ..Default::default()
        })
    }
}

/// Bytes the rows of `batch` hold, about what IPC encoding writes for them ([`rows_bytes`]).
pub(crate) fn batch_bytes(batch: &RecordBatch) -> usize {
    batch
        .columns()
        .iter()
        .fold(0usize, |sum, column| sum.saturating_add(rows_bytes(column)))
}

/// Bytes the rows of `array` hold, about what IPC encoding writes for them. Not the in-memory
/// size: a batch cut from a large stored frame shares that frame's buffers, and a list column
/// its whole child array, so those sizes would split a batch of `batch_rows` into several
/// messages, which clients read as several short batches.
fn rows_bytes(array: &ArrayRef) -> usize {
    use arrow_array::cast::AsArray;
    use arrow_schema::DataType;
    let len = array.len();
    let nulls = array
        .nulls()
        .map_or(0, |n| n.buffer().len().min(len.div_ceil(8)));
    match array.data_type() {
        DataType::List(_) => {
            let list = array.as_list::<i32>();
            nulls.saturating_add(spanned_bytes(list.value_offsets(), list.values()))
        }
        DataType::LargeList(_) => {
            let list = array.as_list::<i64>();
            nulls.saturating_add(spanned_bytes(list.value_offsets(), list.values()))
        }
        DataType::FixedSizeList(_, size) => {
            let list = array.as_fixed_size_list();
            let size = (*size).max(0) as usize;
            let start = list.value_offset(0).max(0) as usize;
            nulls.saturating_add(rows_bytes(
                &list.values().slice(start, len.saturating_mul(size)),
            ))
        }
        DataType::Map(..) => {
            let map = array.as_map();
            let entries: ArrayRef = std::sync::Arc::new(map.entries().clone());
            nulls.saturating_add(spanned_bytes(map.value_offsets(), &entries))
        }
        // A struct's children are sliced with it.
        DataType::Struct(_) => array
            .as_struct()
            .columns()
            .iter()
            .fold(nulls, |sum, child| sum.saturating_add(rows_bytes(child))),
        _ => array
            .to_data()
            .get_slice_memory_size()
            .unwrap_or_else(|_| array.get_array_memory_size()),
    }
}

/// Bytes of a list-like array's offsets and of the child rows they span (a sliced list's child
/// is not sliced with it).
fn spanned_bytes<O: arrow_array::OffsetSizeTrait>(offsets: &[O], child: &ArrayRef) -> usize {
    let (Some(first), Some(last)) = (offsets.first(), offsets.last()) else {
        return 0;
    };
    let (start, end) = (first.as_usize(), last.as_usize());
    let values = child.slice(start, end.saturating_sub(start));
    std::mem::size_of_val(offsets).saturating_add(rows_bytes(&values))
}

/// The gRPC length-prefixed frame of one FlightData, as a small prefix plus the untouched body.
///
/// Only `data_header` (field 2) and `data_body` (field 1000) are written; prost writes fields in
/// number order, so this is byte-identical to `FlightData::encode` for such messages.
pub fn grpc_frame(data: &FlightData) -> (Bytes, Bytes) {
    let header = &data.data_header;
    let body = &data.data_body;
    let mut message_len = 0usize;
    if !header.is_empty() {
        message_len += 1 + varint_len(header.len() as u64) + header.len();
    }
    if !body.is_empty() {
        message_len += 2 + varint_len(body.len() as u64) + body.len();
    }
    let mut prefix = BytesMut::with_capacity(5 + 16 + header.len());
    prefix.put_u8(0); // not compressed
    prefix.put_u32(message_len as u32);
    if !header.is_empty() {
        prefix.put_u8(0x12); // field 2, length-delimited
        put_varint(&mut prefix, header.len() as u64);
        prefix.put_slice(header);
    }
    if !body.is_empty() {
        prefix.put_slice(&[0xC2, 0x3E]); // field 1000, length-delimited
        put_varint(&mut prefix, body.len() as u64);
    }
    (prefix.freeze(), body.clone())
}

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn put_varint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn a_batch_cut_from_a_large_frame_is_one_message() {
        use arrow_array::{ArrayRef, Float32Array, Int64Array};
        use std::sync::Arc;
        let rows = 1 << 20;
        let ids: ArrayRef = Arc::new(Int64Array::from_iter_values(0..rows as i64));
        let xs: ArrayRef = Arc::new(Float32Array::from_iter_values((0..rows).map(|i| i as f32)));
        // As Spark sends an embedding: a list column, whose slices share the whole child array.
        let values = Float32Array::from_iter_values((0..rows * 4).map(|i| i as f32));
        let offsets = arrow_buffer::OffsetBuffer::from_lengths(std::iter::repeat_n(4, rows));
        let field = Arc::new(arrow_schema::Field::new(
            "item",
            arrow_schema::DataType::Float32,
            false,
        ));
        let emb: ArrayRef = Arc::new(arrow_array::ListArray::new(
            field,
            offsets,
            Arc::new(values),
            None,
        ));
        let frame =
            RecordBatch::try_from_iter([("id", ids), ("x", xs), ("emb", emb)]).expect("batch");
        let cut = frame.slice(5000, 1024);
        assert!(
            cut.get_array_memory_size() > 8 << 20,
            "the frame's buffers are large"
        );
        let mut encoder = ChunkEncoder::new(8 << 20);
        let mut out = Vec::new();
        encoder.encode_batch(&cut, &mut out).expect("encode");
        assert_eq!(out.len(), 1, "one batch, one message");
        // A batch that is itself large is still split, into pieces that cover it.
        let mut encoder = ChunkEncoder::new(1 << 20);
        let mut out = Vec::new();
        encoder.encode_batch(&frame, &mut out).expect("encode");
        assert!(out.len() >= 12, "{}", out.len());
        let decoded: usize = out.iter().map(|data| data.data_body.len()).sum();
        assert!(decoded >= rows * 32, "the pieces carry every row");
    }

    #[test]
    fn grpc_frame_matches_prost() {
        for (h, b) in [(10usize, 0usize), (3, 200), (300, 70_000), (0, 5)] {
            let data = FlightData {
                data_header: Bytes::from(vec![7u8; h]),
                data_body: Bytes::from(vec![9u8; b]),
                ..Default::default()
            };
            let (prefix, body) = grpc_frame(&data);
            let mut framed = prefix.to_vec();
            framed.extend_from_slice(&body);
            let expected = data.encode_to_vec();
            assert_eq!(&framed[5..], &expected[..]);
            assert_eq!(
                u32::from_be_bytes([framed[1], framed[2], framed[3], framed[4]]) as usize,
                expected.len()
            );
        }
    }
}
