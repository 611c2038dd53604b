//! Fails: parses its input as a number, so anything else returns an error.
fn run(input: String) -> vulcan_guest::Result<String> {
    vulcan_guest::log::warn!("about to parse {input:?}");
    let n: i64 = input.trim().parse()?;
    vulcan_guest::bail!("refusing to accept {n}")
}

vulcan_guest::workload!(run);
