//! Prints a greeting.
fn main() {
    println!("Hello from a Vulcan workload!");
}
