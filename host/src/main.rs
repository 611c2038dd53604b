//! The `vulcan` binary: parse the command line, run it, map the result to an exit code.

use std::process::ExitCode;

// Guest output crosses threads line by line (allocated where the guest runs,
// freed by the database writer); glibc's allocator pays a slow path for every
// such pair, mimalloc does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    vulcan::cli::main()
}
