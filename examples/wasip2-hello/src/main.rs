//! Prints a greeting, its args, and the input it reads on stdin.
use std::io::Read;

fn main() {
    println!("Hello from a WASI preview2 component!");
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!("args: {args:?}");
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input).unwrap();
    if !input.is_empty() {
        println!("input: {input}");
    }
    if args.first().map(String::as_str) == Some("fail") {
        eprintln!("failing as asked");
        std::process::exit(3);
    }
}
