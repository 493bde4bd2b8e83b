//! Turning read chunks into FlightData, and FlightData into gRPC frames without copying bodies.

use arrow_array::RecordBatch;
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
                for piece in split(&batch, self.max_flight_data_size) {
                    let (_dictionaries, encoded) = self
                        .generator
                        .encode(&piece, &mut self.tracker, &self.options, &mut self.context)
                        .map_err(|e| Status::internal(format!("encoding a batch failed: {e}")))?;
                    out.push(FlightData {
                        data_header: Bytes::from(encoded.ipc_message),
                        data_body: Bytes::from(encoded.arrow_data),
                        ..Default::default()
                    });
                }
            }
        }
        Ok(kept)
    }
}

/// Slices a batch into row ranges of about `max_bytes` each.
fn split(batch: &RecordBatch, max_bytes: usize) -> Vec<RecordBatch> {
    let size = batch.get_array_memory_size();
    let rows = batch.num_rows();
    if size <= max_bytes || rows <= 1 {
        return vec![batch.clone()];
    }
    let pieces = size.div_ceil(max_bytes).min(rows);
    let per = rows.div_ceil(pieces);
    (0..rows)
        .step_by(per)
        .map(|start| batch.slice(start, per.min(rows - start)))
        .collect()
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
