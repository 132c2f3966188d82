//! The authorization policy in force: the TOML rules file and the policy
//! objects from Kubernetes (`L4Policy`, Istio's `AuthorizationPolicy`),
//! combined into one [`MeshPolicy`] (a deny from either denies; see
//! docs/KUBERNETES.md §11). Putting a new policy in force re-checks every
//! open connection and closes those it denies, as ztunnel does: the change
//! is logged per connection and counted (`policy_closed`).

use tracing::{info, warn};

use crate::{
    authz,
    conns::ConnTable,
    inventory::Problem,
    policy::{mesh::MeshPolicy, Policy},
    state::{NodeState, ProblemSource},
    stats::Stats,
};

/// The two sources of policy, as last read.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    file: Policy,
    objects: MeshPolicy,
}

impl Policies {
    /// The TOML rules alone (no objects yet).
    pub fn new(file: Policy) -> Self {
        Self { file, objects: MeshPolicy::default() }
    }

    /// New TOML rules.
    pub fn set_file(&mut self, file: Policy) {
        self.file = file;
    }

    /// New policy objects (as compiled by the Kubernetes policy watcher).
    pub fn set_objects(&mut self, objects: MeshPolicy) {
        self.objects = objects;
    }

    /// Both together, as decisions use them.
    pub fn combined(&self) -> MeshPolicy {
        self.objects.clone().with_rules(&self.file)
    }

    /// Puts the combined policy in force for new connections, reports what
    /// the objects could not use as written, and closes the open
    /// connections it denies. Returns how many were closed.
    pub fn put_in_force(&self, node: &NodeState, conns: &ConnTable, counters: &Stats) -> usize {
        let policy = self.combined();
        let problems = self
            .objects
            .problems
            .iter()
            .map(|p| Problem { subject: p.subject.clone(), message: p.message.clone() })
            .collect();
        node.set_problems(ProblemSource::Policy, problems);
        // New connections first, then the open ones.
        node.set_policy(policy.clone());
        let inv = node.inventory();
        let closed = conns.close_where(|c| {
            match authz::recheck(&policy, c, |key| inv.inv.pods.get(key)) {
                Ok(()) => false,
                Err(reason) => {
                    warn!(pod = %c.pod, src = %c.src, dst = %c.dst, identity = ?c.src_identity, route = c.route.as_str(), %reason, "open connection denied by the new policy; closing it");
                    true
                }
            }
        });
        Stats::add(&counters.policy_closed, closed as u64);
        info!(
            authorizations = policy.authorizations.len(),
            rules = self.file.rules.len(),
            closed,
            "policy in force"
        );
        closed
    }
}
