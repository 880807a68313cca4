//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub fn golden(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-goldens").join(case)
}

pub const CASES: [&str; 3] = ["llama-gqa", "llama3-rope-tied", "qwen2-bias"];

/// Copies a golden case's model directory into a fresh temp dir (writable).
pub fn copy_model(case: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for entry in std::fs::read_dir(golden(case).join("model")).expect("model dir") {
        let p = entry.expect("entry").path();
        std::fs::copy(&p, dir.path().join(p.file_name().expect("name"))).expect("copy");
        let mut perm = std::fs::metadata(dir.path().join(p.file_name().unwrap())).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perm.set_readonly(false);
        std::fs::set_permissions(dir.path().join(p.file_name().unwrap()), perm).unwrap();
    }
    dir
}
