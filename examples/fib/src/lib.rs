//! Computes Fibonacci(n) the slow way (exponential): input `{"n":30}`.
use vulcan_guest::Json;

#[derive(serde::Deserialize)]
struct In {
    n: u32,
}

fn fib(n: u32) -> u64 {
    if n < 2 { n as u64 } else { fib(n - 1) + fib(n - 2) }
}

fn run(Json(input): Json<In>) -> vulcan_guest::Result<Json<u64>> {
    Ok(Json(fib(input.n)))
}

vulcan_guest::workload!(run);
