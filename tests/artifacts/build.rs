//! Compiles `examples/` so tests use real guests without any manual build step
//! (as wasmtime's test-programs artifacts crate does): the plain WASI examples
//! for wasm32-wasip1, the SDK examples and `wasip2-hello` for wasm32-wasip2.

use std::path::PathBuf;
use std::process::Command;

/// Packages built as components, for wasm32-wasip2.
const COMPONENT_PACKAGES: &[&str] = &[
    "sum",
    "json-transform",
    "fib",
    "greet",
    "fails",
    "settings",
    "fetch",
    "fan-out",
    "http-hello",
    "wasip2-hello",
];

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.join("../..").canonicalize().unwrap();
    let examples = root.join("examples");
    // A target dir of its own: the outer cargo holds the lock on the main one.
    let target_dir = root.join("target/wasm-examples");

    let watched = [
        examples.join("Cargo.toml"),
        examples.join("Cargo.lock"),
        root.join("guest-sdk"),
        root.join("wit"),
    ];
    let packages = ["wasi"].iter().chain(COMPONENT_PACKAGES);
    for path in watched
        .into_iter()
        .chain(packages.map(|p| examples.join(p)))
    {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    build(
        &examples,
        &target_dir,
        "wasm32-wasip1",
        &["vulcan-wasi-examples"],
    );
    build(&examples, &target_dir, "wasm32-wasip2", COMPONENT_PACKAGES);
    println!(
        "cargo:rustc-env=VULCAN_EXAMPLES_DIR={}",
        target_dir.join("wasm32-wasip1/release").display()
    );
    println!(
        "cargo:rustc-env=VULCAN_COMPONENTS_DIR={}",
        target_dir.join("wasm32-wasip2/release").display()
    );
}

fn build(
    examples: &std::path::Path,
    target_dir: &std::path::Path,
    target: &str,
    packages: &[&str],
) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(examples)
        .args(["build", "--release", "--target", target, "--target-dir"])
        .arg(target_dir);
    for p in packages {
        cmd.args(["-p", p]);
    }
    // Flags meant for the host build must not leak into the wasm build.
    cmd.env_remove("RUSTFLAGS")
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
            "building examples/ for {target} failed.\n\
             If the target is missing, install it with:\n    rustup target add {target}"
        );
    }
}
