//! Fails when the checked-in generated code no longer matches `proto/handoff.proto`.

use std::path::{Path, PathBuf};

fn generate(out: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let proto = root.join("proto/handoff.proto");
    let mut config = prost_build::Config::new();
    config.bytes(["."]).out_dir(out);
    config
        .compile_protos(&[proto], &[root.join("proto")])
        .expect(
            "protoc failed: install it (Debian: apt-get install protobuf-compiler) or set PROTOC",
        );
}

#[test]
fn generated_code_is_fresh() {
    let dir = tempfile::tempdir().expect("tempdir");
    generate(dir.path());
    let fresh = std::fs::read_to_string(dir.path().join("handoff.v1.rs")).expect("generated file");
    let checked_in_path: PathBuf =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src/gen/handoff.v1.rs");
    if std::env::var_os("HANDOFF_REGEN").is_some() {
        std::fs::write(&checked_in_path, &fresh).expect("write generated code");
        return;
    }
    let checked_in = std::fs::read_to_string(&checked_in_path).unwrap_or_default();
    assert!(
        fresh == checked_in,
        "crates/handoff-proto/src/gen/handoff.v1.rs is stale: run \
         `HANDOFF_REGEN=1 cargo test -p handoff-proto --test regen` and commit the result"
    );
}
