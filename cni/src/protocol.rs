//! The plugin ↔ daemon protocol over the node-local Unix socket.
//!
//! One request per connection: the plugin connects, writes one JSON object
//! followed by `\n`, and the daemon answers with one JSON object followed by
//! `\n`, then closes. Each message is at most [`MAX_MESSAGE`] bytes. The
//! daemon answers an `add` only once the pod is enrolled (listeners up,
//! inbound capture attached, enrollment map entry written), or once it knows
//! the pod is not to be enrolled; the plugin waits for that answer, so the
//! pod's containers never start before its capture is in place.
//!
//! ```json
//! {"version":1,"command":"add","containerId":"4f…","netns":"/var/run/netns/cni-1c…","ifname":"eth0",
//!  "podNamespace":"shop","podName":"web-7d9","podUid":"0b5…","ips":["10.244.1.5","fd00:10:244:1::5"]}
//!
//! {"status":"enrolled","mode":"strict"}
//! {"status":"not_enrolled","reason":"namespace shop is not labelled tlsmesh.io/mode"}
//! {"status":"ok"}                       (answer to del)
//! {"status":"error","message":"…"}     (the plugin fails the pod sandbox)
//! ```

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Where the daemon listens unless the plugin config says otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/tlsmesh/cni.sock";

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest request or response, in bytes (newline included).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// What the runtime asked the plugin to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    /// A pod sandbox was created (`CNI_COMMAND=ADD`).
    Add,
    /// A pod sandbox is being torn down (`CNI_COMMAND=DEL`).
    Del,
}

/// The plugin's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// `add` or `del`.
    pub command: Command,
    /// `CNI_CONTAINERID`: the sandbox id.
    pub container_id: String,
    /// `CNI_NETNS`: the pod's network namespace path (may be absent on `del`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// `CNI_IFNAME`.
    #[serde(default)]
    pub ifname: String,
    /// `K8S_POD_NAMESPACE` from `CNI_ARGS`.
    pub pod_namespace: String,
    /// `K8S_POD_NAME` from `CNI_ARGS`.
    pub pod_name: String,
    /// `K8S_POD_UID` from `CNI_ARGS`, when the runtime passes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The pod's addresses from the previous plugin's result (the API server
    /// does not know them yet when `add` runs).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

impl Request {
    /// `namespace/name`, the inventory key of the pod.
    pub fn pod_key(&self) -> String {
        format!("{}/{}", self.pod_namespace, self.pod_name)
    }
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Response {
    /// The pod is enrolled: its traffic is captured from the first packet.
    Enrolled {
        /// `strict` or `permissive`.
        mode: String,
    },
    /// The pod is not to be enrolled (namespace not labelled, pod opted out).
    NotEnrolled {
        /// Why, for the runtime's log.
        reason: String,
    },
    /// `del` acknowledged.
    Ok,
    /// The daemon could not do what the pod needs; the sandbox must fail.
    Error {
        /// What went wrong and what to do.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_the_documented_one() {
        let req = Request {
            version: PROTOCOL_VERSION,
            command: Command::Add,
            container_id: "c1".into(),
            netns: Some("/var/run/netns/cni-1".into()),
            ifname: "eth0".into(),
            pod_namespace: "shop".into(),
            pod_name: "web".into(),
            pod_uid: None,
            ips: vec!["10.244.1.5".parse().unwrap()],
        };
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"version":1,"command":"add","containerId":"c1","netns":"/var/run/netns/cni-1","ifname":"eth0","podNamespace":"shop","podName":"web","ips":["10.244.1.5"]}"#
        );
        assert_eq!(req.pod_key(), "shop/web");
        let r: Response = serde_json::from_str(r#"{"status":"enrolled","mode":"strict"}"#).unwrap();
        assert_eq!(r, Response::Enrolled { mode: "strict".into() });
        let r: Response =
            serde_json::from_str(r#"{"status":"not_enrolled","reason":"x"}"#).unwrap();
        assert_eq!(r, Response::NotEnrolled { reason: "x".into() });
        assert_eq!(serde_json::to_string(&Response::Ok).unwrap(), r#"{"status":"ok"}"#);
    }
}
