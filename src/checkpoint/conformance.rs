//! The behaviour every [`CheckpointStore`] must have. `snapshots` are two valid snapshot texts
//! for the store (any strings for the in-memory one; `pg_snapshot` texts for PostgreSQL).

use super::{ActionKey, BatchPosition, CheckpointError, CheckpointStore};

/// Runs the suite on partition 7 of an empty store. Panics on the first violation.
pub async fn run(store: &dyn CheckpointStore, snapshots: [&str; 2]) {
    assert!(
        store.load(7).await.unwrap().is_none(),
        "an unclaimed partition has no checkpoint"
    );
    let first = store.claim(7, "node-a").await.unwrap();
    assert_eq!(first.epoch, 1);
    assert_eq!(
        first.position,
        BatchPosition::default(),
        "a new partition starts at the beginning"
    );

    let key = |index: usize| ActionKey {
        event_id: uuid::Uuid::from_u128(42),
        observer: "orders".into(),
        action_index: index,
    };
    let in_batch = BatchPosition {
        snapshot: None,
        batch_upto: Some(snapshots[0].into()),
        batch_position: Some(10),
    };
    let saved = store
        .save(&first, in_batch.clone(), &[key(0)])
        .await
        .unwrap();
    assert_eq!(saved.version, first.version + 1);
    assert_eq!(saved.position, in_batch);
    assert_eq!(
        store.load(7).await.unwrap().unwrap(),
        saved,
        "what is saved is what is loaded"
    );

    // A second save from the same stale view is a conflict, detected, not overwritten.
    let stale = store
        .save(&first, BatchPosition::default(), &[key(5)])
        .await;
    assert!(
        matches!(stale, Err(CheckpointError::FencedOut { partition: 7, .. })),
        "{stale:?}"
    );
    assert_eq!(store.load(7).await.unwrap().unwrap(), saved);

    // Another node claims the partition: the old holder is fenced out, the new one continues.
    let taken = store.claim(7, "node-b").await.unwrap();
    assert_eq!(taken.epoch, 2);
    assert_eq!(
        taken.position, in_batch,
        "the successor resumes from the saved position"
    );
    let old_holder = store
        .save(
            &saved,
            BatchPosition {
                snapshot: Some(snapshots[1].into()),
                ..BatchPosition::default()
            },
            &[key(6)],
        )
        .await;
    assert!(
        matches!(old_holder, Err(CheckpointError::FencedOut { .. })),
        "{old_holder:?}"
    );
    let done = BatchPosition {
        snapshot: Some(snapshots[1].into()),
        batch_upto: None,
        batch_position: None,
    };
    let moved = store.save(&taken, done.clone(), &[key(1)]).await.unwrap();
    assert_eq!(moved.position, done);
    assert_eq!(moved.epoch, 2);

    // Completed actions: those saved or recorded count; those of rejected saves do not.
    store.record_completed(&[key(2)]).await.unwrap();
    store.record_completed(&[key(2)]).await.unwrap();
    let completed = store
        .completed_among(&[uuid::Uuid::from_u128(42), uuid::Uuid::from_u128(1)])
        .await
        .unwrap();
    let mut indexes: Vec<usize> = completed.iter().map(|key| key.action_index).collect();
    indexes.sort_unstable();
    assert_eq!(indexes, [0, 1, 2]);
    assert!(store.completed_among(&[]).await.unwrap().is_empty());
}
