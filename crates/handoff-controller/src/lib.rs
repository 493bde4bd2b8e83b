//! The DataLink controller: the custom resource that pairs a SparkApplication with a PyTorchJob or
//! TrainJob, and the reconciler that runs a Handoff server between them.

pub mod crd;

pub use crd::{
    Consumer, ConsumerRef, DataLink, DataLinkSpec, DataLinkStatus, Gate, LinkPolicy, MemoryPolicy,
    Phase, Producer, ProducerFailure, ReadDefaults, ServerSpec, crd_yaml,
};
