//! The toolkit knows the ports, not the engines: outside the SQLite module,
//! no source file of the toolkit holds PostgreSQL's SQL or asks which
//! engine it runs on. What differs between engines lives behind
//! `tandem::sql::EngineSql`, implemented in each engine's module or crate.

use std::path::{Path, PathBuf};

/// Words only PostgreSQL's SQL (or a branch on the engine) would use.
const ENGINE_ONLY: [&str; 12] = [
    "pg_",
    "jsonb",
    "::bigint",
    ")::text",
    "BIGSERIAL",
    "BYTEA",
    "LATERAL",
    "$tandem$",
    "fillfactor",
    "FOR UPDATE",
    "Dialect::",
    ".dialect()",
];

/// Where engine-specific code belongs in this crate.
const ENGINE_MODULE: &str = "sqlite";

fn sources(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read the source directory") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, found);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            found.push(path);
        }
    }
}

/// `(file, line number, word)` of every engine-only word outside the
/// engine's module. `store.rs` defines `Dialect` itself and may name it.
fn violations(root: &Path) -> Vec<(String, usize, &'static str)> {
    let mut files = Vec::new();
    sources(root, &mut files);
    files.sort();
    let mut found = Vec::new();
    for file in files {
        let relative = file.strip_prefix(root).expect("under the root");
        if relative.starts_with(ENGINE_MODULE) {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read a source file");
        for (number, line) in text.lines().enumerate() {
            for word in ENGINE_ONLY {
                let defining = relative == Path::new("store.rs") && word == "Dialect::";
                if line.contains(word) && !defining {
                    found.push((relative.display().to_string(), number + 1, word));
                }
            }
        }
    }
    found
}

#[test]
fn no_engine_specific_sql_outside_the_engine_modules() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = violations(&root);
    assert!(
        found.is_empty(),
        "engine-specific SQL or an engine branch outside crates/tandem/src/{ENGINE_MODULE}/ \
         (put it behind tandem::sql::EngineSql, in the engine's module or crate): {found:?}"
    );
}

#[test]
fn the_check_finds_what_it_looks_for() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join(ENGINE_MODULE)).unwrap();
    std::fs::write(
        dir.path().join("outbox.rs"),
        "fn f() {}\nconst Q: &str = \"SELECT pg_current_xact_id()\";\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join(ENGINE_MODULE).join("sql.rs"),
        "const Q: &str = \"SELECT jsonb_array_elements($1::text::jsonb)\";\n",
    )
    .unwrap();
    assert_eq!(
        violations(dir.path()),
        vec![("outbox.rs".to_owned(), 2, "pg_")]
    );
}
