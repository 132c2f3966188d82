//! Named fault points for the failure tests (issue 14 point 4): a test
//! starts a daemon with `FAILPOINTS=<name>=<actions>` (the `fail` crate's
//! syntax, e.g. `handover-take=5*off->return`) and the task that reaches
//! the point stops there, as if its daemon had hung or died halfway.
//!
//! Only builds with the `failpoints` feature (the test build) read
//! `FAILPOINTS`; in every other build a point compiles to nothing.

use tracing::warn;

/// The new daemon, about to take the next offered connection.
pub const HANDOVER_TAKE: &str = "handover-take";
/// The old daemon, about to offer a connection to the new one.
pub const HANDOVER_OFFER: &str = "handover-offer";

/// Arms the points named in `FAILPOINTS`; keep the guard for the process's
/// life.
#[must_use]
pub fn setup() -> fail::FailScenario<'static> {
    fail::FailScenario::setup()
}

/// Whether the point `name` is armed to fire now (action `return`).
#[cfg_attr(
    not(feature = "failpoints"),
    expect(unused_variables, reason = "without the feature a point compiles to nothing")
)]
pub fn fires(name: &str) -> bool {
    fail::fail_point!(name, |_| true);
    false
}

/// Stops the calling task here for good when `name` fires.
pub async fn hold_if_fires(name: &str) {
    if fires(name) {
        warn!(point = name, "fault injected: this task stops here");
        std::future::pending::<()>().await;
    }
}
