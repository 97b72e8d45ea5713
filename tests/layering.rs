//! The module layering of `src/`, as ARCHITECTURE.md states it: every top-level module has a
//! place in one ordered list, grouped in layers, and may refer only to modules placed before it.
//! That makes import cycles impossible; this test reads every `crate::<module>` path in the code
//! (comments left out, `#[cfg(test)] mod tests` included, since a test-only back-edge is still a
//! tangle) and fails on a module missing from the list, on a forbidden reference, and — for a
//! readable message — names any cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layers from the bottom up; inside a layer, a module may use the ones listed before it.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "vocabulary",
        &[
            "error",
            "escape",
            "domain",
            "lease",
            "redis_client",
            "condition",
            "template",
            "config",
            "retry",
            "outcome",
            "metrics",
            "metrics_text",
        ],
    ),
    (
        "stores",
        &[
            "database",
            "migrate",
            "history",
            "dlq",
            "jobs",
            "checkpoint",
            "membership",
            "change_log",
            "backfill",
            "dedup",
            "breaker",
            "limits",
            "concurrency",
            "cache",
        ],
    ),
    (
        "pipeline",
        &[
            "actions",
            "observers",
            "matcher",
            "executor",
            "worker",
            "listener",
            "replay",
            "requeue",
            "history_export",
        ],
    ),
    ("node", &["cluster", "coordinator", "control"]),
    ("adapters", &["grpc", "http", "report", "commands"]),
    ("assembly", &["node", "demo"]),
];

/// Each table of the service and the one module whose code names it (has SQL for it).
const TABLE_OWNERS: &[(&str, &str)] = &[
    ("fraiseql_observers.partitions", "checkpoint"),
    ("fraiseql_observers.processed_actions", "checkpoint"),
    ("fraiseql_observers.nodes", "membership"),
    ("fraiseql_observers.cluster", "membership"),
    ("fraiseql_observers.coordinator", "membership"),
    ("fraiseql_observers.jobs", "jobs"),
    ("fraiseql_observers.jobs_completed", "jobs"),
    ("fraiseql_observers.dead_letters", "dlq"),
    ("fraiseql_observers.history", "history"),
    ("fraiseql_observers.history_export", "history"),
    ("core.tb_entity_change_log", "change_log"),
    ("fraiseql_observers.backfill_runs", "backfill"),
    ("fraiseql_observers.replay_runs", "replay"),
];

/// The modules that are not layered: the crate roots.
const ROOTS: &[&str] = &["lib", "main"];

fn source_files(directory: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(directory).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            source_files(&path, files);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            files.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to.
fn module_of(source: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(source).unwrap();
    let first = relative.components().next().unwrap().as_os_str();
    first.to_string_lossy().trim_end_matches(".rs").to_owned()
}

/// Every module named after `crate::` in `text`, comments left out.
fn referenced_modules(text: &str) -> BTreeSet<String> {
    let mut referenced = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(start) = rest.find("crate::") {
            rest = &rest[start + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|character| character.is_ascii_alphanumeric() || *character == '_')
                .collect();
            assert!(
                !rest.starts_with('{'),
                "grouped `crate::{{…}}` imports are not read by this check: {line}"
            );
            if !name.is_empty() {
                referenced.insert(name);
            }
        }
    }
    referenced
}

fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&source, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let module = module_of(&source, file);
        let text = std::fs::read_to_string(file).unwrap();
        let edges = graph.entry(module.clone()).or_default();
        edges.extend(
            referenced_modules(&text)
                .into_iter()
                .filter(|target| *target != module),
        );
    }
    graph
}

/// The cycles of `graph` (strongly connected components of more than one module).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    // Reachability by repeated search: the graph has a few dozen nodes.
    let reachable = |from: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_owned()];
        while let Some(node) = stack.pop() {
            for next in graph.get(&node).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let mut components: Vec<BTreeSet<String>> = Vec::new();
    for node in graph.keys() {
        if components.iter().any(|component| component.contains(node)) {
            continue;
        }
        let forward = reachable(node);
        let component: BTreeSet<String> = forward
            .iter()
            .filter(|other| reachable(other).contains(node))
            .cloned()
            .collect();
        if component.len() > 1 {
            components.push(component);
        }
    }
    components
}

#[test]
fn src_has_no_import_cycles_and_every_reference_points_down() {
    let graph = module_graph();
    let rank: BTreeMap<&str, (usize, &str)> = LAYERS
        .iter()
        .flat_map(|(layer, modules)| modules.iter().map(move |module| (*module, *layer)))
        .enumerate()
        .map(|(index, (module, layer))| (module, (index, layer)))
        .collect();

    let mut problems = Vec::new();
    for component in cycles(&graph) {
        problems.push(format!("import cycle between {component:?}"));
    }
    for (module, targets) in &graph {
        if ROOTS.contains(&module.as_str()) {
            continue;
        }
        let Some(&(own_rank, own_layer)) = rank.get(module.as_str()) else {
            problems.push(format!(
                "module `{module}` has no place in the layering (tests/layering.rs and ARCHITECTURE.md)"
            ));
            continue;
        };
        for target in targets {
            match rank.get(target.as_str()) {
                None if graph.contains_key(target) => problems.push(format!(
                    "`{module}` uses `{target}`, which has no place in the layering"
                )),
                Some(&(target_rank, target_layer)) if target_rank >= own_rank => {
                    problems.push(format!(
                        "`{module}` ({own_layer}) uses `{target}` ({target_layer}), which comes after it"
                    ));
                }
                None | Some(_) => {}
            }
        }
    }
    for module in rank.keys() {
        if !graph.contains_key(*module) {
            problems.push(format!(
                "the layering lists `{module}`, which is not in src/"
            ));
        }
    }
    let edges: usize = graph.values().map(BTreeSet::len).sum();
    println!(
        "{} modules, {edges} references between them, {} cycles",
        graph.len(),
        cycles(&graph).len()
    );
    assert!(
        problems.is_empty(),
        "layering broken:\n  {}",
        problems.join("\n  ")
    );
}

/// Where `table` is named in code (comments left out) in `text`.
fn names_table(text: &str, table: &str) -> bool {
    text.lines().any(|line| {
        let code = line.split("//").next().unwrap_or("");
        code.match_indices(table).any(|(start, _)| {
            !code[start + table.len()..]
                .chars()
                .next()
                .is_some_and(|next| next.is_ascii_alphanumeric() || next == '_')
        })
    })
}

#[test]
fn every_table_is_named_by_its_owner_only() {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&source, &mut files);
    let mut problems = Vec::new();
    for (table, owner) in TABLE_OWNERS {
        let mut named_by = BTreeSet::new();
        for file in &files {
            if names_table(&std::fs::read_to_string(file).unwrap(), table) {
                named_by.insert(module_of(&source, file));
            }
        }
        if !named_by.contains(*owner) {
            problems.push(format!(
                "{table}: its owner `{owner}` does not name it (stale list?)"
            ));
        }
        named_by.remove(*owner);
        if !named_by.is_empty() {
            problems.push(format!(
                "{table} is owned by `{owner}` but also named by {named_by:?}"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "table ownership broken:\n  {}",
        problems.join("\n  ")
    );
    assert!(names_table(
        "FROM fraiseql_observers.jobs AS job",
        "fraiseql_observers.jobs"
    ));
    assert!(!names_table(
        "'fraiseql_observers.jobs_ready_idx'",
        "fraiseql_observers.jobs"
    ));
    assert!(!names_table(
        "// fraiseql_observers.jobs",
        "fraiseql_observers.jobs"
    ));
}

#[test]
fn the_check_sees_a_back_edge_and_a_cycle() {
    let mut graph = module_graph();
    graph
        .get_mut("domain")
        .unwrap()
        .insert("executor".to_owned());
    let found = cycles(&graph);
    assert!(
        found
            .iter()
            .any(|component| component.contains("domain") && component.contains("executor")),
        "{found:?}"
    );
    assert_eq!(
        referenced_modules("use crate::config::X; // crate::node\nlet a = crate::dlq::f();"),
        BTreeSet::from(["config".to_owned(), "dlq".to_owned()])
    );
}
