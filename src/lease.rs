//! The validity of a node's partition leases, shared by the cluster supervisor (which confirms
//! them at every heartbeat) and every executor of the node's partitions (which checks them before
//! each attempt). Vocabulary: no I/O.

/// How long this node may still act on its leases: until a little before peers could end them
/// (the node timeout, counted from the last heartbeat the database confirmed). A node paused or
/// cut off past that point dispatches nothing more for its partitions — not even the rest of a
/// page it had read — until a new heartbeat confirms the leases, or it finds them gone.
#[derive(Clone, Debug, Default)]
pub struct LeaseValidity(std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>);

impl LeaseValidity {
    /// Leases confirmed until `until` (as a heartbeat confirms them).
    #[must_use]
    pub fn confirmed_until(until: std::time::Instant) -> LeaseValidity {
        let validity = LeaseValidity::default();
        validity.set(Some(until));
        validity
    }

    /// Whether the leases are confirmed for now.
    #[must_use]
    pub fn holds(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|until| std::time::Instant::now() < until)
    }

    pub(crate) fn set(&self, until: Option<std::time::Instant>) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = until;
    }
}
