//! Sends many GET requests at once and counts how they ended. Input:
//! `{"urls": ["https://a.example.com/", …]}`, or `{"url": "…", "count": N}`
//! for N requests to one URL. The host keeps a bounded number in flight per
//! workload and node; the rest wait for a place within the run's timeout.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vulcan_guest::{Json, http, log};

#[derive(Deserialize)]
struct FanOut {
    #[serde(default)]
    urls: Vec<String>,
    url: Option<String>,
    #[serde(default)]
    count: usize,
}

#[derive(Serialize)]
struct Outcome {
    /// Responses by status code.
    statuses: BTreeMap<u16, usize>,
    /// Requests that failed, by the first words of their error.
    errors: BTreeMap<String, usize>,
}

fn run(Json(job): Json<FanOut>) -> vulcan_guest::Result<Json<Outcome>> {
    let mut urls = job.urls;
    if let Some(url) = job.url {
        urls.extend(std::iter::repeat_n(url, job.count));
    }
    log::info!(requests = urls.len(); "sending");
    let mut outcome = Outcome {
        statuses: BTreeMap::new(),
        errors: BTreeMap::new(),
    };
    for answer in http::send_all(urls.iter().map(|u| http::Request::get(u))) {
        match answer {
            Ok(response) => *outcome.statuses.entry(response.status).or_default() += 1,
            Err(e) => *outcome.errors.entry(e.to_string()).or_default() += 1,
        }
    }
    Ok(Json(outcome))
}

vulcan_guest::workload!(run);
