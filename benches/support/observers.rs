//! The observers file the in-process benchmarks match against: 20 entity types × 5 observers
//! each, half of them with a condition, after whatever observers a benchmark puts first.

use std::fmt::Write as _;

use fraiseql_observers::config::{Format, LoadOptions, MissingEnv};
use fraiseql_observers::matcher::Matcher;
use fraiseql_observers::observers::load_str;

/// A matcher over `first` (observer entries in YAML, possibly empty) and the 100 observers.
pub fn large_config(first: &str) -> Matcher {
    let mut yaml = format!("observers:\n{first}");
    for entity in 0..20 {
        for observer in 0..5 {
            let _ = writeln!(
                yaml,
                "  - name: e{entity}-o{observer}\n    entity: Entity{entity}\n    events: [insert, update]"
            );
            if observer % 2 == 0 {
                let _ = writeln!(
                    yaml,
                    "    condition: \"data.total > {} && field_changed('status')\"",
                    observer * 100
                );
            }
            let _ = writeln!(
                yaml,
                "    actions: [{{type: webhook, url: 'http://127.0.0.1:9/x'}}]"
            );
        }
    }
    let no_env = |_: &str| None;
    let options = LoadOptions {
        env: &no_env,
        missing_env: MissingEnv::Warn,
    };
    Matcher::new(
        load_str(&yaml, Format::Yaml, "bench.yaml", &options)
            .unwrap()
            .observers,
    )
}
