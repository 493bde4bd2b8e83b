//! The DataLink controller: the custom resource that pairs a SparkApplication with a PyTorchJob or
//! TrainJob, and the reconciler that runs a Handoff server between them.

pub mod controller;
pub mod crd;
pub mod error;
pub mod kueue;
pub mod metrics;
pub mod pki;
pub mod resources;
pub mod workloads;

pub use controller::{ControllerConfig, FINALIZER, run};
pub use error::Error;
pub use metrics::{Metrics, serve_http};

pub use crd::{
    Consumer, ConsumerRef, DataLink, DataLinkSpec, DataLinkStatus, Gate, LinkPolicy, MemoryPolicy,
    Phase, Producer, ProducerFailure, ReadDefaults, ServerLoss, ServerSpec, crd_yaml,
};

#[cfg(test)]
mod tests {
    use super::resources::{InvalidSpec, quantity_bytes};

    #[test]
    fn quantities_convert_to_bytes_and_bad_ones_name_the_fix() {
        assert_eq!(quantity_bytes("8Gi"), Ok(8 << 30));
        assert_eq!(quantity_bytes("512Mi"), Ok(512 << 20));
        assert_eq!(quantity_bytes("2G"), Ok(2_000_000_000));
        assert_eq!(quantity_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(quantity_bytes("1048576"), Ok(1 << 20));
        let InvalidSpec(why) = quantity_bytes("8GB").expect_err("GB is not a quantity unit");
        assert!(why.contains("use Ki, Mi, Gi"), "{why}");
        assert!(quantity_bytes("0").is_err() && quantity_bytes("lots").is_err());
    }
}
