//! Adds two numbers: `{"a":1,"b":2}` → `{"sum":3}`.
use vulcan_guest::{Json, log};

#[derive(serde::Deserialize)]
struct In {
    a: i64,
    b: i64,
}

#[derive(serde::Serialize)]
struct Out {
    sum: i64,
}

fn run(Json(input): Json<In>) -> vulcan_guest::Result<Json<Out>> {
    log::info!("adding {} and {}", input.a, input.b);
    Ok(Json(Out {
        sum: input.a + input.b,
    }))
}

vulcan_guest::workload!(run);
