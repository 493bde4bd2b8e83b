//! Arrow IPC frames as they arrive over Flight: validated once at ingest, stored untouched, and
//! decoded only where a read has to cut or mix rows.
//!
//! Ingest checks each message's structure against the link schema (message type, node and buffer
//! counts, buffer bounds and sizes, the last offset of variable-width columns) without touching
//! values, which keeps the per-byte ingest cost near zero. Reads that decode use arrow's full
//! validation, so a value-level corruption surfaces as an error on that read, never as a panic.

use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_buffer::Buffer;
use arrow_ipc::{Message, MessageHeader, MetadataVersion};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use bytes::Bytes;

use crate::error::{Result, StoreError};
use crate::memory::Reservation;

/// The most rows one record batch message may declare (2^26, 67,108,864): far above what
/// writers send (Spark's Arrow batches are 10,000 rows), and it keeps row counts, offsets and
/// shard positions far from any integer limit.
pub const MAX_FRAME_ROWS: u64 = 1 << 26;

/// One IPC record batch message, exactly as the client sent it.
#[derive(Debug, Clone)]
pub struct Frame {
    pub header: Bytes,
    pub body: Bytes,
    pub rows: u64,
}

impl Frame {
    pub fn bytes(&self) -> u64 {
        (self.header.len() + self.body.len()) as u64
    }

    /// The frame as the store keeps it: `memory` (the frame's reserved bytes) travels with the
    /// body and is released only when the last user of the body lets go (the partition, a
    /// reader's decoded rows, or a reply still being sent), so the accounting follows the
    /// allocation: a spill that drops a partition a reader still holds frees nothing yet.
    ///
    /// The body is kept where it arrived, without a copy: copying every frame at ingest cost
    /// DoPut 2.8x in throughput and doubled peak memory in `handoff bench`, while only reads that
    /// decode need alignment, and those reserve and share any copy they make. The header is
    /// copied: a slice of the receive buffer would pin it.
    pub fn owned(self, memory: Reservation) -> Frame {
        /// `Bytes::from_owner` wants `AsRef<[u8]>`; the reservation rides along.
        struct Owner(Bytes, #[allow(dead_code)] Reservation);
        impl AsRef<[u8]> for Owner {
            fn as_ref(&self) -> &[u8] {
                &self.0
            }
        }
        Frame {
            header: Bytes::copy_from_slice(&self.header),
            body: Bytes::from_owner(Owner(self.body, memory)),
            rows: self.rows,
        }
    }

    /// The same frame with its body copied into aligned memory that holds `memory`.
    pub(crate) fn realigned(&self, memory: Reservation) -> Frame {
        Frame {
            header: self.header.clone(),
            body: copy_aligned(&self.body, Some(memory)),
            rows: self.rows,
        }
    }

    /// Whether decoding this frame shares its memory instead of copying it.
    /// (IPC puts every buffer at a multiple of 8 from the body's start, and arrow copies a
    /// buffer only when it is not aligned to its type: 8 bytes covers all but 16-byte decimals.)
    pub fn is_aligned(&self) -> bool {
        self.body.is_empty() || (self.body.as_ptr() as usize).is_multiple_of(8)
    }

    /// Decode into a `RecordBatch`, zero-copy where the body is aligned, with full validation.
    pub fn decode(&self, schema: &SchemaRef) -> Result<RecordBatch> {
        self.decode_columns(schema, None)
    }

    /// Decode only the given columns of `schema`, in that order; the other columns' buffers are
    /// never read.
    pub fn decode_columns(
        &self,
        schema: &SchemaRef,
        projection: Option<&[usize]>,
    ) -> Result<RecordBatch> {
        let projection = projection.map(<[usize]>::to_vec);
        let header = self.header.clone();
        let body = self.body.clone();
        let schema = Arc::clone(schema);
        guard_panic(move || {
            let message = arrow_ipc::root_as_message(&header)
                .map_err(|e| StoreError::InvalidIpc(format!("bad message header: {e}")))?;
            let batch = message
                .header_as_record_batch()
                .ok_or_else(|| StoreError::InvalidIpc("frame is not a record batch".into()))?;
            let buffer = Buffer::from(body);
            arrow_ipc::reader::read_record_batch(
                &buffer,
                batch,
                schema,
                &HashMap::new(),
                projection.as_deref(),
                &message.version(),
            )
            .map_err(|e| StoreError::InvalidIpc(e.to_string()))
        })
    }
}

/// Arrow's own allocation alignment: every buffer of an IPC body sits at a multiple of 8 from
/// its start, so a body that starts here decodes without copies.
const BODY_ALIGNMENT: usize = 64;

/// `body` itself if it starts at [`BODY_ALIGNMENT`], else an aligned copy: for frames fetched
/// back from object storage, which are fresh allocations anyway.
pub(crate) fn aligned(body: Bytes) -> Bytes {
    if body.is_empty() || (body.as_ptr() as usize).is_multiple_of(BODY_ALIGNMENT) {
        return body;
    }
    copy_aligned(&body, None)
}

/// `body` in a fresh allocation at [`BODY_ALIGNMENT`], holding `memory` until it is freed.
fn copy_aligned(body: &[u8], memory: Option<Reservation>) -> Bytes {
    /// `Bytes::from_owner` wants `AsRef<[u8]>`, which arrow's `Buffer` does not implement.
    struct Owner(Buffer, #[allow(dead_code)] Option<Reservation>);
    impl AsRef<[u8]> for Owner {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }
    if body.is_empty() {
        return Bytes::new();
    }
    let mut buffer = arrow_buffer::MutableBuffer::new(body.len());
    buffer.extend_from_slice(body);
    Bytes::from_owner(Owner(buffer.into(), memory))
}

/// A link schema together with the IPC schema message that announces it on the wire.
#[derive(Debug, Clone)]
pub struct SchemaFrame {
    pub schema: SchemaRef,
    pub header: Bytes,
}

impl SchemaFrame {
    /// Parse and check a schema message from a client.
    pub fn parse(header: Bytes) -> Result<Self> {
        let parsed = guard_panic({
            let header = header.clone();
            move || {
                let message = parse_message(&header)?;
                let fb = message.header_as_schema().ok_or_else(|| {
                    StoreError::InvalidIpc(format!(
                        "expected a schema message first, got {:?}",
                        message.header_type()
                    ))
                })?;
                if fb.fields().is_none() {
                    return Err(StoreError::InvalidIpc(
                        "schema message has no fields".into(),
                    ));
                }
                Ok(arrow_ipc::convert::fb_to_schema(fb))
            }
        })?;
        check_supported(&parsed)?;
        Ok(Self {
            schema: Arc::new(parsed),
            // Its own copy: a slice would pin the whole receive buffer it came in.
            header: Bytes::copy_from_slice(&header),
        })
    }

    /// Build the wire form of a schema we hold as an Arrow `Schema`.
    pub fn from_schema(schema: SchemaRef) -> Result<Self> {
        check_supported(&schema)?;
        let options = arrow_ipc::writer::IpcWriteOptions::default();
        let mut tracker = arrow_ipc::writer::DictionaryTracker::new(false);
        let encoded = arrow_ipc::writer::IpcDataGenerator::default()
            .schema_to_bytes_with_dictionary_tracker(&schema, &mut tracker, &options);
        Ok(Self {
            schema,
            header: Bytes::from(encoded.ipc_message),
        })
    }
}

/// What one incoming message turned out to be.
#[derive(Debug)]
pub enum Incoming {
    Schema(SchemaFrame),
    Batch(Frame),
}

/// Classify and validate one message against the schema announced so far.
pub fn validate_message(
    schema: Option<&SchemaRef>,
    header: Bytes,
    body: Bytes,
) -> Result<Incoming> {
    if header.is_empty() {
        return Err(StoreError::InvalidIpc(
            "message has an empty IPC header".into(),
        ));
    }
    let message = parse_message(&header)?;
    match message.header_type() {
        MessageHeader::Schema => {
            if !body.is_empty() {
                return Err(StoreError::InvalidIpc("schema message carries a body".into()));
            }
            Ok(Incoming::Schema(SchemaFrame::parse(header)?))
        }
        MessageHeader::RecordBatch => {
            let schema = schema.ok_or_else(|| {
                StoreError::InvalidIpc("record batch before any schema message; send the schema first".into())
            })?;
            let rows = validate_batch(&message, schema, &body)?;
            Ok(Incoming::Batch(Frame { header, body, rows }))
        }
        MessageHeader::DictionaryBatch => Err(StoreError::Unsupported(
            "dictionary-encoded columns are not supported; cast them to their value type before writing".into(),
        )),
        other => Err(StoreError::InvalidIpc(format!("unexpected IPC message type {other:?}"))),
    }
}

fn parse_message(header: &[u8]) -> Result<Message<'_>> {
    let message = arrow_ipc::root_as_message(header)
        .map_err(|e| StoreError::InvalidIpc(format!("not an Arrow IPC message ({e})")))?;
    let version = message.version();
    if version < MetadataVersion::V4 {
        return Err(StoreError::Unsupported(format!(
            "IPC metadata version {version:?} is too old; use Arrow IPC V4 or V5"
        )));
    }
    // A version we do not read would be stored, then fail every plain read of the link.
    if version > MetadataVersion::V5 {
        return Err(StoreError::Unsupported(format!(
            "IPC metadata version {} is newer than this server reads; use Arrow IPC V4 or V5",
            version.0
        )));
    }
    Ok(message)
}

/// Types the store can validate structurally and replay; anything else is refused up front.
fn check_supported(schema: &Schema) -> Result<()> {
    fn check(field: &Field) -> Result<()> {
        use DataType::*;
        match field.data_type() {
            Dictionary(_, value) => Err(StoreError::Unsupported(format!(
                "column '{}' is dictionary-encoded; cast it to {value} before writing",
                field.name()
            ))),
            Union(_, _) | RunEndEncoded(_, _) | ListView(_) | LargeListView(_) => {
                Err(StoreError::Unsupported(format!(
                    "column '{}' has type {}, which Handoff does not store; cast it to a plain type",
                    field.name(),
                    field.data_type()
                )))
            }
            List(child) | LargeList(child) | FixedSizeList(child, _) | Map(child, _) => {
                check(child)
            }
            Struct(children) => children.iter().try_for_each(|c| check(c)),
            _ => Ok(()),
        }
    }
    schema.fields().iter().try_for_each(|f| check(f))
}

/// Structural checks of one record batch message; returns its row count.
fn validate_batch(message: &Message<'_>, schema: &Schema, body: &[u8]) -> Result<u64> {
    let batch = message
        .header_as_record_batch()
        .ok_or_else(|| StoreError::InvalidIpc("record batch header is missing".into()))?;
    if batch.compression().is_some() {
        return Err(StoreError::Unsupported(
            "compressed IPC bodies are not supported; write without IPC compression".into(),
        ));
    }
    let declared = message.bodyLength();
    if declared < 0 || declared as usize != body.len() {
        return Err(StoreError::InvalidIpc(format!(
            "message declares a {declared} byte body but carries {} bytes",
            body.len()
        )));
    }
    let rows = batch.length();
    if rows < 0 {
        return Err(StoreError::InvalidIpc(format!("negative row count {rows}")));
    }
    if rows as u64 > MAX_FRAME_ROWS {
        return Err(StoreError::InvalidIpc(format!(
            "a batch of {rows} rows is more than the {MAX_FRAME_ROWS} rows one message may carry; write smaller batches"
        )));
    }
    // Every stored type but Null spends at least a bit per row, so rows that the body cannot
    // hold are rows nobody sent: a zero-column or all-Null batch declaring 2^40 rows in 80 bytes
    // would otherwise cost the reads that plan over them.
    let backed = (body.len() as u64).saturating_mul(8);
    if rows as u64 > backed {
        return Err(StoreError::InvalidIpc(format!(
            "the batch declares {rows} rows but its {} byte body holds data for at most {backed}; batches need at least one column of a type other than Null",
            body.len()
        )));
    }
    let nodes = batch
        .nodes()
        .ok_or_else(|| StoreError::InvalidIpc("record batch has no field nodes".into()))?;
    let buffers = batch
        .buffers()
        .ok_or_else(|| StoreError::InvalidIpc("record batch has no buffer list".into()))?;
    let mut walker = Walker {
        nodes: nodes.iter().map(|n| (n.length(), n.null_count())).collect(),
        buffers: buffers.iter().map(|b| (b.offset(), b.length())).collect(),
        variadic: batch.variadicBufferCounts().into_iter().flatten().collect(),
        body,
    };
    for field in schema.fields() {
        let length = walker.field(field)?;
        if length != rows as usize {
            return Err(StoreError::InvalidIpc(format!(
                "column '{}' has {length} rows but the batch declares {rows}",
                field.name()
            )));
        }
    }
    if !walker.nodes.is_empty() || !walker.buffers.is_empty() {
        return Err(StoreError::InvalidIpc(format!(
            "batch has {} field nodes and {} buffers more than the link schema needs; is it for another schema?",
            walker.nodes.len(),
            walker.buffers.len()
        )));
    }
    Ok(rows as u64)
}

/// A checked offsets buffer: `count` little-endian offsets of `width` bytes, none negative,
/// none below the one before.
struct Offsets<'a> {
    raw: &'a [u8],
    width: usize,
    count: usize,
}

impl Offsets<'_> {
    fn get(&self, i: usize) -> i64 {
        let raw = &self.raw[i * self.width..(i + 1) * self.width];
        if self.width == 8 {
            i64::from_le_bytes(raw.try_into().unwrap_or([0; 8]))
        } else {
            i64::from(i32::from_le_bytes(raw.try_into().unwrap_or([0; 4])))
        }
    }

    fn first(&self) -> usize {
        if self.count == 0 {
            0
        } else {
            self.get(0) as usize
        }
    }

    fn last(&self) -> usize {
        if self.count == 0 {
            0
        } else {
            self.get(self.count - 1) as usize
        }
    }
}

struct Walker<'a> {
    nodes: VecDeque<(i64, i64)>,
    buffers: VecDeque<(i64, i64)>,
    variadic: VecDeque<i64>,
    body: &'a [u8],
}

impl<'a> Walker<'a> {
    fn node(&mut self, field: &Field) -> Result<(usize, usize)> {
        let (length, nulls) = self.nodes.pop_front().ok_or_else(|| {
            StoreError::InvalidIpc(format!(
                "batch ends before column '{}'; it does not match the schema",
                field.name()
            ))
        })?;
        if length < 0 || nulls < 0 || nulls > length {
            return Err(StoreError::InvalidIpc(format!(
                "column '{}' has length {length} and null count {nulls}",
                field.name()
            )));
        }
        // Arrow refuses such a frame when it decodes (found by the `ingest` fuzz target).
        if nulls > 0 && !field.is_nullable() && field.data_type() != &DataType::Null {
            return Err(StoreError::InvalidIpc(format!(
                "column '{}' is not nullable but the batch has {nulls} nulls in it",
                field.name()
            )));
        }
        Ok((length as usize, nulls as usize))
    }

    fn buffer(&mut self, field: &Field) -> Result<&'a [u8]> {
        let (offset, length) = self.buffers.pop_front().ok_or_else(|| {
            StoreError::InvalidIpc(format!(
                "batch runs out of buffers at column '{}'",
                field.name()
            ))
        })?;
        if offset < 0
            || length < 0
            || (offset as u64).saturating_add(length as u64) > self.body.len() as u64
        {
            return Err(StoreError::InvalidIpc(format!(
                "buffer [{offset}, +{length}) of column '{}' lies outside the {} byte body",
                field.name(),
                self.body.len()
            )));
        }
        // Arrow IPC puts every buffer at a multiple of 8 from the body's start; arrow's decoder
        // asserts it for some buffers (found by the `ingest` fuzz target).
        if offset % 8 != 0 {
            return Err(StoreError::InvalidIpc(format!(
                "a buffer of column '{}' starts at byte {offset} of the body, not at a multiple of 8 as Arrow IPC requires",
                field.name()
            )));
        }
        let body: &'a [u8] = self.body;
        Ok(&body[offset as usize..(offset + length) as usize])
    }

    fn need(field: &Field, what: &str, have: usize, need: usize) -> Result<()> {
        if have < need {
            return Err(StoreError::InvalidIpc(format!(
                "{what} buffer of column '{}' has {have} bytes, needs {need}",
                field.name()
            )));
        }
        Ok(())
    }

    /// A validity bitmap, when the column declares nulls, must hold exactly that many (arrow
    /// refuses the frame at decode otherwise; found by the `ingest` fuzz target).
    fn validity(&mut self, field: &Field, length: usize, nulls: usize) -> Result<()> {
        let bits = self.buffer(field)?;
        if nulls > 0 {
            Self::need(field, "validity", bits.len(), length.div_ceil(8))?;
            let full = length / 8;
            let mut valid: usize = bits[..full].iter().map(|b| b.count_ones() as usize).sum();
            if !length.is_multiple_of(8) {
                valid += (bits[full] & ((1u8 << (length % 8)) - 1)).count_ones() as usize;
            }
            let counted = length - valid;
            if counted != nulls {
                return Err(StoreError::InvalidIpc(format!(
                    "column '{}' declares {nulls} nulls but its validity bitmap has {counted}",
                    field.name()
                )));
            }
        }
        Ok(())
    }

    /// Checks the offsets buffer: every offset at or after the one before it, from a first that
    /// is not negative. Readers trust offsets (pyarrow does not check them), so a frame stored
    /// with a decreasing one would fail every decode, or read out of bounds in a client.
    fn offsets(&mut self, field: &Field, length: usize, wide: bool) -> Result<Offsets<'a>> {
        let width = if wide { 8 } else { 4 };
        let raw = self.buffer(field)?;
        if length == 0 {
            return Ok(Offsets {
                raw,
                width,
                count: 0,
            });
        }
        // Saturating: `length` comes from the writer (found by the `ingest` fuzz target).
        Self::need(
            field,
            "offsets",
            raw.len(),
            length.saturating_add(1).saturating_mul(width),
        )?;
        if raw.len() % width != 0 {
            return Err(StoreError::InvalidIpc(format!(
                "the offsets buffer of column '{}' is {} bytes, not a whole number of offsets",
                field.name(),
                raw.len()
            )));
        }
        let offsets = Offsets {
            raw,
            width,
            count: length + 1,
        };
        let first = offsets.get(0);
        if first < 0 {
            return Err(StoreError::InvalidIpc(format!(
                "offsets of column '{}' start at {first}",
                field.name()
            )));
        }
        let mut previous = first;
        for i in 1..=length {
            let offset = offsets.get(i);
            if offset < previous {
                return Err(StoreError::InvalidIpc(format!(
                    "offsets of column '{}' go back from {previous} to {offset} at row {i}",
                    field.name()
                )));
            }
            previous = offset;
        }
        Ok(offsets)
    }

    /// UTF-8 columns hold UTF-8 (arrow checks it when it decodes; pyarrow does not), and every
    /// value starts on a character.
    fn utf8(field: &Field, offsets: &Offsets<'_>, values: &[u8]) -> Result<()> {
        let (first, last) = (offsets.first(), offsets.last());
        if let Err(e) = std::str::from_utf8(&values[first..last]) {
            return Err(StoreError::InvalidIpc(format!(
                "column '{}' is not valid UTF-8 at byte {}",
                field.name(),
                first + e.valid_up_to()
            )));
        }
        for i in 0..offsets.count {
            let at = offsets.get(i) as usize;
            if at < last && (values[at] & 0xC0) == 0x80 {
                return Err(StoreError::InvalidIpc(format!(
                    "row {i} of column '{}' starts inside a UTF-8 character",
                    field.name()
                )));
            }
        }
        Ok(())
    }

    /// Validates one column (recursively) and returns its length.
    fn field(&mut self, field: &Field) -> Result<usize> {
        use DataType::*;
        let data_type = field.data_type();
        let (length, nulls) = self.node(field)?;
        match data_type {
            Null => {
                if nulls != length {
                    return Err(StoreError::InvalidIpc(format!(
                        "null column '{}' has {length} rows but {nulls} nulls",
                        field.name()
                    )));
                }
            }
            Boolean => {
                self.validity(field, length, nulls)?;
                let have = self.buffer(field)?.len();
                Self::need(field, "values", have, length.div_ceil(8))?;
            }
            Utf8 | Binary | LargeUtf8 | LargeBinary => {
                self.validity(field, length, nulls)?;
                let offsets =
                    self.offsets(field, length, matches!(data_type, LargeUtf8 | LargeBinary))?;
                let values = self.buffer(field)?;
                Self::need(field, "values", values.len(), offsets.last())?;
                if matches!(data_type, Utf8 | LargeUtf8) {
                    Self::utf8(field, &offsets, values)?;
                }
            }
            BinaryView | Utf8View => {
                let extra = self.variadic.pop_front().ok_or_else(|| {
                    StoreError::InvalidIpc(format!(
                        "missing variadic buffer count for column '{}'",
                        field.name()
                    ))
                })?;
                if extra < 0 {
                    return Err(StoreError::InvalidIpc(format!(
                        "negative variadic count for '{}'",
                        field.name()
                    )));
                }
                self.validity(field, length, nulls)?;
                let have = self.buffer(field)?.len();
                Self::need(field, "views", have, length.saturating_mul(16))?;
                for _ in 0..extra {
                    self.buffer(field)?;
                }
            }
            FixedSizeBinary(size) => {
                self.validity(field, length, nulls)?;
                let have = self.buffer(field)?.len();
                Self::need(field, "values", have, length.saturating_mul(*size as usize))?;
            }
            List(child) | LargeList(child) | Map(child, _) => {
                self.validity(field, length, nulls)?;
                let last = self
                    .offsets(field, length, matches!(data_type, LargeList(_)))?
                    .last();
                let child_len = self.field(child)?;
                if child_len < last {
                    return Err(StoreError::InvalidIpc(format!(
                        "list column '{}' points at {last} child values but has {child_len}",
                        field.name()
                    )));
                }
            }
            FixedSizeList(child, size) => {
                self.validity(field, length, nulls)?;
                let child_len = self.field(child)?;
                let need = length.saturating_mul(*size as usize);
                if child_len < need {
                    return Err(StoreError::InvalidIpc(format!(
                        "fixed-size list column '{}' needs {need} child values but has {child_len}",
                        field.name()
                    )));
                }
            }
            Struct(children) => {
                self.validity(field, length, nulls)?;
                for child in children {
                    let child_len = self.field(child)?;
                    if child_len < length {
                        return Err(StoreError::InvalidIpc(format!(
                            "struct column '{}' has {length} rows but child '{}' has {child_len}",
                            field.name(),
                            child.name()
                        )));
                    }
                }
            }
            other => {
                let width = other.primitive_width().ok_or_else(|| {
                    StoreError::Unsupported(format!(
                        "column '{}' has unsupported type {other}",
                        field.name()
                    ))
                })?;
                self.validity(field, length, nulls)?;
                let have = self.buffer(field)?.len();
                Self::need(field, "values", have, length.saturating_mul(width))?;
            }
        }
        Ok(length)
    }
}

/// Runs arrow code that may panic on hostile input and turns a panic into an error.
pub fn guard_panic<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(panic) => {
            let detail = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("malformed input");
            Err(StoreError::InvalidIpc(format!(
                "malformed Arrow IPC data ({detail})"
            )))
        }
    }
}

/// Names and types must match; a nullable link column accepts non-nullable writes, not the reverse.
pub fn check_compatible(link: &str, expected: &Schema, got: &Schema) -> Result<()> {
    let mismatch = |detail: String| StoreError::SchemaMismatch {
        link: link.to_string(),
        detail,
    };
    if expected.fields().len() != got.fields().len() {
        return Err(mismatch(format!(
            "the link has {} columns ({}), the write has {} ({})",
            expected.fields().len(),
            describe(expected),
            got.fields().len(),
            describe(got)
        )));
    }
    for (want, have) in expected.fields().iter().zip(got.fields()) {
        if want.name() != have.name() || !types_match(want.data_type(), have.data_type()) {
            return Err(mismatch(format!(
                "column '{}: {}' of the link does not match '{}: {}' of the write; cast the data to the link schema",
                want.name(),
                want.data_type(),
                have.name(),
                have.data_type()
            )));
        }
        if !want.is_nullable() && have.is_nullable() {
            return Err(mismatch(format!(
                "column '{}' is non-nullable in the link but nullable in the write",
                want.name()
            )));
        }
    }
    Ok(())
}

fn types_match(a: &DataType, b: &DataType) -> bool {
    // Nested field names and nullability differ freely between writers (Spark vs pyarrow).
    match (a, b) {
        (DataType::List(x), DataType::List(y))
        | (DataType::LargeList(x), DataType::LargeList(y))
        | (DataType::Map(x, _), DataType::Map(y, _)) => types_match(x.data_type(), y.data_type()),
        (DataType::FixedSizeList(x, n), DataType::FixedSizeList(y, m)) => {
            n == m && types_match(x.data_type(), y.data_type())
        }
        (DataType::Struct(x), DataType::Struct(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y.iter())
                    .all(|(f, g)| f.name() == g.name() && types_match(f.data_type(), g.data_type()))
        }
        _ => a == b,
    }
}

fn describe(schema: &Schema) -> String {
    schema
        .fields()
        .iter()
        .map(|f| format!("{}: {}", f.name(), f.data_type()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use arrow_array::{ArrayRef, Int32Array, Int64Array, NullArray, RecordBatchOptions};
    use arrow_ipc::writer::{
        DictionaryTracker, IpcDataGenerator, IpcWriteContext, IpcWriteOptions,
    };

    use super::*;

    /// The header and body a writer would send for `batch`.
    fn encode(batch: &RecordBatch) -> (Bytes, Bytes) {
        let generator = IpcDataGenerator::default();
        let (_, data) = generator
            .encode(
                batch,
                &mut DictionaryTracker::new(false),
                &IpcWriteOptions::default(),
                &mut IpcWriteContext::default(),
            )
            .expect("encode");
        (Bytes::from(data.ipc_message), Bytes::from(data.arrow_data))
    }

    fn batch_of(columns: Vec<(&str, ArrayRef)>, rows: usize) -> RecordBatch {
        let schema = Schema::new(
            columns
                .iter()
                .map(|(name, a)| Field::new(*name, a.data_type().clone(), true))
                .collect::<Vec<_>>(),
        );
        let arrays = columns.into_iter().map(|(_, a)| a).collect();
        RecordBatch::try_new_with_options(
            Arc::new(schema),
            arrays,
            &RecordBatchOptions::new().with_row_count(Some(rows)),
        )
        .expect("batch")
    }

    /// The same message with another metadata version, patched in place.
    fn with_version(header: &[u8], version: i16) -> Bytes {
        let message = arrow_ipc::root_as_message(header).expect("message");
        let table = message._tab;
        let field = table.vtable().get(Message::VT_VERSION) as usize;
        assert_ne!(field, 0, "the encoder writes the version explicitly");
        let at = table.loc() + field;
        let mut out = header.to_vec();
        out[at..at + 2].copy_from_slice(&version.to_le_bytes());
        Bytes::from(out)
    }

    #[test]
    fn a_real_batch_passes() {
        let batch = batch_of(vec![("x", Arc::new(Int32Array::from(vec![1, 2, 3])))], 3);
        let (header, body) = encode(&batch);
        match validate_message(Some(&batch.schema()), header, body).expect("valid") {
            Incoming::Batch(frame) => assert_eq!(frame.rows, 3),
            Incoming::Schema(_) => panic!("a batch"),
        }
    }

    /// A kept frame holds its memory until the last user of its body lets go, and an aligned
    /// one decodes in place.
    #[test]
    fn kept_frames_hold_their_memory_and_aligned_ones_decode_in_place() {
        let batch = batch_of(
            vec![("x", Arc::new(Int64Array::from_iter_values(0..1000)))],
            1000,
        );
        let (header, body) = encode(&batch);
        let body = aligned(Bytes::copy_from_slice(&body));
        let Incoming::Batch(frame) =
            validate_message(Some(&batch.schema()), header, body).expect("valid")
        else {
            panic!("a batch")
        };
        let pool = crate::memory::MemoryPool::new(Some(1 << 20));
        let mut reservation = pool.reservation(None);
        reservation.try_grow(frame.bytes()).expect("fits");
        let kept = frame.owned(reservation);
        assert!(kept.is_aligned());
        let decoded = kept.decode(&batch.schema()).expect("decode");
        let column = decoded.column(0).to_data().buffers()[0].as_ptr() as usize;
        let body = kept.body.as_ptr() as usize;
        assert!(
            (body..body + kept.body.len()).contains(&column),
            "decoded in place"
        );
        drop(kept);
        assert!(pool.used() > 0, "the decoded column still holds the frame");
        drop(decoded);
        assert_eq!(pool.used(), 0);
    }

    /// Rows nobody sent: zero columns, or only Null columns, declaring 2^40 rows in a few bytes.
    #[test]
    fn rows_without_data_are_refused() {
        for batch in [
            batch_of(vec![], 1 << 40),
            batch_of(vec![("n", Arc::new(NullArray::new(1 << 40)))], 1 << 40),
            batch_of(vec![("n", Arc::new(NullArray::new(1 << 20)))], 1 << 20),
        ] {
            let (header, body) = encode(&batch);
            let err = validate_message(Some(&batch.schema()), header, body).expect_err("refused");
            assert!(matches!(err, StoreError::InvalidIpc(_)), "{err}");
            let text = err.to_string();
            assert!(
                text.contains("more than the") || text.contains("holds data for at most"),
                "{text}"
            );
        }
    }

    #[test]
    fn metadata_versions_we_do_not_read_are_refused() {
        let batch = batch_of(vec![("x", Arc::new(Int32Array::from(vec![1, 2, 3])))], 3);
        let (header, body) = encode(&batch);
        let err = validate_message(
            Some(&batch.schema()),
            with_version(&header, 99),
            body.clone(),
        )
        .expect_err("version 99");
        assert!(
            err.to_string().contains("newer than this server reads"),
            "{err}"
        );
        // V4 (3) is still read.
        validate_message(Some(&batch.schema()), with_version(&header, 3), body).expect("V4");
    }

    /// Found by the `ingest` fuzz target: offsets that go back, bytes that are not UTF-8, and a
    /// value that starts inside a character were stored, and every read of the link then failed.
    #[test]
    fn frames_that_would_not_decode_are_refused_at_ingest() {
        let names: ArrayRef = Arc::new(arrow_array::StringArray::from(vec!["ab", "cé", "d"]));
        let batch = batch_of(vec![("name", names)], 3);
        let schema = batch.schema();
        let (header, body) = encode(&batch);
        validate_message(Some(&schema), header.clone(), body.clone()).expect("valid as sent");
        // Buffers: validity, offsets, values.
        let message = arrow_ipc::root_as_message(&header).expect("message");
        let buffers = message
            .header_as_record_batch()
            .and_then(|b| b.buffers())
            .expect("buffers");
        let offsets = buffers.get(1).offset() as usize;
        let values = buffers.get(2).offset() as usize;
        let patched = |at: usize, bytes: &[u8]| {
            let mut body = body.to_vec();
            body[at..at + bytes.len()].copy_from_slice(bytes);
            Bytes::from(body)
        };
        let refused = |body: Bytes| {
            validate_message(Some(&schema), header.clone(), body)
                .expect_err("refused")
                .to_string()
        };
        // Offsets [0, 2, 5, 6]: make the second offset 6, above the third.
        let err = refused(patched(offsets + 4, &6i32.to_le_bytes()));
        assert!(err.contains("go back from 6 to 5"), "{err}");
        // A byte that is no UTF-8 at all.
        let err = refused(patched(values, &[0xFF]));
        assert!(err.contains("not valid UTF-8 at byte 0"), "{err}");
        // The third value starts on the second byte of 'é' (values "abcéd": é is bytes 3..5).
        let err = refused(patched(offsets + 8, &4i32.to_le_bytes()));
        assert!(err.contains("starts inside a UTF-8 character"), "{err}");

        // A null count that the validity bitmap does not hold.
        let names: ArrayRef = Arc::new(arrow_array::StringArray::from(vec![
            Some("a"),
            None,
            Some("c"),
        ]));
        let batch = batch_of(vec![("name", names)], 3);
        let (header, body) = encode(&batch);
        validate_message(Some(&batch.schema()), header, body.clone()).expect("valid as sent");
        let message_bytes = encode(&batch).0;
        let message = arrow_ipc::root_as_message(&message_bytes).expect("message");
        let validity = message
            .header_as_record_batch()
            .and_then(|b| b.buffers())
            .expect("buffers")
            .get(0)
            .offset() as usize;
        let mut bad = body.to_vec();
        bad[validity] = 0b000; // all three null, one declared
        let err = validate_message(Some(&batch.schema()), message_bytes, Bytes::from(bad))
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("declares 1 nulls but its validity bitmap has 3"),
            "{err}"
        );

        // Nulls in a column the schema says has none.
        let strict = Arc::new(Schema::new(vec![Field::new("name", DataType::Utf8, false)]));
        let err = validate_message(Some(&strict), encode(&batch).0, body)
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("is not nullable but the batch has 1 nulls"),
            "{err}"
        );
    }
}
