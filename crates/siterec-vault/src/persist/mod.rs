//! Persistence: the SQL the vault runs, per area, on SQLite and PostgreSQL
//! alike (one statement set through sqlx's `Any` driver: `$N` placeholders,
//! integer flags, names compared ignoring case on both; see [`crate::db`]).
//! Callers decide; these functions read and write, inside the caller's
//! transaction where they take one. The conformance suite
//! (`tests/db_conformance.rs`) runs them on both engines.
//!
//! - [`jobs`]: jobs, their steps, what a step looks at and what it writes.
//! - [`agents`]: what the agent API reads and writes: enrolment, the
//!   heartbeat's inventory, task results, recovery point reports.

pub mod agents;
pub mod jobs;
