//! The Kubernetes manifests, proven against the binary. Reads the rendered example overlay
//! (`deploy/kubernetes/rendered/example.yaml`, which `.ci/run` checks is what
//! `kubectl kustomize deploy/kubernetes/overlays/example` renders) and runs what it declares:
//!
//! - the migration Job's container against a fresh database;
//! - three pods of the Deployment as three local processes of the built binary, each with exactly
//!   the container's entrypoint (the Dockerfile's `ENTRYPOINT`), args and environment. What a
//!   kubelet would fill in is filled in locally: Secrets with local values (by the keys the
//!   manifests reference and `secrets.example.yaml` lists), Downward-API fields with per-pod
//!   values (`metadata.name` → `fraiseql-observers-<n>`, `status.podIP` → `127.0.0.<n+2>`, so
//!   the three keep the manifest's ports), the `ConfigMap` volume as a directory whose path replaces
//!   the mount path, and `$(VAR)` in env values and args expanded as Kubernetes does;
//! - probes every pod at the declared liveness and readiness paths and ports until ready, and
//!   connects to every declared container port;
//! - writes changes while one pod's preStop command runs (with that pod's environment, as an
//!   exec hook does) followed by SIGTERM, and checks that the pod exits cleanly within
//!   `terminationGracePeriodSeconds`, that the others lead all its partitions, and that every
//!   change reached a real HTTP receiver exactly once and in order;
//! - checks that every metric the Grafana dashboard and the alert rules use is served by a node.
//!
//! Why a wrong manifest fails here: a flag the binary lacks makes clap refuse the args, so the
//! process exits before it is ready and `wait_ready` fails with its log; a misspelt environment
//! variable leaves a required setting (`--database-url`, an observers-file secret) unset, with
//! the same effect; a port the binary does not listen on fails the probe or the connect to that
//! port; a probe on a port name the container does not declare fails `port_of`; a preStop
//! command the binary does not understand exits non-zero. `a_flag_the_binary_lacks_fails_the_pod`
//! shows the first case with the real binary.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Receiver;
use common::nodes::{Writer, eventually, prepare_orders};
use common::postgres::TestDatabase;
use common::redis::PrivateRedis;
use fraiseql_observers::cluster::LEASE_NAMESPACE;
use saphyr::{LoadableYamlNode, ScalarOwned, YamlOwned};
use serde_json::Value;
use sqlx::PgPool;

const RENDERED: &str = "deploy/kubernetes/rendered/example.yaml";
const SECRETS: &str = "deploy/kubernetes/overlays/example/secrets.example.yaml";
const DOCKERFILE: &str = "deploy/Dockerfile";
const DASHBOARD: &str = "deploy/grafana/fraiseql-observers.json";
const RULES: &str = "deploy/prometheus/rules.yml";
const PODS: usize = 3;
const PARTITIONS: usize = 8;

fn repository_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repository_file(path)).unwrap_or_else(|error| panic!("{path}: {error}"))
}

fn to_json(node: &YamlOwned) -> Value {
    match node {
        YamlOwned::Value(ScalarOwned::Null) => Value::Null,
        YamlOwned::Value(ScalarOwned::Boolean(flag)) => Value::Bool(*flag),
        YamlOwned::Value(ScalarOwned::Integer(number)) => Value::from(*number),
        YamlOwned::Value(ScalarOwned::FloatingPoint(number)) => Value::from(number.into_inner()),
        YamlOwned::Value(ScalarOwned::String(text)) | YamlOwned::Representation(text, _, _) => {
            Value::String(text.clone())
        }
        YamlOwned::Sequence(items) => Value::Array(items.iter().map(to_json).collect()),
        YamlOwned::Mapping(entries) => Value::Object(
            entries
                .iter()
                .map(|(key, value)| {
                    let key = match to_json(key) {
                        Value::String(text) => text,
                        other => other.to_string(),
                    };
                    (key, to_json(value))
                })
                .collect(),
        ),
        YamlOwned::Tagged(_, inner) => to_json(inner),
        other => panic!("unexpected YAML node {other:?}"),
    }
}

/// Every document of a multi-document YAML file, as JSON values.
fn documents(path: &str) -> Vec<Value> {
    YamlOwned::load_from_str(&read(path))
        .unwrap_or_else(|error| panic!("{path}: {error}"))
        .iter()
        .map(to_json)
        .filter(|document| !document.is_null())
        .collect()
}

fn find<'a>(documents: &'a [Value], kind: &str, name: &str) -> &'a Value {
    documents
        .iter()
        .find(|document| document["kind"] == kind && document["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
}

fn strings(value: &Value) -> Vec<String> {
    value.as_array().map_or_else(Vec::new, |items| {
        items
            .iter()
            .map(|item| item.as_str().expect("a string").to_owned())
            .collect()
    })
}

/// The image's entrypoint, from the Dockerfile's exec-form `ENTRYPOINT`.
fn image_entrypoint() -> Vec<String> {
    let dockerfile = read(DOCKERFILE);
    let line = dockerfile
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix("ENTRYPOINT "))
        .expect("the Dockerfile has an ENTRYPOINT");
    serde_json::from_str(line).expect("ENTRYPOINT in exec (JSON) form")
}

/// The binary's path in the image is this build's binary here; any other program is refused.
fn local_program(image_path: &str) -> &'static str {
    let entrypoint = image_entrypoint();
    assert_eq!(
        image_path, entrypoint[0],
        "the manifests run {image_path}, which the image does not ship"
    );
    env!("CARGO_BIN_EXE_fraiseql-observers")
}

/// Kubernetes' `$(VAR)` expansion: a defined variable is replaced, `$$` is a literal `$`, and an
/// undefined reference stays as written.
fn expand(text: &str, variables: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(position) = rest.find('$') {
        out.push_str(&rest[..position]);
        let after = &rest[position + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(reference) = after.strip_prefix('(')
            && let Some(end) = reference.find(')')
            && let Some(value) = variables.get(&reference[..end])
        {
            out.push_str(value);
            rest = &reference[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// What a kubelet supplies for one pod.
struct PodContext<'a> {
    name: String,
    ip: String,
    /// (Secret, key) → value.
    secrets: &'a HashMap<(String, String), String>,
    /// Volume name → local directory holding its files.
    volumes: &'a HashMap<String, PathBuf>,
}

/// One container of a pod, resolved for local execution.
struct Resolved {
    program: &'static str,
    args: Vec<String>,
    env: BTreeMap<String, String>,
}

fn resolve(pod_spec: &Value, container: &Value, pod: &PodContext<'_>) -> Resolved {
    let mut env = BTreeMap::new();
    for source in container["envFrom"].as_array().into_iter().flatten() {
        let secret = source["secretRef"]["name"]
            .as_str()
            .expect("envFrom names a Secret");
        let mut found = false;
        for ((name, key), value) in pod.secrets {
            if name == secret {
                env.insert(key.clone(), value.clone());
                found = true;
            }
        }
        assert!(found, "envFrom Secret {secret} has no keys here");
    }
    for variable in container["env"].as_array().into_iter().flatten() {
        let name = variable["name"].as_str().unwrap().to_owned();
        let value = if let Some(value) = variable["value"].as_str() {
            expand(value, &env)
        } else if let Some(field) = variable["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            match field {
                "metadata.name" => pod.name.clone(),
                "status.podIP" => pod.ip.clone(),
                other => panic!("Downward-API field {other} is not filled in by this test"),
            }
        } else if let Some(reference) = variable["valueFrom"]["secretKeyRef"].as_object() {
            let key = (
                reference["name"].as_str().unwrap().to_owned(),
                reference["key"].as_str().unwrap().to_owned(),
            );
            pod.secrets
                .get(&key)
                .unwrap_or_else(|| panic!("Secret key {key:?} is not in {SECRETS}"))
                .clone()
        } else {
            panic!("env {name}: a source this test does not know: {variable}")
        };
        env.insert(name, value);
    }
    let command = strings(&container["command"]);
    let mut args = strings(&container["args"]);
    let program = if command.is_empty() {
        let entrypoint = image_entrypoint();
        args = entrypoint[1..].iter().cloned().chain(args).collect();
        local_program(&entrypoint[0])
    } else {
        args = command[1..].iter().cloned().chain(args).collect();
        local_program(&command[0])
    };
    let mounts = mount_map(pod_spec, container, pod);
    let args = args
        .iter()
        .map(|arg| relocate(&expand(arg, &env), &mounts))
        .collect();
    Resolved { program, args, env }
}

/// Container mount path → local directory.
fn mount_map(pod_spec: &Value, container: &Value, pod: &PodContext<'_>) -> Vec<(String, PathBuf)> {
    container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|mount| {
            let volume = mount["name"].as_str().unwrap();
            assert!(
                pod_spec["volumes"]
                    .as_array()
                    .is_some_and(|volumes| volumes.iter().any(|v| v["name"] == volume)),
                "mount of undeclared volume {volume}"
            );
            (
                mount["mountPath"].as_str().unwrap().to_owned(),
                pod.volumes
                    .get(volume)
                    .unwrap_or_else(|| panic!("volume {volume} is not provided here"))
                    .clone(),
            )
        })
        .collect()
}

fn relocate(arg: &str, mounts: &[(String, PathBuf)]) -> String {
    for (mount_path, local) in mounts {
        if let Some(position) = arg.find(mount_path.as_str()) {
            return format!(
                "{}{}{}",
                &arg[..position],
                local.display(),
                &arg[position + mount_path.len()..]
            );
        }
    }
    arg.to_owned()
}

fn command_for(resolved: &Resolved) -> Command {
    let mut command = Command::new(resolved.program);
    command.args(&resolved.args).env_clear().envs(&resolved.env);
    command
}

/// A running pod: its process (killed on drop), its log file and its addresses.
struct Pod {
    name: String,
    ip: String,
    child: Child,
    log: PathBuf,
    env: BTreeMap<String, String>,
}

impl Pod {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The container port a probe's `port` (a name or a number) designates.
fn port_of(container: &Value, port: &Value) -> u16 {
    if let Some(number) = port.as_u64() {
        return u16::try_from(number).unwrap();
    }
    let name = port.as_str().expect("a port name or number");
    container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|declared| declared["name"] == name)
        .and_then(|declared| declared["containerPort"].as_u64())
        .map_or_else(
            || panic!("probe port {name} is not a declared container port"),
            |number| u16::try_from(number).unwrap(),
        )
}

fn http_get_probe(container: &Value, probe: &str) -> (String, u16) {
    let action = &container[probe]["httpGet"];
    (
        action["path"]
            .as_str()
            .unwrap_or_else(|| panic!("{probe} is not an httpGet probe"))
            .to_owned(),
        port_of(container, &action["port"]),
    )
}

async fn probe(client: &reqwest::Client, ip: &str, (path, port): &(String, u16)) -> Option<u16> {
    client
        .get(format!("http://{ip}:{port}{path}"))
        .send()
        .await
        .ok()
        .map(|response| response.status().as_u16())
}

/// Polls the readiness probe until 200; fails with the pod's log if it exits first.
async fn wait_ready(client: &reqwest::Client, pod: &mut Pod, readiness: &(String, u16)) {
    let deadline = Instant::now() + common::nodes::DEADLINE;
    loop {
        if let Some(status) = pod.child.try_wait().unwrap() {
            panic!(
                "pod {} exited ({status}) before it was ready:\n{}",
                pod.name,
                pod.log_tail()
            );
        }
        if probe(client, &pod.ip, readiness).await == Some(200) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pod {} not ready at {}:{}{}:\n{}",
            pod.name,
            pod.ip,
            readiness.1,
            readiness.0,
            pod.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Partitions led, per node id, from the advisory locks the nodes hold.
async fn leases(pool: &PgPool) -> HashMap<String, usize> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT substr(activity.application_name, length('fraiseql-observers lease ') + 1), count(*)
           FROM pg_locks AS lock JOIN pg_stat_activity AS activity ON activity.pid = lock.pid
          WHERE lock.locktype = 'advisory' AND lock.classid = $1::bigint::oid AND lock.objsubid = 2
            AND lock.granted AND lock.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          GROUP BY 1",
    )
    .bind(i64::from(LEASE_NAMESPACE))
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(node, count)| (node, usize::try_from(count).unwrap()))
        .collect()
}

/// Peak resident memory of a process (`VmHWM`), in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .ok()
}

fn terminate(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -TERM {pid}");
}

/// Sample names in an OpenMetrics text.
fn served_metric_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            line.split(['{', ' '])
                .next()
                .expect("a sample line has a name")
                .to_owned()
        })
        .collect()
}

/// The `fraiseql_observers_*` metric names a `PromQL` expression selects (every selector in the
/// dashboard and rules uses this prefix; `used_metric_names` checks that nothing else is used).
fn metric_names_in(promql: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = promql.as_bytes();
    let mut start = 0;
    while let Some(found) = promql[start..].find("fraiseql_observers_") {
        let begin = start + found;
        let boundary =
            begin == 0 || !(bytes[begin - 1].is_ascii_alphanumeric() || bytes[begin - 1] == b'_');
        let mut end = begin;
        while end < bytes.len()
            && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_' || bytes[end] == b':')
        {
            end += 1;
        }
        if boundary {
            names.insert(promql[begin..end].to_owned());
        }
        start = end;
    }
    names
}

/// Every `expr` of the dashboard's panels and the alert rules, with where it came from.
fn dashboard_and_rule_expressions() -> Vec<(String, String)> {
    let mut expressions = Vec::new();
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).expect("dashboard JSON");
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            expressions.push((
                format!("panel {:?}", panel["title"].as_str().unwrap_or("?")),
                target["expr"]
                    .as_str()
                    .expect("a target has an expr")
                    .to_owned(),
            ));
        }
    }
    for group in documents(RULES)[0]["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            expressions.push((
                format!("alert {}", rule["alert"].as_str().unwrap_or("?")),
                rule["expr"]
                    .as_str()
                    .expect("a rule has an expr")
                    .to_owned(),
            ));
        }
    }
    expressions
}

#[test]
fn metric_names_are_extracted_from_promql() {
    let names = metric_names_in(
        "sum by (le) (rate(fraiseql_observers_action_duration_seconds_bucket{action_type=~\"$t\"}[5m])) / x_fraiseql_observers_no",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["fraiseql_observers_action_duration_seconds_bucket"]
    );
    let mut variables = BTreeMap::new();
    variables.insert("POD_IP".to_owned(), "10.0.0.7".to_owned());
    assert_eq!(expand("$(POD_IP):9090", &variables), "10.0.0.7:9090");
    assert_eq!(
        expand("$$(POD_IP) $(UNSET)", &variables),
        "$(POD_IP) $(UNSET)"
    );
}

/// Every dashboard query and rule selects only our metrics (or `vector()` constants), so the
/// comparison with `/metrics` covers everything they use.
#[test]
fn dashboard_and_rules_use_only_this_service_s_metrics() {
    let expressions = dashboard_and_rule_expressions();
    assert!(
        expressions.len() > 10,
        "dashboard panels and rules are read"
    );
    for (place, expression) in expressions {
        assert!(
            !metric_names_in(&expression).is_empty(),
            "{place} selects no fraiseql_observers_ metric: {expression}"
        );
    }
}

/// The preStop hook and a bad flag: the first case of the module doc, with the real binary.
#[test]
fn a_flag_the_binary_lacks_fails_the_pod() {
    let manifests = documents(RENDERED);
    let deployment = find(&manifests, "Deployment", "fraiseql-observers");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let variables: BTreeMap<String, String> = [("POD_NAME", "pod-x"), ("POD_IP", "127.0.0.9")]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
    let mut args: Vec<String> = strings(&container["args"])
        .iter()
        .map(|arg| expand(arg, &variables))
        .collect();
    args.push("--no-such-flag=1".to_owned());
    let output = Command::new(local_program(&image_entrypoint()[0]))
        .args(&args)
        .env_clear()
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("unexpected argument '--no-such-flag'"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines, reason = "one scenario, told in order")]
async fn the_rendered_manifests_run_drain_and_lose_nothing() {
    let manifests = documents(RENDERED);
    let deployment = find(&manifests, "Deployment", "fraiseql-observers");
    let pod_spec = &deployment["spec"]["template"]["spec"];
    let container = &pod_spec["containers"][0];
    let job = find(&manifests, "Job", "fraiseql-observers-migrate");
    assert_eq!(deployment["spec"]["replicas"], 3);

    let database = TestDatabase::create().await;
    let redis = PrivateRedis::start();
    let receiver = Receiver::start().await;

    // Local values for every Secret key the example lists.
    let mut secrets = HashMap::new();
    for secret in documents(SECRETS) {
        let name = secret["metadata"]["name"].as_str().unwrap().to_owned();
        for key in secret["stringData"].as_object().unwrap().keys() {
            let value = match (name.as_str(), key.as_str()) {
                ("fraiseql-observers", "database-url") => database.url.clone(),
                ("fraiseql-observers", "redis-url") => redis.url(),
                ("fraiseql-observers", "control-token") => "contract-test-token".to_owned(),
                ("fraiseql-observers-actions", "ORDERS_WEBHOOK_URL") => receiver.url("/orders"),
                ("fraiseql-observers-actions", "ORDERS_WEBHOOK_SECRET") => {
                    "contract-test-signing-secret".to_owned()
                }
                other => panic!("no local value for Secret key {other:?}"),
            };
            secrets.insert((name.clone(), key.clone()), value);
        }
    }
    // The ConfigMap volume: its keys as files.
    let scratch = tempfile::tempdir().unwrap();
    let mut volumes = HashMap::new();
    for volume in pod_spec["volumes"].as_array().unwrap() {
        let config_map = volume["configMap"]["name"]
            .as_str()
            .expect("only ConfigMap volumes are provided here");
        let directory = scratch.path().join(volume["name"].as_str().unwrap());
        std::fs::create_dir_all(&directory).unwrap();
        for (key, value) in find(&manifests, "ConfigMap", config_map)["data"]
            .as_object()
            .unwrap()
        {
            std::fs::write(directory.join(key), value.as_str().unwrap()).unwrap();
        }
        volumes.insert(volume["name"].as_str().unwrap().to_owned(), directory);
    }

    // 1. The migration Job, against the fresh database.
    let job_pod = &job["spec"]["template"]["spec"];
    let migrate = resolve(
        job_pod,
        &job_pod["containers"][0],
        &PodContext {
            name: "fraiseql-observers-migrate-x".to_owned(),
            ip: "127.0.0.5".to_owned(),
            secrets: &secrets,
            volumes: &volumes,
        },
    );
    let output = command_for(&migrate).output().unwrap();
    assert!(
        output.status.success(),
        "the migration Job failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The capture function the Job installed tracks the test's table.
    prepare_orders(&database.pool).await;

    // 2. Three pods.
    let grace = Duration::from_secs(
        pod_spec["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("terminationGracePeriodSeconds"),
    );
    let liveness = http_get_probe(container, "livenessProbe");
    let readiness = http_get_probe(container, "readinessProbe");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let started = Instant::now();
    let mut pods = Vec::new();
    for index in 0..PODS {
        let context = PodContext {
            name: format!("fraiseql-observers-{index}"),
            ip: format!("127.0.0.{}", index + 2),
            secrets: &secrets,
            volumes: &volumes,
        };
        let resolved = resolve(pod_spec, container, &context);
        let log = scratch.path().join(format!("{}.log", context.name));
        let child = command_for(&resolved)
            .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
            .stderr(Stdio::from(
                std::fs::OpenOptions::new().append(true).open(&log).unwrap(),
            ))
            .spawn()
            .unwrap();
        pods.push(Pod {
            name: context.name,
            ip: context.ip,
            child,
            log,
            env: resolved.env,
        });
    }
    for pod in &mut pods {
        wait_ready(&client, pod, &readiness).await;
        assert_eq!(
            probe(&client, &pod.ip, &liveness).await,
            Some(200),
            "{}: liveness",
            pod.name
        );
        for port in container["ports"].as_array().unwrap() {
            let number = port["containerPort"].as_u64().unwrap();
            assert!(
                tokio::net::TcpStream::connect(format!("{}:{number}", pod.ip))
                    .await
                    .is_ok(),
                "{}: nothing listens on declared port {number}",
                pod.name
            );
        }
    }
    let ready_after = started.elapsed();
    eventually("every partition led by one of the three pods", || async {
        let held = leases(&database.pool).await;
        held.values().sum::<usize>() == PARTITIONS && held.len() == PODS
    })
    .await;

    // 3. Changes flow while pod 0 is stopped as Kubernetes stops it.
    let writer = Writer::start(database.pool.clone(), 3, false);
    eventually("deliveries under way", || async {
        receiver.request_count() > 100
    })
    .await;
    let leaving = &mut pods[0];
    let pre_stop = strings(&container["lifecycle"]["preStop"]["exec"]["command"]);
    assert!(
        !pre_stop.is_empty(),
        "the container has an exec preStop hook"
    );
    let stop_began = Instant::now();
    let output = Command::new(local_program(&pre_stop[0]))
        .args(&pre_stop[1..])
        .env_clear()
        .envs(&leaving.env)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "preStop failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let pre_stop_took = stop_began.elapsed();
    assert_eq!(
        probe(&client, &leaving.ip, &readiness).await,
        Some(503),
        "a drained pod is not ready"
    );
    let peak_kib = peak_rss_kib(leaving.child.id());
    terminate(leaving.child.id());
    let status = loop {
        if let Some(status) = leaving.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            stop_began.elapsed() < grace,
            "pod {} still running after terminationGracePeriodSeconds ({grace:?}):\n{}",
            leaving.name,
            leaving.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let drain_took = stop_began.elapsed();
    assert!(
        status.success(),
        "pod 0 exited {status}:\n{}",
        leaving.log_tail()
    );
    eventually("the other pods lead every partition", || async {
        let held = leases(&database.pool).await;
        held.values().sum::<usize>() == PARTITIONS && !held.contains_key(&pods[0].name)
    })
    .await;
    let taken_over = stop_began.elapsed();
    let mut changes = writer.finish().await;
    eventually("every change delivered", || async {
        delivered_keys(&receiver).len() == changes
    })
    .await;
    // One more change, answered 503 three times, the last time with `Retry-After: 20`: the
    // inline attempts give up, it waits in the job queue through a gauge refresh (15 s) and a
    // surviving pod's worker delivers it, so the job metrics have something to show.
    receiver.script(
        "/orders",
        [
            common::Reply::status(503),
            common::Reply::status(503),
            common::Reply::status(503).header("retry-after", "20"),
        ],
    );
    common::nodes::write_orders(&database.pool, 0..1, 1_000_000).await;
    changes += 1;
    // 4. The dashboard's and the rules' metrics are served by the surviving nodes, which do the
    // work: names are collected over successive scrapes, since the queue gauge shows only while
    // the job waits (the refresh clears it once the queue is empty) and the job-attempt counter
    // only after a worker ran it, on the pod that ran it.
    let needed: BTreeSet<String> = dashboard_and_rule_expressions()
        .iter()
        .flat_map(|(_, expression)| metric_names_in(expression))
        .collect();
    let mut served = BTreeSet::new();
    let mut missing = needed.clone();
    let deadline = Instant::now() + 2 * common::nodes::DEADLINE;
    while Instant::now() < deadline {
        for pod in &pods[1..] {
            let text = client
                .get(format!("http://{}:{}/metrics", pod.ip, readiness.1))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            served.extend(served_metric_names(&text));
        }
        missing = needed.difference(&served).cloned().collect();
        if missing.is_empty() {
            break;
        }
        // Database-read gauges change on the background refresh (every 15 s).
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        missing.is_empty(),
        "used by the dashboard or alerts but not served: {missing:?}"
    );

    // 5. Nothing lost: every change answered 2xx once, each order's versions in order.
    eventually("every change delivered", || async {
        delivered_keys(&receiver).len() == changes
    })
    .await;
    let mut per_order: HashMap<String, Vec<i64>> = HashMap::new();
    let mut per_key: HashMap<String, usize> = HashMap::new();
    for request in receiver.requests_to("/orders") {
        assert!(
            request.header("x-fraiseql-signature-256").is_some(),
            "the signing secret from the actions Secret reached the node"
        );
        if request.status != 200 {
            continue;
        }
        *per_key
            .entry(request.header("idempotency-key").unwrap().to_owned())
            .or_default() += 1;
        let body = request.json();
        per_order
            .entry(body["entity_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(body["data"]["version"].as_i64().unwrap());
    }
    assert_eq!(per_key.len(), changes, "every change delivered");
    assert!(
        per_key.values().all(|count| *count == 1),
        "each change once"
    );
    for (order, versions) in per_order {
        assert!(
            versions.windows(2).all(|pair| pair[0] < pair[1]),
            "order {order} out of order: {versions:?}"
        );
    }

    let survivors_peak: Vec<Option<u64>> = pods[1..]
        .iter()
        .map(|pod| peak_rss_kib(pod.child.id()))
        .collect();
    for pod in &pods[1..] {
        terminate(pod.child.id());
    }
    for pod in &mut pods[1..] {
        let status = pod.child.wait().unwrap();
        assert!(status.success(), "{} exited {status}", pod.name);
    }
    eprintln!(
        "contract: {PODS} pods ready after {ready_after:?}; preStop drain returned in {pre_stop_took:?}; \
         pod 0 exited {drain_took:?} after preStop began (grace {grace:?}); partitions taken over \
         {taken_over:?} after preStop began; {changes} changes delivered once; {} metrics checked; \
         peak RSS KiB: pod 0 {peak_kib:?}, others {survivors_peak:?}",
        needed.len()
    );
}

/// Idempotency keys answered 2xx.
fn delivered_keys(receiver: &Receiver) -> BTreeSet<String> {
    receiver
        .requests_to("/orders")
        .into_iter()
        .filter(|request| request.status == 200)
        .filter_map(|request| request.header("idempotency-key").map(str::to_owned))
        .collect()
}
