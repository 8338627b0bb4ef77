//! Persistence: the SQL the vault runs, per area, on SQLite and PostgreSQL
//! alike (one statement set through sqlx's `Any` driver: `$N` placeholders,
//! integer flags, names compared ignoring case on both; see [`crate::db`]).
//! Callers decide; these functions read and write, inside the caller's
//! transaction where they take one. The conformance suite
//! (`tests/db_conformance.rs`) runs them on both engines.
//!
//! - [`jobs`]: jobs, their steps, what a step looks at and what it writes.
//! - [`inventory`]: fabrics, agents, clouds, machines, networks, API tokens,
//!   registration keys.
//! - [`items`]: protected items and their recovery points.
//! - [`config`]: policies, cloud pairings and network mappings.
//! - [`plans`]: recovery plans.
//! - [`events`]: events, the conditions they were raised for, alert
//!   settings and webhook deliveries.
//! - [`seed`]: a fleet of rows for the API benchmark.
//! - [`agents`]: what the agent API reads and writes: enrolment, the
//!   heartbeat's inventory, task results, recovery point reports.

pub mod agents;
pub mod config;
pub mod events;
pub mod inventory;
pub mod items;
pub mod jobs;
pub mod plans;
pub mod seed;

/// `$first, $first+1, ...` for `n` values bound in an `IN (...)` list.
pub(crate) fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}
