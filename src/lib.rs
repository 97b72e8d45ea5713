//! `fraiseql-observers`: turns PostgreSQL changes into reliable side effects.
//!
//! The data flows down this list: a change becomes an [`domain::EntityEvent`], the
//! [`matcher`] finds the observers for its entity and kind, their [`condition`]s filter it,
//! the [`executor`] runs the matched [`actions`] with [`retry`], and what fails for good lands
//! in the [`dlq`]. [`observers`] loads an observers file into the compiled form all of them
//! use, each action type decoding its own settings with the shared primitives of [`config`].

pub mod actions;
pub mod backfill;
pub mod breaker;
pub mod cache;
pub mod change_log;
pub mod checkpoint;
pub mod cluster;
pub mod commands;
pub mod concurrency;
pub mod condition;
pub mod config;
pub mod control;
pub mod coordinator;
pub mod database;
pub mod dedup;
pub mod demo;
pub mod dlq;
pub mod domain;
pub mod error;
pub mod escape;
pub mod executor;
pub mod grpc;
pub mod history;
pub mod history_export;
pub mod http;
pub mod jobs;
pub mod lease;
pub mod limits;
pub mod listener;
pub mod matcher;
pub mod membership;
pub mod metrics;
pub mod metrics_text;
pub mod migrate;
pub mod node;
pub mod observers;
pub mod outcome;
pub mod redis_client;
pub mod replay;
pub mod report;
pub mod requeue;
pub mod retry;
pub mod template;
pub mod worker;
