//! Prints its environment, one `KEY=VALUE` per line (values escaped with {:?}),
//! then its argv.
fn main() {
    for (k, v) in std::env::vars() {
        println!("{k}={v:?}");
    }
    for (i, a) in std::env::args().enumerate() {
        println!("argv[{i}]={a}");
    }
}
