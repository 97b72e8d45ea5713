//! The failure scenarios: each starts a private cluster under a steady load, injects its fault,
//! and ends with the invariant check (`World::finish`). Run with
//! `cargo test --release -p chaos-tests`; the report goes to `target/chaos-report.md`.

use std::time::{Duration, SystemTime};

use chaos_tests::receiver::Capacity;
use chaos_tests::verify::{self, Fence};
use chaos_tests::{Expectations, World};

/// Load before a fault, so every partition is busy when it strikes.
const WARM_UP: Duration = Duration::from_secs(4);
/// Load after the cluster settled again.
const COOL_DOWN: Duration = Duration::from_secs(4);
/// The small receiver of s9: 4 requests at once, 5 ms each (800/s, twice the load), a 4-long
/// accept queue, one request per connection.
const SMALL_RECEIVER: Capacity = Capacity {
    workers: 4,
    service: Duration::from_millis(5),
    backlog: 4,
};
/// s9's bound on the recovery and on any pause in deliveries after the kill.
const SMALL_RECEIVER_RECOVERY: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_kill_9_the_busiest_leader() {
    let mut world = World::start("s1-kill-leader", 3).await;
    world.run_for(WARM_UP).await;
    let victim = world.busiest().await;
    let partitions = world.partitions_of(victim).await;
    let victim_id = world.node_id(victim);
    let killed = world.kill(victim).await;
    world
        .wait_taken_over_from(victim, Duration::from_secs(10))
        .await;
    world.run_for(COOL_DOWN).await;
    world.restart_node(victim);
    world.wait_balanced(Duration::from_secs(20)).await;
    world.run_for(COOL_DOWN).await;
    world
        .finish(Expectations {
            struck: vec![(victim_id, killed)],
            faults: vec![(killed, partitions)],
            ..Expectations::default()
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_kill_9_two_of_three_then_restart_them() {
    let mut world = World::start("s2-kill-two", 3).await;
    world.run_for(WARM_UP).await;
    let survivor = world.busiest().await;
    let victims: Vec<usize> = (0..3).filter(|index| *index != survivor).collect();
    let mut partitions = Vec::new();
    for victim in &victims {
        partitions.extend(world.partitions_of(*victim).await);
    }
    let mut struck = Vec::new();
    for victim in &victims {
        let at = world.kill(*victim).await;
        struck.push((world.node_id(*victim), at));
    }
    let killed = struck[0].1;
    world.wait_balanced(Duration::from_secs(10)).await;
    world.run_for(COOL_DOWN).await;
    for victim in &victims {
        world.restart_node(*victim);
    }
    world.wait_balanced(Duration::from_secs(20)).await;
    world.run_for(COOL_DOWN).await;
    world
        .finish(Expectations {
            struck,
            faults: vec![(killed, partitions)],
            ..Expectations::default()
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_paused_leader_is_fenced_when_it_wakes() {
    let mut world = World::start("s3-sigstop-leader", 3).await;
    world.run_for(WARM_UP).await;
    let zombie = world.busiest().await;
    let partitions = world.partitions_of(zombie).await;
    let zombie_id = world.node_id(zombie);
    let stopped = world.signal(zombie, "STOP");
    world
        .wait_taken_over_from(zombie, world.settings().node_timeout * 4)
        .await;
    // Paused well past the takeover, so every lease it held is someone else's now.
    world.run_for(Duration::from_secs(2)).await;
    let resumed = world.signal(zombie, "CONT");
    world.wait_balanced(Duration::from_secs(20)).await;
    world.run_for(COOL_DOWN).await;
    world
        .finish(Expectations {
            struck: vec![(zombie_id.clone(), stopped)],
            faults: vec![(stopped, partitions.clone())],
            fences: vec![Fence {
                node: zombie_id,
                lost_at: stopped,
                from: resumed,
                partitions,
            }],
            ..Expectations::default()
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4_node_cut_off_from_postgres_stops_and_rejoins() {
    let mut world = World::start("s4-network-partition", 3).await;
    world.run_for(WARM_UP).await;
    let isolated = world.busiest().await;
    let partitions = world.partitions_of(isolated).await;
    let isolated_id = world.node_id(isolated);
    let cut = world.cut(isolated);
    world
        .wait_taken_over_from(isolated, world.settings().node_timeout * 4)
        .await;
    world.run_for(COOL_DOWN).await;
    world.heal(isolated);
    world.wait_balanced(Duration::from_secs(30)).await;
    world.run_for(COOL_DOWN).await;
    // Cut off, the node may finish what it had started; past the node timeout it must be silent.
    let silent_from = cut + world.settings().node_timeout + Duration::from_millis(500);
    world
        .finish(Expectations {
            struck: vec![(isolated_id.clone(), cut)],
            faults: vec![(cut, partitions.clone())],
            fences: vec![Fence {
                node: isolated_id,
                lost_at: cut,
                from: silent_from,
                partitions,
            }],
            ..Expectations::default()
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_postgres_restart_under_load() {
    let mut world = World::start("s5-postgres-restart", 3).await;
    world.run_for(WARM_UP).await;
    let restarted = world.restart_postgres();
    world.wait_balanced(Duration::from_secs(30)).await;
    world.run_for(COOL_DOWN).await;
    let all: Vec<i32> = (0..8).collect();
    let struck = (0..3)
        .map(|index| (world.node_id(index), restarted))
        .collect();
    world
        .finish(Expectations {
            struck,
            faults: vec![(restarted, all)],
            ..Expectations::default()
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s6_rolling_restart_loses_and_repeats_nothing() {
    let mut world = World::start("s6-rolling-restart", 3).await;
    world.run_for(WARM_UP).await;
    let mut faults = Vec::new();
    for index in 0..3 {
        let partitions = world.partitions_of(index).await;
        let terminated = world.terminate(index).await;
        faults.push((terminated, partitions));
        world.restart_node(index);
        world.wait_balanced(Duration::from_secs(20)).await;
        world.run_for(Duration::from_secs(2)).await;
    }
    world.run_for(COOL_DOWN).await;
    world
        .finish(Expectations {
            faults,
            ..Expectations::default()
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s7_receiver_down_for_30_seconds() {
    let mut world = World::start("s7-receiver-down", 3).await;
    world.run_for(WARM_UP).await;
    let down = world.receiver_down();
    world.run_for(Duration::from_secs(30)).await;
    let up = world.receiver_up().await;
    world.run_for(COOL_DOWN).await;
    let all: Vec<i32> = (0..8).collect();
    let struck = (0..3).map(|index| (world.node_id(index), down)).collect();
    world
        .finish(Expectations {
            struck,
            faults: vec![(up, all)],
            ..Expectations::default()
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s8_redis_killed_then_restarted() {
    let mut world = World::start("s8-redis-restart", 3).await;
    world.run_for(WARM_UP).await;
    let claims_before = world.redis().key_count().await.unwrap_or(0);
    let killed = world.kill_redis().await;
    let delivered_at_kill = world.deliveries();
    world.run_for(Duration::from_secs(6)).await;
    let degraded = world.deliveries() - delivered_at_kill;
    world.restart_redis().await;
    let all: Vec<i32> = (0..8).collect();
    let redis = world.redis().key_count().await.unwrap_or(0);
    assert_eq!(redis, 0, "a restarted private Redis starts empty");
    world.run_for(COOL_DOWN).await;
    let claims_after = world.redis().key_count().await.unwrap_or(0);
    world
        .finish(Expectations {
            faults: vec![(killed, all)],
            extra: vec![
                if claims_before > 0 {
                    Ok(())
                } else {
                    Err("no deduplication claims in Redis before the kill".to_owned())
                },
                if degraded > 1_000 {
                    Ok(())
                } else {
                    Err(format!(
                        "only {degraded} deliveries in the 6 s without Redis: not degraded but stopped"
                    ))
                },
                if claims_after > 0 {
                    Ok(())
                } else {
                    Err("deduplication did not resume: no claims in the restarted Redis".to_owned())
                },
            ],
            ..Expectations::default()
        })
        .await;
}

/// A node killed while its actions hold deduplication claims (in flight, or waiting for a slot at
/// the small receiver): the survivors take those claims over as soon as the node's lease session
/// is gone, so the orders move on with their partitions. Passed once (2026-12-05: recovery
/// 1,216 ms) but takes minutes, so a plain run skips it.
/// Run it with `cargo test --release -p chaos-tests s9 -- --include-ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long-running (108 s in its latest run) and its 2 s recovery bound has one passing run of the current limiter; run explicitly"]
async fn s9_small_receiver_kill_9_the_busiest_leader() {
    let mut world =
        World::start_with("s9-small-receiver-kill-leader", 3, Some(SMALL_RECEIVER)).await;
    world.run_for(WARM_UP).await;
    let victim = world.busiest().await;
    let partitions = world.partitions_of(victim).await;
    let victim_id = world.node_id(victim);
    let killed = world.kill(victim).await;
    world
        .wait_taken_over_from(victim, Duration::from_secs(10))
        .await;
    world.run_for(COOL_DOWN).await;
    let after_kill = verify::longest_gap(&world.delivery_log(), killed, SystemTime::now());
    world.restart_node(victim);
    world.wait_balanced(Duration::from_secs(20)).await;
    world.run_for(COOL_DOWN).await;
    println!(
        "s9: receiver capacity {:.0}/s; longest pause in deliveries after the kill {} ms",
        SMALL_RECEIVER.per_second(),
        after_kill.as_millis()
    );
    world
        .finish(Expectations {
            struck: vec![(victim_id, killed)],
            faults: vec![(killed, partitions)],
            recovery_within: Some(SMALL_RECEIVER_RECOVERY),
            extra: vec![if after_kill <= SMALL_RECEIVER_RECOVERY {
                Ok(())
            } else {
                Err(format!(
                    "no delivery for {} ms after the kill (at most {} ms allowed)",
                    after_kill.as_millis(),
                    SMALL_RECEIVER_RECOVERY.as_millis()
                ))
            }],
            ..Expectations::default()
        })
        .await;
}
