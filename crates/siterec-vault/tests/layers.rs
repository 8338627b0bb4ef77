//! The vault's layers, checked in its sources: SQL only in the persistence
//! modules (`src/persist/`) and the database backend (`src/db.rs`), and no
//! answer built by hand as JSON (`json!`) outside them either — answers
//! are `siterec-api` and `siterec_core::wire` types. Tests inside a module
//! (after its `#[cfg(test)]`) may do both.

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file's code before its unit tests.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    match text.find("#[cfg(test)]") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

#[test]
fn sql_and_hand_built_json_stay_in_their_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    let persistence = |p: &Path| p.starts_with(src.join("persist")) || p == src.join("db.rs");
    let mut found = Vec::new();
    let mut checked = 0;
    for f in &files {
        if persistence(f) {
            continue;
        }
        checked += 1;
        for (n, line) in code(f).lines().enumerate() {
            for needle in [
                "sqlx::query",
                "sqlx::raw_sql",
                "query_as(",
                "query_scalar(",
                "json!(",
            ] {
                if line.contains(needle) {
                    found.push(format!(
                        "{}:{}: {}",
                        f.strip_prefix(&src).unwrap().display(),
                        n + 1,
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(
        checked >= 5,
        "only {checked} files checked: is the source tree where it was?"
    );
    assert!(
        found.is_empty(),
        "SQL or hand-built JSON outside the persistence layer:\n{}",
        found.join("\n")
    );
}
