//! tlsmesh-cni: the chained CNI plugin that enrolls each pod with the node
//! daemon before the pod's containers run, its protocol with the daemon, and
//! the installer that chains it into the host's CNI configuration.
//!
//! * [`protocol`]: the JSON messages on the daemon's Unix socket (the daemon
//!   side is `tlsmesh_k8s::cni_server`).
//! * [`plugin`]: what the plugin does per `CNI_COMMAND`, pure over its inputs.
//! * [`client`]: the blocking socket client the binary uses.
//! * [`install`]: `tlsmesh-cni install|uninstall`.

#![forbid(unsafe_code)]
pub mod client;
pub mod install;
pub mod plugin;
pub mod protocol;
