//! Prints N numbered lines (N from argv[1], default 1000) as fast as it can,
//! one write per line like any line-buffered program.
use std::io::Write;
fn main() {
    let n: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let mut out = std::io::stdout().lock();
    for i in 0..n {
        writeln!(out, "line {i}").unwrap();
    }
}
