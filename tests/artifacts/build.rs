//! Compiles `examples/` for wasm32-wasip1 so tests use real guests without any
//! manual build step (as wasmtime's test-programs artifacts crate does).

use std::path::PathBuf;
use std::process::Command;

const TARGET: &str = "wasm32-wasip1";

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.join("../..").canonicalize().unwrap();
    let examples = root.join("examples");
    // A target dir of its own: the outer cargo holds the lock on the main one.
    let target_dir = root.join("target/wasm-examples");

    println!(
        "cargo:rerun-if-changed={}",
        examples.join("Cargo.toml").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        examples.join("Cargo.lock").display()
    );
    println!("cargo:rerun-if-changed={}", examples.join("wasi").display());

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&examples)
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(&target_dir)
        // Flags meant for the host build must not leak into the wasm build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        // Under `cargo clippy` the outer build sets a wrapper; the guests are not linted here.
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER");
    let status = cmd
        .status()
        .expect("failed to run cargo for the example workloads");
    if !status.success() {
        panic!(
            "building examples/ for {TARGET} failed.\n\
             If the target is missing, install it with:\n    rustup target add {TARGET}"
        );
    }
    let out = target_dir.join(TARGET).join("release");
    println!("cargo:rustc-env=VULCAN_EXAMPLES_DIR={}", out.display());
}
