//! Reads argv[1] and prints it, then tries to read argv[2] (a path that should be
//! outside its preopened directories) and reports whether it could.
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let inside = args.get(1).map(String::as_str).unwrap_or("/data/input.txt");
    match std::fs::read_to_string(inside) {
        Ok(text) => print!("read {inside}: {text}"),
        Err(e) => {
            println!("cannot read {inside}: {e}");
            std::process::exit(1);
        }
    }
    if let Some(outside) = args.get(2) {
        match std::fs::read_to_string(outside) {
            Ok(text) => {
                println!("ESCAPED: read {outside}: {}", text.len());
                std::process::exit(3);
            }
            Err(e) => println!("denied {outside}: {e}"),
        }
    }
}
