//! The chaos harness: real `fraiseql-observers` processes (the release binary) against a private
//! PostgreSQL — each node through its own fault-injecting proxy — a private Redis and a real
//! webhook receiver, under a steady load of changes to a tracked `orders (id, version)` table.
//!
//! A scenario starts a [`World`], injects its faults, and ends with [`World::finish`], which waits
//! for the backlog to drain and checks the invariants: nothing lost (receiver vs change log),
//! duplicates within what the fault allows, per-order versions in change order, checkpoints never
//! moving backwards, every partition led by exactly one live node, fenced nodes silent. The
//! measured row goes to `target/chaos-report.md` and stdout; a broken invariant fails the test.

pub mod load;
pub mod node;
pub mod postgres;
pub mod proxy;
pub mod receiver;
pub mod redis;
pub mod report;
pub mod verify;
mod world;

use std::path::PathBuf;

pub use world::{Expectations, Fault, World};

/// A port nothing listens on right now.
#[must_use]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

/// The cargo target directory this test binary was built in (`…/target`).
#[must_use]
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    // …/target/<profile>/deps/<test binary>
    let executable = std::env::current_exe().expect("test binary path");
    executable
        .ancestors()
        .nth(3)
        .map_or_else(|| PathBuf::from("target"), PathBuf::from)
}
