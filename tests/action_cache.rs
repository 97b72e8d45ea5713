//! The `cache` action against real Redis: exact keys and `SCAN MATCH` patterns removed (the shared
//! server, a key prefix per test), a command Redis refuses (permanent), a paused server (transient,
//! then done), templates checked at load, and the service's own keys (deduplication, breakers,
//! limits, cached results) out of reach, at load and when running.

mod common;

use std::time::Duration;

use common::redis::PrivateRedis;
use common::{config_errors_from_yaml, executor_from_yaml_with};
use fraiseql_observers::dlq::{DeadLetterFilter, DeadLetterQueue, InMemoryDeadLetterQueue};
use fraiseql_observers::domain::{EntityEvent, EventKind};
use fraiseql_observers::error::ErrorCode;
use fraiseql_observers::executor::{ActionStatus, Executor};
use fraiseql_observers::redis_client::{SharedConnection, managed_connection};
use redis::AsyncCommands;
use serde_json::json;

const SHARED_REDIS: &str = "redis://127.0.0.1:6379/";

fn prefix() -> String {
    format!("fqo-test-{}:", uuid::Uuid::new_v4().simple())
}

fn order_update(id: &str) -> EntityEvent {
    EntityEvent::new(
        EventKind::Update,
        "Order",
        id,
        json!({"id": id, "status": "paid"}),
        None,
    )
}

fn observer_yaml(action: &str, retry: &str) -> String {
    format!(
        "
observers:
  - name: order-cache
    entity: Order
    events: [update]
    actions:
      - type: cache
{action}
    retry: {retry}
"
    )
}

const QUICK_RETRY: &str = "{max_attempts: 3, initial_delay: 10ms, max_delay: 50ms}";

fn executor(
    yaml: &str,
    connection: SharedConnection,
) -> (Executor, std::sync::Arc<InMemoryDeadLetterQueue>) {
    executor_from_yaml_with(yaml, &[], move |runner| runner.with_redis(connection))
}

async fn set_keys(connection: &mut SharedConnection, keys: &[String]) {
    for key in keys {
        let () = connection.set(key, "cached").await.unwrap();
    }
}

async fn keys_under(connection: &mut SharedConnection, prefix: &str) -> Vec<String> {
    let mut keys: Vec<String> = connection.keys(format!("{prefix}*")).await.unwrap();
    keys.sort();
    keys
}

#[tokio::test]
async fn removes_exact_keys_and_pattern_matches_of_the_entity_only() {
    let prefix = prefix();
    let mut connection = managed_connection(SHARED_REDIS).unwrap();
    let keys = [
        "orders:ord-7",
        "orders:ord-7:lines",
        "orders:ord-7:total",
        "orders:ord-70:lines",
        "orders:ord-8:lines",
        "totals",
    ]
    .map(|key| format!("{prefix}{key}"));
    set_keys(&mut connection, &keys).await;
    let action = format!(
        "        keys: ['{prefix}orders:{{{{ entity_id }}}}']\n        patterns: ['{prefix}orders:{{{{ entity_id }}}}:*']"
    );
    let (executor, dead_letters) =
        executor(&observer_yaml(&action, QUICK_RETRY), connection.clone());

    let report = &executor.execute_event(&order_update("ord-7")).await.actions[0];

    assert_eq!(report.action_type, "cache");
    assert_eq!(
        report.status,
        ActionStatus::Succeeded {
            detail: "removed 3 keys (1 exact, 1 pattern)".into()
        }
    );
    assert_eq!(
        keys_under(&mut connection, &prefix).await,
        [
            format!("{prefix}orders:ord-70:lines"),
            format!("{prefix}orders:ord-8:lines"),
            format!("{prefix}totals"),
        ]
    );
    assert_eq!(dead_letters.count().await.unwrap(), 0);
}

#[tokio::test]
async fn glob_characters_in_event_values_match_only_themselves() {
    let prefix = prefix();
    let mut connection = managed_connection(SHARED_REDIS).unwrap();
    let keys = ["orders:*:lines", "orders:ord-1:lines", "orders:?:lines"]
        .map(|key| format!("{prefix}{key}"));
    set_keys(&mut connection, &keys).await;
    let action = format!("        patterns: '{prefix}orders:{{{{ entity_id }}}}:*'");
    let (executor, _) = executor(&observer_yaml(&action, QUICK_RETRY), connection.clone());

    let report = &executor.execute_event(&order_update("*")).await.actions[0];

    assert_eq!(
        report.status,
        ActionStatus::Succeeded {
            detail: "removed 1 key (0 exact, 1 pattern)".into()
        }
    );
    assert_eq!(
        keys_under(&mut connection, &prefix).await,
        [
            format!("{prefix}orders:?:lines"),
            format!("{prefix}orders:ord-1:lines"),
        ]
    );
}

#[tokio::test]
async fn a_command_redis_refuses_is_permanent_and_dead_lettered_with_its_reason() {
    let redis = PrivateRedis::start();
    let mut admin = managed_connection(&redis.url()).unwrap();
    let () = redis::cmd("ACL")
        .arg(
            &[
                "SETUSER", "observer", "on", ">secret", "~*", "&*", "+@all", "-unlink",
            ][..],
        )
        .query_async(&mut admin)
        .await
        .unwrap();
    set_keys(&mut admin, &["orders:ord-7".to_owned()]).await;
    let limited = managed_connection(&format!(
        "redis://observer:secret@127.0.0.1:{}/",
        redis.port
    ))
    .unwrap();
    let (executor, dead_letters) = executor(
        &observer_yaml("        keys: 'orders:{{ entity_id }}'", QUICK_RETRY),
        limited,
    );

    let report = &executor.execute_event(&order_update("ord-7")).await.actions[0];

    assert_eq!(report.attempts, 1, "{report:?}");
    let ActionStatus::Failed { code, message, .. } = &report.status else {
        panic!("expected a failure: {report:?}");
    };
    assert_eq!(*code, ErrorCode::RemoteRejected);
    assert!(
        message.contains("no permissions to run the 'unlink' command"),
        "{message}"
    );
    let letters = dead_letters
        .list(&DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].letter.action_type, "cache");
    assert_eq!(letters[0].letter.error_message, *message);
    let still_there: bool = admin.exists("orders:ord-7").await.unwrap();
    assert!(still_there);
}

#[tokio::test]
async fn a_paused_server_times_attempts_out_and_a_later_attempt_succeeds() {
    let redis = PrivateRedis::start();
    let mut admin = managed_connection(&redis.url()).unwrap();
    set_keys(
        &mut admin,
        &["orders:ord-7:a".to_owned(), "orders:ord-7:b".to_owned()],
    )
    .await;
    let (executor, dead_letters) = executor(
        &observer_yaml(
            "        patterns: 'orders:{{ entity_id }}:*'\n        timeout: 250ms",
            "{max_attempts: 20, initial_delay: 100ms, max_delay: 100ms, backoff: fixed, jitter: false}",
        ),
        managed_connection(&redis.url()).unwrap(),
    );
    // Write commands wait for a second: the first attempts time out.
    let () = redis::cmd("CLIENT")
        .arg(&["PAUSE", "1000", "WRITE"][..])
        .query_async(&mut admin)
        .await
        .unwrap();
    let started = std::time::Instant::now();

    let report = &executor.execute_event(&order_update("ord-7")).await.actions[0];

    assert!(report.succeeded(), "{report:?}");
    assert!(
        report.attempts >= 2,
        "the paused attempts timed out: {report:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    let left: Vec<String> = admin.keys("orders:*").await.unwrap();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(dead_letters.count().await.unwrap(), 0);
}

#[tokio::test]
async fn without_redis_the_action_fails_permanently() {
    let (executor, dead_letters) = common::executor_from_yaml(
        &observer_yaml("        keys: 'orders:{{ entity_id }}'", QUICK_RETRY),
        &[],
    );

    let report = &executor.execute_event(&order_update("ord-7")).await.actions[0];

    assert_eq!(report.attempts, 1);
    let ActionStatus::Failed { code, message, .. } = &report.status else {
        panic!("expected a failure: {report:?}");
    };
    assert_eq!(*code, ErrorCode::ConfigInvalid);
    assert!(message.contains("REDIS_URL"), "{message}");
    assert_eq!(dead_letters.count().await.unwrap(), 1);
}

#[test]
fn template_errors_and_empty_actions_are_refused_at_load() {
    let errors = config_errors_from_yaml(
        &observer_yaml("        patterns: ['orders:{{ entity_id :*']", QUICK_RETRY),
        &[],
    );
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].starts_with(
            "test.yaml:8:20: observers[0].actions[0].patterns[0]: invalid template (line 1 of the template): syntax error"
        ),
        "{}",
        errors[0]
    );

    let errors = config_errors_from_yaml(&observer_yaml("        timeout: 1s", QUICK_RETRY), &[]);
    assert_eq!(
        errors,
        [
            "test.yaml:7:9: observers[0].actions[0]: expected 'keys' (exact keys) or 'patterns' (SCAN MATCH patterns), or both"
        ]
    );
}

#[test]
fn patterns_and_keys_that_reach_the_services_own_keys_are_refused_at_load() {
    let yaml = observer_yaml(
        "        keys: ['fraiseql_observers:dedup:x', 'order:{{ entity_id }}', '{{ data.key }}']\n        patterns: ['*', '{{ entity_type }}:*', 'orders:{{ entity_id }}:*']",
        QUICK_RETRY,
    );
    let errors = config_errors_from_yaml(&yaml, &[]);
    assert_eq!(
        errors,
        [
            "test.yaml:8:16: observers[0].actions[0].keys[0]: the key starts with the service's own Redis prefix (\"fraiseql_observers:\"), where it keeps deduplication claims, circuit breakers, limits and cached results; cache actions may not remove those keys",
            "test.yaml:9:20: observers[0].actions[0].patterns[0]: the pattern can match keys under the service's own Redis prefix (\"fraiseql_observers:\"), where it keeps deduplication claims, circuit breakers, limits and cached results; begin it with fixed text outside that prefix, such as \"orders:\"",
            "test.yaml:9:25: observers[0].actions[0].patterns[1]: the pattern could match keys under the service's own Redis prefix (\"fraiseql_observers:\") for an event whose inserted value starts that way (values can be any text); begin it with fixed text outside that prefix, such as \"orders:{{ entity_id }}:*\"",
        ]
    );

    // The prefix the node is given in the environment is the one checked.
    let yaml = observer_yaml(
        "        patterns: ['fraiseql_observers:*', 'myapp:{{ entity_id }}']",
        QUICK_RETRY,
    );
    let errors = config_errors_from_yaml(&yaml, &[("FRAISEQL_OBSERVERS_REDIS_PREFIX", "myapp:")]);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].starts_with(
            "test.yaml:8:44: observers[0].actions[0].patterns[1]: the pattern can match keys under the service's own Redis prefix (\"myapp:\")"
        ),
        "{}",
        errors[0]
    );
}

#[test]
fn validate_config_refuses_a_pattern_that_sweeps_everything() {
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("observers.yaml");
    std::fs::write(&file, observer_yaml("        patterns: '*'", QUICK_RETRY)).unwrap();

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
        .arg("validate-config")
        .arg(&file)
        .env_remove("FRAISEQL_OBSERVERS_REDIS_PREFIX")
        .env("RUST_LOG", "off")
        .output()
        .unwrap();

    assert_eq!(output.status.code(), Some(2));
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        shown.contains(&format!(
            "{}:8:19: observers[0].actions[0].patterns: the pattern can match keys under the service's own Redis prefix (\"fraiseql_observers:\")",
            file.display()
        )),
        "{shown}"
    );
}

#[test]
fn run_checks_cache_patterns_against_the_prefix_given_as_a_flag() {
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("observers.yaml");
    std::fs::write(
        &file,
        observer_yaml("        patterns: 'tenant-a:*'", QUICK_RETRY),
    )
    .unwrap();

    // Fine under the default prefix; under `--redis-prefix tenant-a:` it would sweep the
    // node's own keys, so `run` refuses it before connecting anywhere.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fraiseql-observers"))
        .args(["run", "--config"])
        .arg(&file)
        .args([
            "--redis-prefix",
            "tenant-a:",
            "--redis-url",
            "redis://127.0.0.1:1",
        ])
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env_remove("FRAISEQL_OBSERVERS_REDIS_PREFIX")
        .env("RUST_LOG", "off")
        .output()
        .unwrap();

    assert_eq!(output.status.code(), Some(2));
    let shown = String::from_utf8_lossy(&output.stderr);
    assert!(
        shown.contains("observers[0].actions[0].patterns: the pattern can match keys under the service's own Redis prefix (\"tenant-a:\")"),
        "{shown}"
    );
}

#[tokio::test]
async fn data_fed_keys_and_patterns_leave_the_services_own_keys_alone() {
    use fraiseql_observers::breaker::{
        BreakerPolicy, BreakerStore, CallOutcome, RedisBreakerStore,
    };
    use fraiseql_observers::cache::{Cache, RedisCache};
    use fraiseql_observers::dedup::{DeduplicationStore, RedisDeduplicationStore};
    use fraiseql_observers::limits::{LimitStore, RedisLimitStore};

    let prefix = prefix();
    // The node's own prefix, inside this test's.
    let service = format!("{prefix}svc:");
    let mut connection = managed_connection(SHARED_REDIS).unwrap();
    // The service's state, written by its own stores.
    RedisDeduplicationStore::with_connection(connection.clone(), service.as_str())
        .claim("evt-1:order-cache:0", "node-a", Duration::from_mins(1))
        .await
        .unwrap();
    RedisBreakerStore::with_connection(connection.clone(), service.as_str())
        .record(
            "http://hooks:80",
            &BreakerPolicy::default(),
            CallOutcome::Failed,
        )
        .await
        .unwrap();
    RedisLimitStore::with_connection(connection.clone(), service.as_str())
        .enter("http://hooks:80", 5, Duration::from_mins(1))
        .await
        .unwrap();
    let cache = Cache {
        backend: std::sync::Arc::new(RedisCache::with_connection(connection.clone())),
        prefix: service.clone(),
        metrics: None,
    };
    cache
        .set(
            &format!("{service}cache:webhook:x"),
            "HTTP 200",
            Duration::from_mins(1),
        )
        .await;
    let service_keys = keys_under(&mut connection, &service).await;
    assert_eq!(service_keys.len(), 4, "{service_keys:?}");
    let others = [
        format!("{prefix}orders:ord-7"),
        format!("{prefix}orders:ord-8"),
        format!("{prefix}sessions:1"),
    ];
    set_keys(&mut connection, &others).await;
    let action = format!(
        "        keys: ['{{{{ data.key }}}}', '{{{{ data.other }}}}']\n        patterns: ['{prefix}{{{{ data.scope }}}}*']"
    );
    let runner_connection = connection.clone();
    let (executor, dead_letters) =
        executor_from_yaml_with(&observer_yaml(&action, QUICK_RETRY), &[], move |runner| {
            runner.with_cache(cache).with_redis(runner_connection)
        });
    let event = EntityEvent::new(
        EventKind::Update,
        "Order",
        "ord-7",
        json!({
            "key": service_keys[0],
            "other": format!("{prefix}sessions:1"),
            "scope": "",
        }),
        None,
    );

    let report = &executor.execute_event(&event).await.actions[0];

    assert_eq!(
        report.status,
        ActionStatus::Succeeded {
            detail: "removed 3 keys (2 exact, 1 pattern); left 5 of the service's own keys alone"
                .into()
        }
    );
    assert_eq!(
        keys_under(&mut connection, &prefix).await,
        service_keys,
        "the service's keys are intact, every other key is gone"
    );
    assert_eq!(dead_letters.count().await.unwrap(), 0);
}
