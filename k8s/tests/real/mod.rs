//! Objects on a real API server: the helpers live in
//! `tlsmesh_kube_harness::objects` (shared with tests/); here only what
//! needs tlsmesh's own types.

#![allow(dead_code, unused_imports, reason = "each test file uses a different part")]

use tlsmesh_inventory::Inventory;
pub use tlsmesh_kube_harness::objects::*;
use tokio::sync::watch;

/// Waits (≤ [`WAIT`]) until the published inventory satisfies `cond`.
pub async fn until(
    rx: &mut watch::Receiver<Inventory>,
    what: &str,
    cond: impl FnMut(&Inventory) -> bool,
) -> Inventory {
    let found = match tokio::time::timeout(WAIT, rx.wait_for(cond)).await {
        Ok(Ok(inv)) => Some(inv.clone()),
        _ => None,
    };
    found.unwrap_or_else(|| {
        panic!("timed out after {WAIT:?} waiting for {what}; last inventory: {:#?}", *rx.borrow())
    })
}
