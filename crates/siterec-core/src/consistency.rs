//! How consistent a recovery point is.

use serde::{Deserialize, Serialize};

/// The consistency of a recovery point, as Site Recovery reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Consistency {
    /// Application-consistent: taken while the guest's filesystems were frozen.
    AppConsistent,
    /// Crash-consistent: every disk as it was at one instant, as after a power cut.
    CrashConsistent,
    /// The source could not be read at one instant (no snapshot was available
    /// and writes landed during the read): blocks may come from different
    /// moments. Such a point is kept but said to be inconsistent.
    Inconsistent,
}

impl Consistency {
    /// The name used in the API (`recoveryPointType`-like strings).
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::AppConsistent => "AppConsistent",
            Consistency::CrashConsistent => "CrashConsistent",
            Consistency::Inconsistent => "Inconsistent",
        }
    }
}
