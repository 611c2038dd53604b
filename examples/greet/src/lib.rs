//! Greets its input (a name, as a JSON string), logging at every level and printing to
//! stdout and stderr; returns the greeting.
use vulcan_guest::{Json, log};

fn run(Json(name): Json<String>) -> vulcan_guest::Result<String> {
    let meta = vulcan_guest::metadata();
    log::trace!("starting workload {}", meta.id);
    log::debug!("module {}", meta.module_hash);
    log::info!("greeting {name}");
    log::warn!("args {:?}", vulcan_guest::args());
    log::error!("env {:?}", vulcan_guest::env());
    println!("stdout: hello");
    eprintln!("stderr: hello");
    Ok(format!("Hello, {name}!"))
}

vulcan_guest::workload!(run);
