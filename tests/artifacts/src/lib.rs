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

/// Directory holding the compiled wasm32-wasip2 components.
pub const COMPONENTS_DIR: &str = env!("VULCAN_COMPONENTS_DIR");

/// Path of the compiled component example `name` (e.g. `"sum"`,
/// `"json-transform"`); panics if it is missing.
pub fn component(name: &str) -> PathBuf {
    // Library crates are named with underscores, binaries keep their dashes.
    let candidates = [name.to_owned(), name.replace('-', "_")];
    candidates
        .iter()
        .map(|n| PathBuf::from(COMPONENTS_DIR).join(format!("{n}.wasm")))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("component example {name} was not built in {COMPONENTS_DIR}"))
}

/// The bytes of the compiled example `name`.
pub fn example_bytes(name: &str) -> Vec<u8> {
    std::fs::read(example(name)).expect("failed to read an example")
}
