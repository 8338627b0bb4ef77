//! The modules of the agent and the vault depend on each other in one
//! direction only: no cycle among a crate's top-level modules (a module's
//! own submodules count as part of it). A dependency is a `crate::MODULE`
//! path in code (comments aside). A new cycle fails here, naming it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `module → modules it names`, for the crate whose sources are in `src`.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeSet<String> = std::fs::read_dir(src)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            let stem = p.file_stem()?.to_str()?.to_string();
            // A module is `m.rs` or a directory `m/` with `mod.rs`.
            let module =
                (p.extension().is_some_and(|x| x == "rs") && stem != "lib" && stem != "main")
                    || p.join("mod.rs").is_file();
            module.then_some(stem)
        })
        .collect();
    let mut g = BTreeMap::new();
    for m in &modules {
        let mut files: Vec<PathBuf> = vec![src.join(format!("{m}.rs"))]
            .into_iter()
            .filter(|f| f.is_file())
            .collect();
        rust_files(&src.join(m), &mut files);
        let mut deps = BTreeSet::new();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for (i, _) in line.match_indices("crate::") {
                    let name: String = line[i + 7..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if name != *m && modules.contains(&name) {
                        deps.insert(name);
                    }
                }
            }
        }
        g.insert(m.clone(), deps);
    }
    g
}

/// A cycle of `g`, if it has one, as the path around it.
fn cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        m: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut c = path[at..].to_vec();
            c.push(m.to_string());
            return Some(c);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for d in g.get(m).into_iter().flatten() {
            if let Some(c) = visit(g, d, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in g.keys() {
        if let Some(c) = visit(g, m, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

fn crate_src(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(name)
        .join("src")
}

#[test]
fn agent_and_vault_modules_have_no_cycle() {
    for (name, dir_module) in [("siterec-agent", "target"), ("siterec-vault", "persist")] {
        let g = graph(&crate_src(name));
        assert!(g.len() > 5, "{name}: modules not found: {g:?}");
        // Modules that are directories (`m/mod.rs`) count too.
        assert!(
            g.get(dir_module).is_some_and(|d| !d.is_empty()),
            "{name}: module {dir_module} missing or depending on nothing: {g:?}"
        );
        if let Some(c) = cycle(&g) {
            panic!(
                "{name}: modules depend on each other in a cycle: {}",
                c.join(" → ")
            );
        }
    }
}

/// The checker finds cycles: the edges the agent had before its split
/// (the source and its VM capture used each other; the page records took
/// the block size from the source).
#[test]
fn a_cycle_is_found_and_named() {
    let mut g = graph(&crate_src("siterec-agent"));
    assert!(g["source"].contains("vm"), "{:?}", g["source"]);
    assert!(!g["vm"].contains("source"), "{:?}", g["vm"]);
    g.get_mut("vm").unwrap().insert("source".into());
    let c = cycle(&g).expect("a cycle");
    assert!(
        c.join(" ").contains("source") && c.join(" ").contains("vm"),
        "{c:?}"
    );
    assert_eq!(c.first(), c.last());
}
