//! The server crate's architecture, enforced: every module sits in a layer and imports only
//! from its own layer or below, and the top-level modules have no import cycle.
//!
//! Layers, bottom to top (the same order as `lib.rs`'s module map):
//! 0. leaves: ids, clock, settings, metric names, shutdown phases;
//! 1. infrastructure: the store, the LLM providers, limits, the event bus;
//! 2. one user's world: identity, the run context, the user-scoped store, usage, the
//!    emitter and event log, the API's views of records;
//! 3. the agents;
//! 4. the run machinery;
//! 5. the edges: HTTP, WebSocket, the web page, the shared state, the API error.
//!
//! The scan reads `crate::` paths in the code of every file under `src/` (comments and the
//! trailing `#[cfg(test)] mod tests` are left out). A new top-level module must be given a
//! layer here, so the map stays complete.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `(module path, layer)`. The longest matching prefix decides, so a submodule can sit
/// below its parent (the bus is infrastructure; the emitter built on it is per-user).
const LAYERS: &[(&str, u8)] = &[
    ("ids", 0),
    ("clock", 0),
    ("settings", 0),
    ("telemetry", 0),
    ("lifecycle", 0),
    ("store", 1),
    ("llm", 1),
    ("limits", 1),
    ("events::bus", 1),
    ("events::redis_bus", 1),
    ("auth", 2),
    ("context", 2),
    ("user_store", 2),
    ("usage", 2),
    ("gateway", 2),
    ("budgets", 2),
    ("teams", 2),
    ("events", 2),
    ("views", 2),
    ("agents", 3),
    ("run", 4),
    ("alerts", 4),
    ("http", 5),
    ("ws", 5),
    ("web", 5),
    ("state", 5),
    ("error", 5),
];

fn layer_of(path: &[String]) -> Option<u8> {
    let joined = path.join("::");
    LAYERS
        .iter()
        .filter(|(prefix, _)| joined == *prefix || joined.starts_with(&format!("{prefix}::")))
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|(_, layer)| *layer)
}

/// The code of a file: no comments, no trailing unit-test module.
fn code_of(source: &str) -> String {
    let source = match source.find("#[cfg(test)]\nmod tests") {
        Some(at) => &source[..at],
        None => source,
    };
    source
        .lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_at(chars: &[char], mut at: usize) -> (String, usize) {
    let start = at;
    while at < chars.len() && (chars[at].is_alphanumeric() || chars[at] == '_') {
        at += 1;
    }
    (chars[start..at].iter().collect(), at)
}

fn skip_space(chars: &[char], mut at: usize) -> usize {
    while at < chars.len() && chars[at].is_whitespace() {
        at += 1;
    }
    at
}

/// The items of a `{ ... }` group starting at `at` (which is `{`): each item's text.
fn group_items(chars: &[char], at: usize) -> Vec<String> {
    let mut items = Vec::new();
    let mut depth = 0;
    let mut current = String::new();
    for &c in &chars[at..] {
        match c {
            '{' => {
                depth += 1;
                if depth == 1 {
                    continue;
                }
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    items.push(std::mem::take(&mut current));
                    break;
                }
            }
            ',' if depth == 1 => {
                items.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    items.into_iter().filter(|i| !i.trim().is_empty()).collect()
}

/// The first two segments of every path a use-tree starting at `at` names.
fn tree_paths(chars: &[char], at: usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let at = skip_space(chars, at);
    if prefix.len() >= 2 {
        out.push(prefix);
        return;
    }
    if chars.get(at) == Some(&'{') {
        for item in group_items(chars, at) {
            let item: Vec<char> = item.trim().chars().collect();
            tree_paths(&item, 0, prefix.clone(), out);
        }
        return;
    }
    let (ident, next) = ident_at(chars, at);
    if ident.is_empty() || ident == "self" {
        if !prefix.is_empty() {
            out.push(prefix);
        }
        return;
    }
    let mut path = prefix;
    path.push(ident);
    if chars.get(next) == Some(&':') && chars.get(next + 1) == Some(&':') {
        tree_paths(chars, next + 2, path, out);
    } else {
        out.push(path);
    }
}

/// Every `crate::` path in `code`, as its first two segments.
fn crate_paths(code: &str) -> Vec<Vec<String>> {
    let chars: Vec<char> = code.chars().collect();
    let needle: Vec<char> = "crate::".chars().collect();
    let mut out = Vec::new();
    let mut at = 0;
    while at + needle.len() <= chars.len() {
        let preceded_by_ident = at > 0 && (chars[at - 1].is_alphanumeric() || chars[at - 1] == '_');
        if chars[at..at + needle.len()] == needle[..] && !preceded_by_ident {
            tree_paths(&chars, at + needle.len(), Vec::new(), &mut out);
            at += needle.len();
        } else {
            at += 1;
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir)
        .expect("readable source folder")
        .flatten()
    {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a source file: `src/run/mod.rs` → `run`, `src/events/bus.rs` →
/// `events::bus`. `lib.rs` is the root (no path).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).expect("file under src");
    let mut parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    parts
}

struct Scan {
    /// "file: imports X (layer n) from layer m" for every upward import.
    upward: Vec<String>,
    /// Top-level modules without a layer.
    unplaced: BTreeSet<String>,
    /// Imports between distinct top-level modules.
    edges: BTreeMap<String, BTreeSet<String>>,
}

fn scan(files: &[(Vec<String>, String, String)]) -> Scan {
    let mut scan = Scan {
        upward: Vec::new(),
        unplaced: BTreeSet::new(),
        edges: BTreeMap::new(),
    };
    for (module, name, source) in files {
        if module.is_empty() {
            continue; // lib.rs sits above every layer.
        }
        let Some(own) = layer_of(module) else {
            scan.unplaced.insert(module[0].clone());
            continue;
        };
        for path in crate_paths(&code_of(source)) {
            let Some(theirs) = layer_of(&path) else {
                continue; // a crate-root item, or a module the unplaced check reports.
            };
            if path[0] != module[0] {
                scan.edges
                    .entry(module[0].clone())
                    .or_default()
                    .insert(path[0].clone());
            }
            if theirs > own {
                scan.upward.push(format!(
                    "{name} (layer {own}) imports crate::{} (layer {theirs})",
                    path.join("::")
                ));
            }
        }
    }
    scan.upward.sort();
    scan.upward.dedup();
    scan
}

/// A cycle among the top-level modules, if any, as `a -> b -> a`.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, edges, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|node| visit(node, edges, &mut Vec::new(), &mut done))
}

fn server_sources() -> Vec<(Vec<String>, String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|file| {
            let source = std::fs::read_to_string(&file).expect("readable source file");
            let name = file
                .strip_prefix(&src)
                .expect("under src")
                .display()
                .to_string();
            (module_of(&src, &file), name, source)
        })
        .collect()
}

#[test]
fn the_scanner_reads_use_trees_and_inline_paths() {
    let code = code_of(
        "use crate::store::{Store, sqlite::SqliteStore};\n\
         use crate::{ids::RunId, run::{submit, Runs}};\n\
         // use crate::http::Nope;\n\
         fn f() { crate::telemetry::run_started(); apex_crate::x(); }\n",
    );
    let paths: BTreeSet<String> = crate_paths(&code).iter().map(|p| p.join("::")).collect();
    let expected: BTreeSet<String> = [
        "store::Store",
        "store::sqlite",
        "ids::RunId",
        "run::submit",
        "run::Runs",
        "telemetry::run_started",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(paths, expected);
}

#[test]
fn the_checker_catches_an_upward_import_and_a_cycle() {
    let files = vec![
        (
            vec!["store".to_string()],
            "store/mod.rs".to_string(),
            "use crate::auth::AuthenticatedUser;".to_string(),
        ),
        (
            vec!["auth".to_string()],
            "auth/mod.rs".to_string(),
            "use crate::store::Store;".to_string(),
        ),
        (
            vec!["newthing".to_string()],
            "newthing.rs".to_string(),
            String::new(),
        ),
    ];
    let scan = scan(&files);
    assert_eq!(
        scan.upward,
        vec!["store/mod.rs (layer 1) imports crate::auth::AuthenticatedUser (layer 2)"]
    );
    assert!(find_cycle(&scan.edges).is_some());
    assert!(scan.unplaced.contains("newthing"));
}

#[test]
fn every_module_imports_only_from_its_layer_or_below() {
    let scan = scan(&server_sources());
    assert!(
        scan.unplaced.is_empty(),
        "give these top-level modules a layer in tests/api/layers.rs: {:?}",
        scan.unplaced
    );
    assert!(
        scan.upward.is_empty(),
        "imports from a higher layer:\n{}",
        scan.upward.join("\n")
    );
}

#[test]
fn the_top_level_modules_have_no_import_cycle() {
    let scan = scan(&server_sources());
    if let Some(cycle) = find_cycle(&scan.edges) {
        panic!("import cycle: {}", cycle.join(" -> "));
    }
}
