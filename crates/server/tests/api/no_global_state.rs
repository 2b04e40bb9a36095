//! Guard against the original system's bug class: process-global mutable state.
//!
//! Scans every Rust source file of the workspace and fails on a `static` holding a lock,
//! a cell, a lazily-initialised value or a map, on `lazy_static!`/`thread_local!`, and on
//! `static mut`. Per-user state must live in a request's context or a connection's task.

use std::path::{Path, PathBuf};

const FORBIDDEN_TYPES: &[&str] = &[
    "Mutex", "RwLock", "RefCell", "Cell<", "OnceLock", "OnceCell", "Lazy", "LazyLock", "HashMap",
    "BTreeMap", "DashMap", "Atomic",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() {
            if name != "target" && name != ".git" {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Returns "file:line: text" for every forbidden declaration in `source`.
fn violations(file: &str, source: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (number, line) in source.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("").trim();
        let declares_static = code.starts_with("static ")
            || code.starts_with("pub static ")
            || (code.starts_with("pub(") && code.contains(") static "));
        let bad = code.contains("static mut ")
            || code.contains("lazy_static!")
            || code.contains("thread_local!")
            || (declares_static && FORBIDDEN_TYPES.iter().any(|t| code.contains(t)));
        if bad {
            found.push(format!("{file}:{}: {code}", number + 1));
        }
    }
    found
}

#[test]
fn the_checker_catches_global_state() {
    let sample = "static USERS: Mutex<HashMap<u32, String>> = todo!();\n\
                  pub(crate) static CACHE: OnceLock<Foo> = OnceLock::new();\n\
                  const OK: &str = \"static X: Mutex\";\n\
                  static NAMES: &[&str] = &[];\n";
    let found = violations("sample.rs", sample);
    assert_eq!(found.len(), 2, "{found:?}");
}

#[test]
fn no_process_global_mutable_state_in_the_workspace() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    rust_files(&root.join("crates"), &mut files);
    assert!(
        files.len() > 20,
        "expected to scan the workspace, found {} files",
        files.len()
    );
    let this_file = Path::new(file!()).file_name().unwrap();
    let mut found = Vec::new();
    for file in files.iter().filter(|f| f.file_name() != Some(this_file)) {
        let source = std::fs::read_to_string(file).unwrap();
        found.extend(violations(&file.display().to_string(), &source));
    }
    assert!(
        found.is_empty(),
        "process-global mutable state found:\n{}",
        found.join("\n")
    );
}
