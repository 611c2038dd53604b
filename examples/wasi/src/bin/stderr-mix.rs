//! Interleaves stdout and stderr lines: out 0, err 1, out 2, ...
use std::io::Write;
fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(6);
    for i in 0..n {
        if i % 2 == 0 {
            let mut o = std::io::stdout().lock();
            writeln!(o, "out {i}").unwrap();
            o.flush().unwrap();
        } else {
            eprintln!("err {i}");
        }
    }
}
