//! Allocates 1 MiB blocks, touching each, until memory runs out.
fn main() {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    loop {
        blocks.push(vec![1u8; 1 << 20]);
        if blocks.len().is_multiple_of(16) {
            println!("holding {} MiB", blocks.len());
        }
    }
}
