//! Copies stdin to stdout byte for byte, then reports the count on stderr.
use std::io::{Read, Write};
fn main() {
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input).unwrap();
    std::io::stdout().write_all(&input).unwrap();
    std::io::stdout().flush().unwrap();
    eprintln!("echoed {} bytes", input.len());
}
