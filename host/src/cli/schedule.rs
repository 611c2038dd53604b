//! `vulcan schedule add|ls|get|rm|pause|resume`: a server's schedules.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::client::Client;

/// What `vulcan schedule` does.
#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Make a schedule: upload MODULE and run it at every tick of CRON.
    Add(AddArgs),
    /// List the schedules.
    Ls,
    /// Show one schedule: its last and next firing and latest workloads.
    Get {
        /// Its name
        name: String,
    },
    /// Delete a schedule (its workloads stay).
    Rm {
        /// Its name
        name: String,
    },
    /// Pause a schedule: its ticks do nothing.
    Pause {
        /// Its name
        name: String,
    },
    /// Resume a paused schedule from its next tick (missed ticks are not
    /// caught up).
    Resume {
        /// Its name
        name: String,
    },
}

/// Arguments of `vulcan schedule add`.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// Its name (letters, digits, -, _, .)
    name: String,
    /// A cron expression: 5 fields, or 6 with seconds first (e.g. "*/10 * * * * *")
    #[arg(long)]
    cron: String,
    /// The IANA time zone the expression is read in (default UTC)
    #[arg(long)]
    timezone: Option<String>,
    /// What a tick does while the previous firing's workload still runs:
    /// skip (default), queue or allow
    #[arg(long, default_value = "skip")]
    overlap: String,
    /// Set an environment variable for the guest (repeatable)
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = super::parse::env_pair)]
    env: Vec<(String, String)>,
    /// The module (.wasm) to upload and run, or a stored module's sha256:HASH
    module: String,
    /// Arguments passed to the guest (after `--`)
    #[arg(last = true)]
    args: Vec<String>,
}

/// Runs a `vulcan schedule` command against `client`'s server.
pub async fn run(client: &Client, command: ScheduleCommand) -> anyhow::Result<ExitCode> {
    match command {
        ScheduleCommand::Add(args) => add(client, args).await,
        ScheduleCommand::Ls => ls(client).await,
        ScheduleCommand::Get { name } => {
            let s: Value = client.get(&path(&name, "")).await?;
            println!("{}", serde_json::to_string_pretty(&s)?);
            Ok(ExitCode::SUCCESS)
        }
        ScheduleCommand::Rm { name } => {
            client
                .call(reqwest::Method::DELETE, &path(&name, ""), None)
                .await?;
            println!("deleted {name}");
            Ok(ExitCode::SUCCESS)
        }
        ScheduleCommand::Pause { name } => toggle(client, &name, "pause").await,
        ScheduleCommand::Resume { name } => toggle(client, &name, "resume").await,
    }
}

fn path(name: &str, action: &str) -> String {
    let name: String = form_urlencoded::byte_serialize(name.as_bytes()).collect();
    format!("/v1/schedules/{name}{action}")
}

async fn add(client: &Client, args: AddArgs) -> anyhow::Result<ExitCode> {
    let path = PathBuf::from(&args.module);
    let (module, argv0) = match args.module.starts_with("sha256:") {
        true => (args.module.clone(), None),
        false => {
            let bytes = super::parse::read_module(&path)?;
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            (client.upload(bytes).await?, name)
        }
    };
    let env: serde_json::Map<String, Value> = (args.env.into_iter())
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let body = json!({
        "name": args.name,
        "cron": args.cron,
        "timezone": args.timezone,
        "overlap": args.overlap,
        "spec": {"module": module, "argv0": argv0, "args": args.args, "env": env},
    });
    let made = client
        .call(reqwest::Method::POST, "/v1/schedules", Some(body))
        .await?;
    println!("{}", line(&made));
    Ok(ExitCode::SUCCESS)
}

async fn ls(client: &Client) -> anyhow::Result<ExitCode> {
    let list: Value = client.get("/v1/schedules").await?;
    let items = list["items"].as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        println!("no schedules");
    }
    for s in &items {
        println!("{}", line(s));
    }
    Ok(ExitCode::SUCCESS)
}

async fn toggle(client: &Client, name: &str, action: &str) -> anyhow::Result<ExitCode> {
    let s = client
        .call(
            reqwest::Method::POST,
            &path(name, &format!("/{action}")),
            None,
        )
        .await?;
    println!("{}", line(&s));
    Ok(ExitCode::SUCCESS)
}

/// One schedule on one line: name, state, expression, next firing.
fn line(s: &Value) -> String {
    let state = match s["paused"] == true {
        true => "paused",
        false => "active",
    };
    format!(
        "{}  {state}  \"{}\"{}  overlap={}  next={}  last={}",
        s["name"].as_str().unwrap_or("?"),
        s["cron"].as_str().unwrap_or("?"),
        s["timezone"]
            .as_str()
            .map(|t| format!(" ({t})"))
            .unwrap_or_default(),
        s["overlap"].as_str().unwrap_or("?"),
        s["next_fire_at"].as_str().unwrap_or("-"),
        s["last_fired_at"].as_str().unwrap_or("-"),
    )
}
