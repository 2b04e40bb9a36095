//! The web page in a real browser: starts the real `apex serve` (port 0, temp data dir,
//! `--template-stream-delay-ms 50` so runs last a few seconds) and runs
//! `tests/browser/chat.test.mjs`, which drives Debian's headless Chromium through
//! `playwright-core`: two users in two browser contexts at once, each page showing only its
//! own steps and answer (with that user's own spend), a WebSocket drop healed by `resume`,
//! a stopped run, the usage chart and a CSV upload. Screenshots and the script's log are
//! kept in `<target>/browser-artifacts/`.
//!
//! Needs `node`, `/usr/bin/chromium` (or the browser named by `APEX_CHROMIUM`) and
//! `tests/browser/node_modules` (`npm ci` there). When one is missing the test fails,
//! saying what to install (it never passes without running); `scripts/test.sh` leaves it
//! out, counted as skipped, except under `CI`.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The whole browser script, generously: it normally takes 20–40 s.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// What is missing to run the browser test, as install hints; empty when all is there.
fn missing_prerequisites(chromium: &Path, script_dir: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    let node = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !node.is_ok_and(|s| s.success()) {
        missing.push("node (apt-get install nodejs npm)".to_string());
    }
    if !chromium.exists() {
        missing.push(format!("{} (apt-get install chromium)", chromium.display()));
    }
    if !script_dir
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        missing.push(format!(
            "{}/node_modules (cd tests/browser && npm ci)",
            script_dir.display()
        ));
    }
    missing
}

fn start_server(data_dir: &Path) -> (KillOnDrop, String) {
    let mut command = support::serve_command(data_dir);
    command
        .args(["--template-stream-delay-ms", "50"])
        // Alerts tick at once and post to the test's receiver on loopback.
        .args(["--alert-poll-interval-ms", "100"])
        .arg("--webhook-allow-private-targets")
        .stderr(Stdio::inherit());
    let (child, address) = support::spawn_serve(command);
    (KillOnDrop(child), address)
}

#[test]
fn two_users_chat_in_two_browsers_and_each_sees_only_their_own_run() {
    let root = workspace_root();
    let script_dir = root.join("tests/browser");
    let chromium = std::env::var_os("APEX_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let missing = missing_prerequisites(&chromium, &script_dir);
    assert!(
        missing.is_empty(),
        "the browser test needs: {} (.ci/run installs them). To leave it out (counted as \
         skipped), run the suite with scripts/test.sh",
        missing.join(", ")
    );

    // <target>/tmp is CARGO_TARGET_TMPDIR; the artifacts go next to it.
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap_or(Path::new(env!("CARGO_TARGET_TMPDIR")))
        .join("browser-artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifact folder");
    let log_path = artifacts.join("browser-test.log");

    let data_dir = tempfile::tempdir().expect("temp dir");
    let (_server, address) = start_server(data_dir.path());

    let log = std::fs::File::create(&log_path).expect("log file");
    let mut script = KillOnDrop(
        Command::new("node")
            .arg(script_dir.join("chat.test.mjs"))
            .current_dir(&script_dir)
            .env("APEX_URL", &address)
            .env("APEX_CHROMIUM", &chromium)
            .env("APEX_ARTIFACTS", &artifacts)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start node"),
    );
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    let status = loop {
        if let Some(status) = script.0.try_wait().expect("wait for node") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    println!("{output}");
    println!("artifacts: {}", artifacts.display());
    let status = status.unwrap_or_else(|| {
        panic!("the browser script did not finish within {SCRIPT_TIMEOUT:?}:\n{output}")
    });
    assert!(status.success(), "the browser script failed:\n{output}");
    assert!(output.contains("BROWSER TEST OK"), "{output}");
    for screenshot in [
        "chat-alice.png",
        "chat-alice-stopped.png",
        "usage-alice.png",
    ] {
        let path = artifacts.join(screenshot);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        assert!(size > 10_000, "{} was saved", path.display());
    }
}
