//! Sleeps argv[1] milliseconds (default 50), then prints how long it slept:
//! a workload that holds a slot without using a core, for dispatch benchmarks.
use std::time::Duration;
fn main() {
    let ms: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(50);
    std::thread::sleep(Duration::from_millis(ms));
    println!("slept {ms} ms");
}
