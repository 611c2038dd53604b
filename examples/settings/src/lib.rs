//! Repeats a word: the word is its input, as text (`--input @word.txt`), how often comes from
//! the setting `TIMES` (default 2), and `SEPARATOR` joins them. Logs through
//! the standard `log` crate, as a dependency would; refuses an empty word and
//! more than 100 repetitions with the SDK's re-exported error macros.
use vulcan_guest::{bail, config_or, ensure, env_var};

fn run(word: String) -> vulcan_guest::Result<String> {
    let times: u32 = config_or("TIMES", 2)?;
    let separator = env_var("SEPARATOR").unwrap_or_else(|| " ".into());
    log::info!(target: "settings::repeat", "repeating {word:?} {times} times");
    vulcan_guest::log::debug!(times = times, separator = separator; "settings read");
    ensure!(times <= 100, "TIMES is {times}; at most 100 repetitions");
    if word.trim().is_empty() {
        bail!("nothing to repeat: the input is empty");
    }
    Ok(vec![word.trim(); times as usize].join(&separator))
}

vulcan_guest::workload!(run);
