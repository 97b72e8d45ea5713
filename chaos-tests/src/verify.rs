//! The invariants, as functions of what was recorded: the change log, the receiver's deliveries
//! and the partition rows sampled during the run.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, SystemTime};

use crate::receiver::Delivery;

/// One committed change an observer matches (from the change log).
#[derive(Clone, Debug)]
pub struct Change {
    pub entity_id: String,
    pub version: i64,
    /// Its transaction's start (`created_at`); one change per transaction, so ≈ its commit.
    pub created_at: SystemTime,
    pub partition: i32,
}

/// One partition row as seen at one moment.
#[derive(Clone, Debug)]
pub struct Sample {
    pub partition: i32,
    pub epoch: i64,
    pub checkpoint_version: i64,
    /// `xmax` of the checkpoint snapshot (none before the first checkpoint).
    pub position: Option<i64>,
    pub leader: Option<String>,
    pub leased_at: Option<SystemTime>,
}

/// A node that lost its partitions at `lost_at` and must not deliver for them from `from` on,
/// unless it leased them again.
#[derive(Clone, Debug)]
pub struct Fence {
    pub node: String,
    pub lost_at: SystemTime,
    pub from: SystemTime,
    pub partitions: Vec<i32>,
}

/// Changes with no delivery at all: `(entity, version)`.
#[must_use]
pub fn lost(changes: &[Change], deliveries: &[Delivery]) -> Vec<(String, i64)> {
    let delivered: HashSet<(&str, i64)> = deliveries
        .iter()
        .map(|delivery| (delivery.entity_id.as_str(), delivery.version))
        .collect();
    let mut missing: Vec<(String, i64)> = changes
        .iter()
        .filter(|change| !delivered.contains(&(change.entity_id.as_str(), change.version)))
        .map(|change| (change.entity_id.clone(), change.version))
        .collect();
    missing.sort();
    missing
}

/// Deliveries beyond the first of each idempotency key.
#[must_use]
pub fn duplicates(deliveries: &[Delivery]) -> usize {
    let distinct: HashSet<&str> = deliveries
        .iter()
        .map(|delivery| delivery.idempotency_key.as_str())
        .collect();
    deliveries.len() - distinct.len()
}

/// Orders whose first deliveries (per idempotency key, in arrival order) do not follow the
/// version counter upwards, each with the offending pair.
#[must_use]
pub fn out_of_order(deliveries: &[Delivery]) -> Vec<String> {
    let mut seen_keys: HashSet<&str> = HashSet::new();
    let mut last: HashMap<&str, i64> = HashMap::new();
    let mut broken = Vec::new();
    for delivery in deliveries {
        if !seen_keys.insert(delivery.idempotency_key.as_str()) {
            continue;
        }
        if let Some(previous) = last.insert(delivery.entity_id.as_str(), delivery.version)
            && previous >= delivery.version
        {
            broken.push(format!(
                "order {}: version {} after {previous}",
                delivery.entity_id, delivery.version
            ));
        }
    }
    broken
}

/// A checkpoint that moved backwards: an epoch lower than one seen before, or, within an epoch,
/// a lower checkpoint version; or a snapshot position lower than one seen before.
#[must_use]
pub fn checkpoint_regressions(samples: &[Sample]) -> Vec<String> {
    let mut last: HashMap<i32, &Sample> = HashMap::new();
    let mut regressions = Vec::new();
    for sample in samples {
        if let Some(before) = last.get(&sample.partition) {
            let epoch_back = sample.epoch < before.epoch;
            let version_back = sample.epoch == before.epoch
                && sample.checkpoint_version < before.checkpoint_version;
            let position_back = match (before.position, sample.position) {
                (Some(earlier), Some(later)) => later < earlier,
                (Some(_), None) => true,
                _ => false,
            };
            if epoch_back || version_back || position_back {
                regressions.push(format!(
                    "partition {}: (epoch {}, version {}, position {:?}) after (epoch {}, version {}, position {:?})",
                    sample.partition,
                    sample.epoch,
                    sample.checkpoint_version,
                    sample.position,
                    before.epoch,
                    before.checkpoint_version,
                    before.position
                ));
            }
        }
        last.insert(sample.partition, sample);
    }
    regressions
}

/// For every `(moment, partitions)`: the time from `moment` to the first delivery, on each of
/// those partitions, of a change committed at or after it. The worst one, or the partitions that
/// saw no such delivery.
pub fn recovery(
    changes: &[Change],
    deliveries: &[Delivery],
    faults: &[(SystemTime, Vec<i32>)],
) -> Result<Option<Duration>, Vec<String>> {
    let by_change: HashMap<(&str, i64), &Change> = changes
        .iter()
        .map(|change| ((change.entity_id.as_str(), change.version), change))
        .collect();
    let mut worst: Option<Duration> = None;
    let mut missing = Vec::new();
    for (moment, partitions) in faults {
        for partition in partitions {
            let first = deliveries
                .iter()
                .filter(|delivery| {
                    by_change
                        .get(&(delivery.entity_id.as_str(), delivery.version))
                        .is_some_and(|change| {
                            change.partition == *partition && change.created_at >= *moment
                        })
                })
                .map(|delivery| delivery.at)
                .min();
            match first {
                Some(at) => {
                    let took = at.duration_since(*moment).unwrap_or_default();
                    worst = Some(worst.map_or(took, |worst| worst.max(took)));
                }
                None => missing.push(format!(
                    "partition {partition}: no delivery of a change committed after {}",
                    crate::world::clock(*moment)
                )),
            }
        }
    }
    if missing.is_empty() {
        Ok(worst)
    } else {
        Err(missing)
    }
}

/// Deliveries a fenced node made for partitions it had lost and not leased again.
#[must_use]
pub fn fenced_deliveries(
    changes: &[Change],
    deliveries: &[Delivery],
    samples: &[Sample],
    fences: &[Fence],
) -> Vec<String> {
    let partition_of: HashMap<&str, i32> = changes
        .iter()
        .map(|change| (change.entity_id.as_str(), change.partition))
        .collect();
    // Every lease seen: (partition, leader) → lease times.
    let mut leases: BTreeMap<(i32, &str), Vec<SystemTime>> = BTreeMap::new();
    for sample in samples {
        if let (Some(leader), Some(at)) = (&sample.leader, sample.leased_at) {
            let times = leases
                .entry((sample.partition, leader.as_str()))
                .or_default();
            if !times.contains(&at) {
                times.push(at);
            }
        }
    }
    let mut broken = Vec::new();
    for fence in fences {
        for delivery in deliveries {
            if delivery.node != fence.node || delivery.at <= fence.from {
                continue;
            }
            let Some(&partition) = partition_of.get(delivery.entity_id.as_str()) else {
                continue;
            };
            if !fence.partitions.contains(&partition) {
                continue;
            }
            let leased_again = leases
                .get(&(partition, fence.node.as_str()))
                .is_some_and(|times| {
                    times
                        .iter()
                        .any(|at| *at > fence.lost_at && *at <= delivery.at)
                });
            if !leased_again {
                broken.push(format!(
                    "{} delivered order {} version {} (partition {partition}) at {} after losing the partition",
                    fence.node,
                    delivery.entity_id,
                    delivery.version,
                    crate::world::clock(delivery.at)
                ));
            }
        }
    }
    broken
}

/// The longest time without any delivery between `from` and `to` (counting from `from` to the
/// first delivery and from the last one to `to`).
#[must_use]
pub fn longest_gap(deliveries: &[Delivery], from: SystemTime, to: SystemTime) -> Duration {
    let mut times: Vec<SystemTime> = deliveries
        .iter()
        .map(|delivery| delivery.at)
        .filter(|at| *at >= from && *at <= to)
        .collect();
    times.sort_unstable();
    let mut longest = Duration::ZERO;
    let mut previous = from;
    for at in times.into_iter().chain(std::iter::once(to)) {
        longest = longest.max(at.duration_since(previous).unwrap_or_default());
        previous = at;
    }
    longest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(millis: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(millis)
    }

    fn delivery(millis: u64, node: &str, entity: &str, version: i64) -> Delivery {
        Delivery {
            at: at(millis),
            node: node.to_owned(),
            idempotency_key: format!("{entity}:{version}"),
            entity_id: entity.to_owned(),
            version,
        }
    }

    fn change(entity: &str, version: i64, millis: u64, partition: i32) -> Change {
        Change {
            entity_id: entity.to_owned(),
            version,
            created_at: at(millis),
            partition,
        }
    }

    fn sample(partition: i32, epoch: i64, version: i64, position: Option<i64>) -> Sample {
        Sample {
            partition,
            epoch,
            checkpoint_version: version,
            position,
            leader: None,
            leased_at: None,
        }
    }

    #[test]
    fn lost_duplicates_and_order_are_counted_from_the_deliveries() {
        let changes = [
            change("1", 1, 0, 0),
            change("1", 2, 5, 0),
            change("2", 1, 0, 1),
        ];
        let deliveries = [
            delivery(10, "a", "1", 2),
            delivery(11, "a", "1", 1),
            delivery(12, "b", "1", 1),
        ];
        assert_eq!(lost(&changes, &deliveries), vec![("2".to_owned(), 1)]);
        assert_eq!(duplicates(&deliveries), 1);
        assert_eq!(
            out_of_order(&deliveries),
            vec!["order 1: version 1 after 2".to_owned()]
        );
        assert!(
            out_of_order(&deliveries[1..]).is_empty(),
            "a redelivery is not a reorder"
        );
    }

    #[test]
    fn the_longest_gap_counts_the_window_edges() {
        let deliveries = [
            delivery(150, "a", "1", 1),
            delivery(50, "a", "1", 2),
            delivery(120, "b", "2", 1),
            delivery(900, "a", "2", 2),
        ];
        assert_eq!(
            longest_gap(&deliveries, at(100), at(400)),
            Duration::from_millis(250)
        );
        assert_eq!(
            longest_gap(&deliveries, at(0), at(160)),
            Duration::from_millis(70)
        );
        assert_eq!(longest_gap(&[], at(0), at(10)), Duration::from_millis(10));
    }

    #[test]
    fn a_checkpoint_moving_backwards_is_caught() {
        let forward = [
            sample(0, 1, 1, None),
            sample(0, 1, 2, Some(10)),
            sample(0, 2, 0, Some(10)),
            sample(0, 2, 1, Some(12)),
        ];
        assert!(checkpoint_regressions(&forward).is_empty());
        assert_eq!(
            checkpoint_regressions(&[sample(0, 2, 5, Some(9)), sample(0, 1, 6, Some(9))]).len(),
            1
        );
        assert_eq!(
            checkpoint_regressions(&[sample(0, 2, 5, Some(9)), sample(0, 2, 4, Some(9))]).len(),
            1
        );
        assert_eq!(
            checkpoint_regressions(&[sample(0, 2, 5, Some(9)), sample(0, 3, 0, Some(8))]).len(),
            1
        );
    }

    #[test]
    fn recovery_is_the_worst_first_delivery_after_the_fault() {
        let changes = [
            change("1", 1, 90, 0),
            change("1", 2, 110, 0),
            change("2", 1, 120, 1),
        ];
        let deliveries = [
            delivery(95, "a", "1", 1),
            delivery(400, "a", "1", 2),
            delivery(250, "a", "2", 1),
        ];
        assert_eq!(
            recovery(&changes, &deliveries, &[(at(100), vec![0, 1])]),
            Ok(Some(Duration::from_millis(300)))
        );
        assert!(recovery(&changes, &deliveries, &[(at(500), vec![0])]).is_err());
    }

    #[test]
    fn a_fenced_node_may_deliver_only_after_leasing_again() {
        let changes = [
            change("1", 1, 0, 0),
            change("1", 2, 0, 0),
            change("2", 1, 0, 1),
        ];
        let fence = Fence {
            node: "a".to_owned(),
            lost_at: at(100),
            from: at(200),
            partitions: vec![0, 1],
        };
        let mut leased = sample(0, 3, 0, None);
        leased.leader = Some("a".to_owned());
        leased.leased_at = Some(at(300));
        let deliveries = [
            delivery(150, "a", "1", 1), // before it could notice: allowed
            delivery(250, "a", "2", 1), // partition 1, never leased again
            delivery(350, "a", "1", 2), // partition 0, leased again at 300
            delivery(260, "b", "2", 1), // another node
        ];
        let broken = fenced_deliveries(&changes, &deliveries, &[leased], &[fence]);
        assert_eq!(broken.len(), 1, "{broken:?}");
        assert!(broken[0].contains("order 2"));
    }
}
