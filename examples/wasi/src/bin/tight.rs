//! A hostile flooder: writes `x\n` in 64 KiB buffers until it is stopped (or,
//! with a number in argv[1], that many buffers), as fast as WASI lets it.
use std::io::Write;
fn main() {
    let buffers: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(u64::MAX);
    let buf = "x\n".repeat(32 * 1024);
    let mut out = std::io::stdout().lock();
    for _ in 0..buffers {
        if out.write_all(buf.as_bytes()).is_err() {
            return;
        }
    }
}
