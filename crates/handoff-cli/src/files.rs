//! Reading and writing Parquet, Arrow IPC and CSV files as record batches.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;

pub type BatchIter = Box<dyn Iterator<Item = Result<RecordBatch, String>> + Send>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Parquet,
    Arrow,
    Csv,
}

impl Format {
    /// Decide by extension, then by magic bytes.
    pub fn detect(path: &Path) -> Result<Self, String> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "parquet" | "pq" => return Ok(Format::Parquet),
            "arrow" | "ipc" | "feather" | "arrows" => return Ok(Format::Arrow),
            "csv" => return Ok(Format::Csv),
            _ => {}
        }
        let mut magic = [0u8; 6];
        if let Ok(mut f) = File::open(path)
            && f.read_exact(&mut magic).is_ok()
        {
            if &magic[..4] == b"PAR1" {
                return Ok(Format::Parquet);
            }
            if &magic == b"ARROW1" || magic[..4] == [0xFF; 4] {
                return Ok(Format::Arrow);
            }
        }
        Err(format!(
            "cannot tell the format of {}: name it .parquet, .arrow or .csv, or pass --format",
            path.display()
        ))
    }

    pub fn from_output(path: &Path) -> Result<Self, String> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "parquet" | "pq" => Ok(Format::Parquet),
            "arrow" | "ipc" | "feather" => Ok(Format::Arrow),
            "csv" => Ok(Format::Csv),
            _ => Err(format!(
                "cannot tell the output format of {}: name it .parquet, .arrow or .csv, or pass --format",
                path.display()
            )),
        }
    }
}

/// An input file: its schema, a total row count when the format knows it, and its batches.
pub struct Input {
    pub schema: SchemaRef,
    pub rows: Option<u64>,
    pub batches: BatchIter,
}

pub fn open_input(path: &Path, format: Format, batch_rows: usize) -> Result<Input, String> {
    let open = || File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()));
    match format {
        Format::Parquet => {
            let builder =
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(open()?)
                    .map_err(|e| format!("{} is not readable Parquet: {e}", path.display()))?;
            let rows = builder.metadata().file_metadata().num_rows() as u64;
            let schema = Arc::clone(builder.schema());
            let reader = builder
                .with_batch_size(batch_rows)
                .build()
                .map_err(|e| e.to_string())?;
            Ok(Input {
                schema,
                rows: Some(rows),
                batches: Box::new(reader.map(|r| r.map_err(|e| e.to_string()))),
            })
        }
        Format::Arrow => {
            let mut file = open()?;
            let mut magic = [0u8; 6];
            let is_file = file.read_exact(&mut magic).is_ok() && &magic == b"ARROW1";
            file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
            let reader: Box<dyn arrow_array::RecordBatchReader + Send> = if is_file {
                Box::new(
                    arrow_ipc::reader::FileReader::try_new(BufReader::new(file), None).map_err(
                        |e| format!("{} is not a readable Arrow IPC file: {e}", path.display()),
                    )?,
                )
            } else {
                Box::new(
                    arrow_ipc::reader::StreamReader::try_new(BufReader::new(file), None).map_err(
                        |e| format!("{} is not a readable Arrow IPC stream: {e}", path.display()),
                    )?,
                )
            };
            let schema = reader.schema();
            Ok(Input {
                schema,
                rows: None,
                batches: Box::new(reader.map(|r| r.map_err(|e| e.to_string()))),
            })
        }
        Format::Csv => {
            let mut file = open()?;
            let (schema, _) = arrow_csv::reader::Format::default()
                .with_header(true)
                .infer_schema(&mut file, Some(10_000))
                .map_err(|e| format!("cannot infer the schema of {}: {e}", path.display()))?;
            file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
            let schema = Arc::new(schema);
            let reader = arrow_csv::ReaderBuilder::new(Arc::clone(&schema))
                .with_header(true)
                .with_batch_size(batch_rows)
                .build(BufReader::new(file))
                .map_err(|e| e.to_string())?;
            Ok(Input {
                schema,
                rows: None,
                batches: Box::new(reader.map(|r| r.map_err(|e| e.to_string()))),
            })
        }
    }
}

/// A writer for one output file.
pub enum Output {
    Parquet(parquet::arrow::ArrowWriter<File>),
    Arrow(arrow_ipc::writer::FileWriter<File>),
    Csv(arrow_csv::Writer<File>),
}

impl Output {
    pub fn create(path: &Path, format: Format, schema: &SchemaRef) -> Result<Self, String> {
        let file =
            File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(match format {
            Format::Parquet => Output::Parquet(
                parquet::arrow::ArrowWriter::try_new(file, Arc::clone(schema), None)
                    .map_err(|e| e.to_string())?,
            ),
            Format::Arrow => Output::Arrow(
                arrow_ipc::writer::FileWriter::try_new(file, schema).map_err(|e| e.to_string())?,
            ),
            Format::Csv => Output::Csv(
                arrow_csv::WriterBuilder::new()
                    .with_header(true)
                    .build(file),
            ),
        })
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), String> {
        match self {
            Output::Parquet(w) => w.write(batch).map_err(|e| e.to_string()),
            Output::Arrow(w) => w.write(batch).map_err(|e| e.to_string()),
            Output::Csv(w) => w.write(batch).map_err(|e| e.to_string()),
        }
    }

    pub fn finish(self) -> Result<(), String> {
        match self {
            Output::Parquet(w) => w.close().map(|_| ()).map_err(|e| e.to_string()),
            Output::Arrow(mut w) => w.finish().map_err(|e| e.to_string()),
            Output::Csv(_) => Ok(()),
        }
    }
}
