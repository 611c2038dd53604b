//! Greets its input (a name, as a JSON string), logging at every level and printing to
//! stdout and stderr; returns the greeting.
use vulcan_guest::{Json, log};

fn run(Json(name): Json<String>) -> vulcan_guest::Result<String> {
    let meta = vulcan_guest::metadata();
    log::trace!("trace: starting workload {}", meta.id);
    log::debug!("debug: module {}", meta.module_hash);
    log::info!("info: greeting {name}");
    log::warn!("warn: args {:?}", vulcan_guest::args());
    log::error!("error: env {:?}", vulcan_guest::env());
    println!("stdout: hello");
    eprintln!("stderr: hello");
    Ok(format!("Hello, {name}!"))
}

vulcan_guest::workload!(run);
