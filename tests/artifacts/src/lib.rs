//! Paths of the example workloads, compiled by this crate's build script.

use std::path::PathBuf;

/// Directory holding the compiled `*.wasm` examples.
pub const EXAMPLES_DIR: &str = env!("VULCAN_EXAMPLES_DIR");

/// Path of the compiled example `name` (e.g. `"hello"`); panics if it is missing.
pub fn example(name: &str) -> PathBuf {
    let path = PathBuf::from(EXAMPLES_DIR).join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "example {name} was not built: {}",
        path.display()
    );
    path
}

/// The bytes of the compiled example `name`.
pub fn example_bytes(name: &str) -> Vec<u8> {
    std::fs::read(example(name)).expect("failed to read an example")
}
