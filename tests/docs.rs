//! The operator docs cannot drift from the code: `docs/configuration.md` must list every flag and
//! environment variable of every subcommand (read from the built binary's `--help`) and every key
//! of every section of the observers file (read from the loader's own "unknown key" errors, by
//! planting an unknown key in each section); the docs may cite no flag the binary lacks; and the
//! runbook may cite no metric or alert that does not exist, and must cover every alert.
//!
//! Subcommands, action types and nested sections are discovered from the binary, so a new one is
//! covered without editing this test. Each failure says what is missing or extra and where.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::{Value, json};

const CONFIGURATION: &str = "docs/configuration.md";
const RUNBOOK: &str = "docs/runbook.md";
const MIGRATION: &str = "docs/migrating-from-fraiseql.md";

fn binary(arguments: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
        .args(arguments)
        .env("RUST_LOG", "off")
        .env("NO_COLOR", "1")
        .env_remove("REDIS_URL")
        .env_remove("FRAISEQL_OBSERVERS_REDIS_PREFIX")
        .output()
        .expect("the binary runs")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|error| panic!("read {path}: {error}"))
}

fn fail_with(problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{} problem(s):\n  - {}",
        problems.len(),
        problems.join("\n  - ")
    );
}

// ---- flags --------------------------------------------------------------------------------

fn help(command: &[String]) -> String {
    let mut arguments: Vec<&str> = command.iter().map(String::as_str).collect();
    arguments.push("--help");
    let output = binary(&arguments);
    assert!(
        output.status.success(),
        "`fraiseql-observers {}` failed: {}",
        arguments.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("help is UTF-8")
}

/// The names under `Commands:` (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|line| line.trim() != "Commands:")
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

/// Every command path (`[]` is the binary itself) with its `--help` text.
fn commands() -> Vec<(Vec<String>, String)> {
    let mut found = Vec::new();
    let mut pending = vec![Vec::new()];
    while let Some(command) = pending.pop() {
        let text = help(&command);
        for name in subcommands(&text) {
            let mut child = command.clone();
            child.push(name);
            pending.push(child);
        }
        found.push((command, text));
    }
    found.sort();
    found
}

/// One option of a `--help`: its long flag, aliases and environment variable.
#[derive(Debug)]
struct HelpOption {
    names: Vec<String>,
    env: Option<String>,
}

fn flag_token(token: &str) -> Option<String> {
    let rest = token.strip_prefix("--")?;
    let name: String = rest
        .chars()
        .take_while(|character| character.is_ascii_alphanumeric() || *character == '-')
        .collect();
    (name.len() > 1 && name.starts_with(|first: char| first.is_ascii_alphabetic()))
        .then(|| format!("--{name}"))
}

/// Every `--flag` written anywhere in `text`.
fn flags_in(text: &str) -> Vec<String> {
    text.split(|character: char| !(character.is_ascii_alphanumeric() || "-_".contains(character)))
        .filter_map(flag_token)
        .collect()
}

fn env_in(block: &str) -> Option<String> {
    let start = block.find("[env: ")? + "[env: ".len();
    let name: String = block[start..]
        .chars()
        .take_while(|character| character.is_ascii_alphanumeric() || *character == '_')
        .collect();
    (!name.is_empty()).then_some(name)
}

/// The options of one `--help` (short and long formats: a block runs from an option line to the
/// next option line or section header).
fn options(help: &str) -> Vec<HelpOption> {
    let mut blocks: Vec<String> = Vec::new();
    let mut in_options = false;
    for line in help.lines() {
        if !line.starts_with(' ') && !line.trim().is_empty() {
            in_options = line.trim_end() == "Options:";
            continue;
        }
        if !in_options {
            continue;
        }
        if line.trim_start().starts_with('-') {
            blocks.push(line.to_owned());
        } else if let Some(block) = blocks.last_mut() {
            block.push('\n');
            block.push_str(line);
        }
    }
    blocks
        .iter()
        .filter_map(|block| {
            let first_line = block.lines().next().unwrap_or_default();
            let flag = first_line.split_whitespace().find_map(flag_token)?;
            let mut names = vec![flag];
            for marker in ["[alias: ", "[aliases: "] {
                if let Some(start) = block.find(marker) {
                    let end = block[start..]
                        .find(']')
                        .map_or(block.len(), |end| start + end);
                    names.extend(flags_in(&block[start..end]));
                }
            }
            Some(HelpOption {
                names,
                env: env_in(block),
            })
        })
        .collect()
}

fn command_name(command: &[String]) -> String {
    if command.is_empty() {
        "fraiseql-observers".to_owned()
    } else {
        command.join(" ")
    }
}

/// The text after each `<!-- {kind}: NAME -->` marker, up to the next marker or heading.
fn marked_sections(document: &str, kind: &str) -> BTreeMap<String, Vec<(usize, String)>> {
    let mut sections: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
    let mut current: Option<String> = None;
    let opening = format!("<!-- {kind}: ");
    for (index, line) in document.lines().enumerate() {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix(&opening) {
            let name = rest.trim_end_matches("-->").trim().to_owned();
            sections.entry(name.clone()).or_default();
            current = Some(name);
            continue;
        }
        if trimmed.starts_with("<!-- ") || trimmed.starts_with('#') {
            current = None;
            continue;
        }
        if let Some(name) = &current {
            sections
                .get_mut(name)
                .expect("section exists")
                .push((index + 1, line.to_owned()));
        }
    }
    sections
}

fn line_has_flag(line: &str, flag: &str) -> bool {
    flags_in(line).iter().any(|found| found == flag)
}

#[test]
fn every_flag_and_environment_variable_of_every_subcommand_is_documented() {
    let document = read(CONFIGURATION);
    let sections = marked_sections(&document, "flags");
    let commands = commands();
    assert!(
        commands.len() > 5,
        "found only {} commands in --help: the parser of `Commands:` is broken",
        commands.len()
    );
    let mut problems = Vec::new();
    for (command, text) in &commands {
        let name = command_name(command);
        // A flag is documented in its command's section or an ancestor's (global options in
        // `fraiseql-observers`, `dlq`'s `--database-url` for every `dlq …`).
        let searched: Vec<String> = (0..=command.len())
            .rev()
            .map(|depth| command_name(&command[..depth]))
            .filter(|ancestor| sections.contains_key(ancestor))
            .collect();
        if !sections.contains_key(&name) {
            let flags: Vec<String> = options(text)
                .into_iter()
                .map(|option| option.names[0].clone())
                .filter(|flag| flag != "--help" && flag != "--version")
                .collect();
            problems.push(format!(
                "{CONFIGURATION} has no `<!-- flags: {name} -->` section for the command `{name}`: add one with a table row for each of its flags ({})",
                flags.join(", ")
            ));
        }
        for option in options(text) {
            let flag = &option.names[0];
            if flag == "--help" || flag == "--version" {
                continue;
            }
            let rows: Vec<&(usize, String)> = searched
                .iter()
                .flat_map(|section| &sections[section])
                .filter(|(_, line)| line_has_flag(line, flag))
                .collect();
            if rows.is_empty() {
                problems.push(format!(
                    "`{name} --help` has {flag}{} but {CONFIGURATION} does not mention it in the `<!-- flags: {name} -->` section (or a parent command's): add a row `| `{flag}` | {} | default | meaning |`",
                    option
                        .env
                        .as_ref()
                        .map(|env| format!(" [env: {env}]"))
                        .unwrap_or_default(),
                    option
                        .env
                        .as_ref()
                        .map_or_else(|| "—".to_owned(), |env| format!("`{env}`")),
                ));
                continue;
            }
            for alias in &option.names[1..] {
                if !rows.iter().any(|(_, line)| line_has_flag(line, alias)) {
                    problems.push(format!(
                        "`{name} --help`: {flag} has the alias {alias}, missing from its row in {CONFIGURATION} (line {})",
                        rows[0].0
                    ));
                }
            }
            if let Some(env) = &option.env
                && !rows.iter().any(|(_, line)| line.contains(env.as_str()))
            {
                problems.push(format!(
                    "`{name} --help`: {flag} reads the environment variable {env}, missing from its row in {CONFIGURATION} (line {})",
                    rows[0].0
                ));
            }
        }
    }
    let known: BTreeSet<String> = commands
        .iter()
        .map(|(command, _)| command_name(command))
        .collect();
    for name in sections.keys() {
        if !known.contains(name) {
            problems.push(format!(
                "{CONFIGURATION} has a `<!-- flags: {name} -->` section, but the binary has no such command (known: {})",
                known.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    fail_with(&problems);
}

/// The subcommand words cited after `fraiseql-observers ` in a line: `dlq list --json` → `dlq`,
/// `list` (stops at the first word that is not a lowercase command name).
fn cited_commands(line: &str) -> Vec<Vec<String>> {
    line.match_indices("fraiseql-observers ")
        .map(|(start, found)| {
            line[start + found.len()..]
                .split(' ')
                .take(2)
                .take_while(|word| {
                    !word.is_empty()
                        && word
                            .chars()
                            .all(|character| character.is_ascii_lowercase() || character == '-')
                        && !word.starts_with('-')
                })
                .map(str::to_owned)
                .collect()
        })
        .filter(|words: &Vec<String>| !words.is_empty())
        .collect()
}

#[test]
fn the_docs_cite_no_command_or_flag_the_binary_lacks() {
    let commands = commands();
    let mut existing = BTreeSet::new();
    for (_, text) in &commands {
        existing.extend(flags_in(text));
    }
    let known: BTreeSet<Vec<String>> = commands
        .iter()
        .map(|(command, _)| command.clone())
        .collect();
    let mut problems = Vec::new();
    for path in [CONFIGURATION, RUNBOOK, MIGRATION] {
        for (index, line) in read(path).lines().enumerate() {
            for flag in flags_in(line) {
                if !existing.contains(&flag) {
                    problems.push(format!(
                        "{path}:{}: {flag} is not a flag of any subcommand (no `--help` lists it)",
                        index + 1
                    ));
                }
            }
            for words in cited_commands(line) {
                // `fraiseql-observers cluster status`: the first word must be a command; the
                // second counts only where the first has subcommands.
                let first = vec![words[0].clone()];
                let has_children = known
                    .iter()
                    .any(|command| command.len() == 2 && command[0] == words[0]);
                let cited = if has_children && words.len() == 2 {
                    words.clone()
                } else {
                    first
                };
                if !known.contains(&cited) {
                    problems.push(format!(
                        "{path}:{}: `fraiseql-observers {}` is not a command of the binary",
                        index + 1,
                        cited.join(" ")
                    ));
                }
            }
        }
    }
    fail_with(&problems);
}

// ---- observers-file keys ------------------------------------------------------------------

/// The loader's errors for `document` (written as JSON, which YAML reads), as (path, message).
fn loader_errors(directory: &tempfile::TempDir, document: &Value) -> Vec<(String, String)> {
    let path = directory.path().join("probe.yaml");
    std::fs::write(&path, serde_json::to_string_pretty(document).unwrap()).unwrap();
    let output = binary(&["validate-config", "--json", path.to_str().unwrap()]);
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "validate-config --json printed no JSON ({error}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    report["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|error| {
                    (
                        error["path"].as_str().unwrap_or_default().to_owned(),
                        error["message"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The loader's path for a JSON pointer: `/observers/0/retry` → `observers[0].retry`.
fn loader_path(pointer: &str) -> String {
    let mut path = String::new();
    for segment in pointer.split('/').filter(|segment| !segment.is_empty()) {
        if segment.chars().all(|character| character.is_ascii_digit()) {
            path.push('[');
            path.push_str(segment);
            path.push(']');
        } else {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(segment);
        }
    }
    path
}

fn child_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// The keys the loader lists when `zzz` is planted in the mapping at `pointer`.
fn allowed_keys(
    directory: &tempfile::TempDir,
    template: &Value,
    pointer: &str,
) -> Option<Vec<String>> {
    let mut document = template.clone();
    document
        .pointer_mut(pointer)?
        .as_object_mut()?
        .insert("zzz".into(), json!(1));
    let wanted = child_path(&loader_path(pointer), "zzz");
    loader_errors(directory, &document)
        .into_iter()
        .find(|(path, message)| *path == wanted && message.starts_with("unknown key 'zzz'"))
        .and_then(|(_, message)| {
            let list = message.split("expected one of: ").nth(1)?;
            Some(list.split(", ").map(str::to_owned).collect())
        })
}

/// The name a section has in the docs' `<!-- keys: … -->` markers: list indexes dropped, and an
/// action's place named by its type (`actions[type=webhook].rate_limit`).
fn section_name(pointer: &str, action_type: Option<&str>) -> String {
    let path = loader_path(pointer);
    let mut name = String::new();
    let mut skipping_index = false;
    for character in path.chars() {
        match character {
            '[' => {
                skipping_index = true;
                name.push('[');
            }
            ']' => {
                skipping_index = false;
                name.push(']');
            }
            _ if skipping_index => {}
            other => name.push(other),
        }
    }
    if let Some(action_type) = action_type {
        name = name.replacen(
            "observers[].actions[]",
            &format!("actions[type={action_type}]"),
            1,
        );
    }
    if name.is_empty() {
        "top-level".to_owned()
    } else {
        name
    }
}

/// Every section the loader checks keys in, with the keys it allows: found by planting an unknown
/// key, then trying every allowed key as a mapping and as a list of mappings.
fn loader_sections(directory: &tempfile::TempDir) -> BTreeMap<String, (String, Vec<String>)> {
    let observer = json!({"name": "probe", "entity": "Order", "events": ["insert"], "actions": [{"type": "log"}]});
    let mut sections = BTreeMap::new();
    let mut pending: Vec<(Value, String, Option<String>)> = vec![
        (
            json!({"observers": [observer.clone()]}),
            String::new(),
            None,
        ),
        (
            json!({"observers": [observer.clone()]}),
            "/observers/0".into(),
            None,
        ),
    ];
    // Action types, from the loader's answer to an unknown one.
    let mut unknown_type = json!({"observers": [observer.clone()]});
    unknown_type["observers"][0]["actions"][0]["type"] = json!("zzz");
    let types: Vec<String> = loader_errors(directory, &unknown_type)
        .into_iter()
        .find_map(|(_, message)| {
            let list = message
                .strip_prefix("unknown action type \"zzz\"; ")?
                .split("expected one of: ")
                .nth(1)?;
            Some(list.split(", ").map(str::to_owned).collect())
        })
        .expect("validate-config lists the action types when one is unknown");
    for action_type in types {
        let mut document = json!({"observers": [observer.clone()]});
        document["observers"][0]["actions"][0] = json!({"type": action_type});
        pending.push((
            document,
            "/observers/0/actions/0".into(),
            Some(action_type.clone()),
        ));
    }
    let mut seen = BTreeSet::new();
    while let Some((template, pointer, action_type)) = pending.pop() {
        if !seen.insert(pointer.clone() + action_type.as_deref().unwrap_or_default()) {
            continue;
        }
        let Some(keys) = allowed_keys(directory, &template, &pointer) else {
            continue;
        };
        for key in &keys {
            if key == "type" || key == "observers" && pointer.is_empty() {
                continue;
            }
            for (value, suffix) in [(json!({}), String::new()), (json!([{}]), "/0".to_owned())] {
                let mut nested = template.clone();
                nested.pointer_mut(&pointer).unwrap()[key] = value;
                let nested_pointer = format!("{pointer}/{key}{suffix}");
                if allowed_keys(directory, &nested, &nested_pointer).is_some() {
                    pending.push((nested, nested_pointer, action_type.clone()));
                }
            }
        }
        let name = section_name(&pointer, action_type.as_deref());
        sections.insert(name, (loader_path(&pointer), keys));
    }
    sections
}

/// The first back-quoted word of the first cell of each table row in a section.
fn documented_keys(lines: &[(usize, String)]) -> Vec<(usize, String)> {
    lines
        .iter()
        .filter_map(|(number, line)| {
            let first_cell = line.trim().strip_prefix('|')?.split('|').next()?;
            let start = first_cell.find('`')? + 1;
            let end = first_cell[start..].find('`')? + start;
            Some((*number, first_cell[start..end].trim().to_owned()))
        })
        .collect()
}

#[test]
fn every_observers_file_key_is_documented_in_its_section_and_no_other() {
    let directory = tempfile::tempdir().unwrap();
    let loader = loader_sections(&directory);
    for expected in [
        "top-level",
        "observers[]",
        "observers[].retry",
        "executor",
        "jobs",
    ] {
        assert!(
            loader.contains_key(expected),
            "section {expected} not found by probing the loader: {:?}",
            loader.keys()
        );
    }
    let document = read(CONFIGURATION);
    let sections = marked_sections(&document, "keys");
    // Keys every action takes are documented once, in `actions[]`.
    let common: Vec<(usize, String)> = sections
        .get("actions[]")
        .map(|lines| documented_keys(lines))
        .unwrap_or_default();
    let mut problems = Vec::new();
    if common.is_empty() {
        problems.push(format!(
            "{CONFIGURATION} has no `<!-- keys: actions[] -->` table of the keys every action takes"
        ));
    }
    for (name, (loader_path, allowed)) in &loader {
        let example = if loader_path.is_empty() {
            "the top level".to_owned()
        } else {
            loader_path.clone()
        };
        let Some(lines) = sections.get(name) else {
            problems.push(format!(
                "{CONFIGURATION} has no `<!-- keys: {name} -->` table; the loader accepts these keys at {example}: {}",
                allowed.join(", ")
            ));
            continue;
        };
        let own = documented_keys(lines);
        let is_action = name.starts_with("actions[type=") && !name.contains("].");
        let mut documented: BTreeSet<&str> = own.iter().map(|(_, key)| key.as_str()).collect();
        if is_action {
            documented.extend(common.iter().map(|(_, key)| key.as_str()));
        }
        for key in allowed {
            if !documented.contains(key.as_str()) {
                problems.push(format!(
                    "the loader accepts `{key}` at {example} but the `<!-- keys: {name} -->` table of {CONFIGURATION} has no row for it: add `| `{key}` | type | default | meaning |`"
                ));
            }
        }
        let extra = own
            .iter()
            .chain(if is_action { common.iter() } else { [].iter() });
        for (line, key) in extra {
            if !allowed.contains(key) {
                problems.push(format!(
                    "{CONFIGURATION}:{line}: `{key}` is documented in `<!-- keys: {name} -->` but the loader does not accept it at {example} (it accepts: {})",
                    allowed.join(", ")
                ));
            }
        }
    }
    for name in sections.keys() {
        if name != "actions[]" && !loader.contains_key(name) {
            problems.push(format!(
                "{CONFIGURATION} has a `<!-- keys: {name} -->` table, but the loader checks no such section (it has: {})",
                loader.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    fail_with(&problems);
}

// ---- metrics and alerts -------------------------------------------------------------------

/// Words of `text` that start with `prefix` (letters, digits and `_`).
fn words_starting(text: &str, prefix: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (index, line) in text.lines().enumerate() {
        for word in
            line.split(|character: char| !(character.is_ascii_alphanumeric() || character == '_'))
        {
            if word.starts_with(prefix) && word.len() > prefix.len() {
                found.push((index + 1, word.to_owned()));
            }
        }
    }
    found
}

/// Alert names of `deploy/prometheus/rules.yml`.
fn alerts() -> BTreeSet<String> {
    read("deploy/prometheus/rules.yml")
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert:"))
        .map(|name| name.trim().to_owned())
        .collect()
}

/// Markdown heading anchors of `text`, as GitHub makes them, and `<a id="…">` anchors.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut anchors: BTreeSet<String> = text
        .lines()
        .filter(|line| line.starts_with('#'))
        .map(|line| {
            line.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter(|character| character.is_alphanumeric() || " -_".contains(*character))
                .map(|character| if character == ' ' { '-' } else { character })
                .collect()
        })
        .collect();
    for (start, _) in text.match_indices("<a id=\"") {
        let rest = &text[start + "<a id=\"".len()..];
        if let Some(end) = rest.find('"') {
            anchors.insert(rest[..end].to_owned());
        }
    }
    anchors
}

#[test]
fn links_between_the_docs_point_at_existing_sections() {
    let documents = [CONFIGURATION, RUNBOOK, MIGRATION];
    let mut problems = Vec::new();
    for path in documents {
        let text = read(path);
        for (index, line) in text.lines().enumerate() {
            for (start, _) in line.match_indices("](") {
                let target = &line[start + 2..];
                let Some(end) = target.find(')') else {
                    continue;
                };
                let target = &target[..end];
                let Some((file, anchor)) = target.split_once('#') else {
                    continue;
                };
                let linked = if file.is_empty() {
                    path.to_owned()
                } else if let Some(sibling) = documents
                    .iter()
                    .find(|document| document.ends_with(&format!("/{file}")))
                {
                    (*sibling).to_owned()
                } else {
                    continue;
                };
                if !anchors(&read(&linked)).contains(anchor) {
                    problems.push(format!(
                        "{path}:{}: link to {target}: {linked} has no heading or anchor #{anchor}",
                        index + 1
                    ));
                }
            }
        }
    }
    fail_with(&problems);
}

#[test]
fn the_runbook_cites_existing_metrics_and_covers_every_alert() {
    let runbook = read(RUNBOOK);
    let metrics_source = read("src/metrics.rs");
    let rules = read("deploy/prometheus/rules.yml");
    let alerts = alerts();
    assert!(!alerts.is_empty(), "no `- alert:` in rules.yml");
    let mut problems = Vec::new();
    for (line, metric) in words_starting(&runbook, "fraiseql_observers_") {
        let base = metric.trim_start_matches("fraiseql_observers_");
        let base = ["_total", "_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| base.strip_suffix(suffix))
            .unwrap_or(base);
        if !metrics_source.contains(&format!("\"{base}\"")) {
            problems.push(format!(
                "{RUNBOOK}:{line}: metric {metric} is not registered in src/metrics.rs (no \"{base}\" there)"
            ));
        }
    }
    let cited: BTreeSet<String> = words_starting(&runbook, "FraiseqlObservers")
        .into_iter()
        .map(|(line, alert)| {
            if !alerts.contains(&alert) {
                problems.push(format!(
                    "{RUNBOOK}:{line}: alert {alert} is not in deploy/prometheus/rules.yml"
                ));
            }
            alert
        })
        .collect();
    for alert in &alerts {
        if !cited.contains(alert) {
            problems.push(format!(
                "alert {alert} (deploy/prometheus/rules.yml) is not mentioned in {RUNBOOK}: add what to do when it fires"
            ));
        }
    }
    // A `runbook_url` annotation must point at a heading of the runbook.
    let headings = anchors(&runbook);
    for (index, line) in rules.lines().enumerate() {
        if let Some(url) = line.trim().strip_prefix("runbook_url:") {
            let url = url
                .trim()
                .trim_matches(|quote| quote == '\'' || quote == '"');
            match url.split_once('#') {
                Some((file, anchor)) if file.ends_with(RUNBOOK) => {
                    if !headings.contains(anchor) {
                        problems.push(format!(
                            "deploy/prometheus/rules.yml:{}: runbook_url anchor #{anchor} is not a heading of {RUNBOOK} (headings: {})",
                            index + 1,
                            headings.iter().cloned().collect::<Vec<_>>().join(", ")
                        ));
                    }
                }
                _ => problems.push(format!(
                    "deploy/prometheus/rules.yml:{}: runbook_url {url} does not point into {RUNBOOK}#…",
                    index + 1
                )),
            }
        }
    }
    fail_with(&problems);
}
