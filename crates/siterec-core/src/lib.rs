//! Domain types and state machines of siterec.
//!
//! This crate does no I/O: everything here is plain data and pure functions,
//! tested without processes. The vault, the agent and the store build on it.
//!
//! - [`policy`]: replication policies and their validation.
//! - [`state`]: the protected item and job state machines, and the steps of each job.
//! - [`retention`]: which recovery points a policy lets go.
//! - [`wire`]: the agent protocol's messages.
//! - [`names`]: resource names and ARM ids.
//! - [`network`]: network mapping: the recovery network of each replica NIC.
//! - [`events`]: which events and alerts the vault raises from what it observes.
//! - [`orchestration`]: the job engine's decisions: which step, what it writes, compensation.
//! - [`jobquery`]: which jobs a `$filter` or an export asks for, and the export's CSV.

pub mod consistency;
pub mod events;
pub mod jobquery;
pub mod names;
pub mod network;
pub mod orchestration;
pub mod plan;
pub mod policy;
pub mod retention;
pub mod state;
pub mod wire;

pub use consistency::Consistency;
