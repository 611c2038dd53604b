//! Prints N lines (argv[1], default 1000), one every argv[2] microseconds
//! (default 1000), each holding the wall-clock time it was written in
//! nanoseconds since the Unix epoch, so a follower can measure how long a line
//! takes to reach it.
use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
fn main() {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let every: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let mut out = std::io::stdout().lock();
    for _ in 0..n {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        writeln!(out, "{now}").unwrap();
        out.flush().unwrap();
        std::thread::sleep(Duration::from_micros(every));
    }
}
