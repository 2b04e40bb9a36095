//! Starting the real `apex serve` binary for the tests of this crate (one copy, shared by
//! every test binary through `mod support;`).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// `apex serve` on `data_dir`, on a free loopback port, with the template writer and
/// warnings-only logs. Add arguments, variables or a stderr target, then [`spawn_serve`].
pub fn serve_command(data_dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_apex"));
    command
        .args(["serve", "--bind", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data_dir)
        // A variable, not a flag, so that a test may still pass `--llm-provider`.
        .env("APEX_LLM_PROVIDER", "template")
        .env("APEX_LOG", "warn")
        .stdout(Stdio::piped());
    command
}

/// Starts `command` and reads its first line, `listening on http://127.0.0.1:PORT`.
/// Returns the process and its base URL.
pub fn spawn_serve(mut command: Command) -> (Child, String) {
    let mut child = command.spawn().expect("start apex serve");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the listening line");
    let address = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("expected the listening line, got {line:?}"))
        .to_string();
    assert!(
        address.starts_with("http://127.0.0.1:") && !address.ends_with(":0"),
        "{address}"
    );
    (child, address)
}
