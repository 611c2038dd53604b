//! Reshapes `{"users":[{"name":"Ada","age":36},…]}` into
//! `{"count":N,"names":["Ada",…],"oldest":"…"}`.
use serde_json::{Value, json};
use vulcan_guest::Json;

fn run(Json(doc): Json<Value>) -> vulcan_guest::Result<Json<Value>> {
    let users = doc["users"]
        .as_array()
        .ok_or_else(|| vulcan_guest::Error::msg("expected {\"users\": [...]}"))?;
    let names: Vec<&str> = users.iter().filter_map(|u| u["name"].as_str()).collect();
    let oldest = users
        .iter()
        .max_by_key(|u| u["age"].as_i64().unwrap_or(i64::MIN))
        .and_then(|u| u["name"].as_str());
    println!("transformed {} users", users.len());
    Ok(Json(json!({ "count": users.len(), "names": names, "oldest": oldest })))
}

vulcan_guest::workload!(run);
