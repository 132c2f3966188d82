//! deploy/ against the real CLI and config: the node config embedded in the
//! manifests' `ConfigMap` (and in the Helm chart rendered with its default
//! values) must parse as `NodeConfig` (which denies unknown keys), the
//! arguments given to `tlsmesh node` and `tlsmesh ca serve` must parse with
//! the real command line, and the paths, audience and `ServiceAccount` they
//! name must match the volumes and objects of the same manifests.
//!
//! The chart's templates are rendered here by the small test renderer in
//! `support/helm_mini.rs` (no helm needed), which knows only the constructs
//! these templates use; anything else makes the test fail with a message
//! saying to teach it, rather than pass silently. `deploy_tools.rs` renders
//! and lints the chart with real Helm and checks it renders the same.

#![allow(
    clippy::similar_names,
    clippy::many_single_char_names,
    clippy::cast_possible_truncation,
    clippy::format_push_string,
    clippy::items_after_statements,
    clippy::large_stack_arrays,
    clippy::too_many_lines,
    clippy::format_collect,
    reason = "test scenarios: long, explicit, with throwaway names"
)]

#[path = "support/helm_mini.rs"]
mod helm_mini;

use std::path::Path;

use helm_mini::{
    check_ca_args, check_node_config, check_surge_upgrade, container, manifest_objects, mount_path,
    object, parse_ca_args, parse_node_config, render_chart, resolve_node_args, strings,
    CUSTOM_VALUES, NAMESPACE,
};
use tlsmesh::config::{LogFormat, Transport};

#[test]
fn static_manifests_match_the_cli_and_config() {
    let objs = manifest_objects();
    let cm = object(&objs, "ConfigMap", "tlsmesh-node");
    let text = cm["data"]["node.toml"].as_str().expect("ConfigMap tlsmesh-node has node.toml");
    let parsed = parse_node_config(text, "deploy/manifests ConfigMap tlsmesh-node");

    let ds = object(&objs, "DaemonSet", "tlsmesh-node");
    let node = container(ds, "node");
    let cfg = resolve_node_args(&strings(&node["args"]), text, "manifests-node");
    assert_eq!(cfg.log_format, LogFormat::Json);
    assert_eq!(cfg.transport, parsed.transport);
    check_node_config(&cfg, node, &ds["spec"]["template"]["spec"]["volumes"], "manifests");
    check_surge_upgrade(ds, &cfg, "manifests");
    // The config is mounted where --config says.
    let args = strings(&node["args"]);
    let at = args.iter().position(|a| a == "--config").unwrap();
    assert_eq!(Path::new(&args[at + 1]), mount_path(node, "config"));

    let ns = ds["metadata"]["namespace"].as_str().unwrap();
    let node_sa = ds["spec"]["template"]["spec"]["serviceAccountName"].as_str().unwrap();
    let ca_deploy = object(&objs, "Deployment", "tlsmesh-ca");
    let ca_container = container(ca_deploy, "ca");
    let ca = parse_ca_args(&strings(&ca_container["args"]), "manifests-ca");
    check_ca_args(&ca, &format!("system:serviceaccount:{ns}:{node_sa}"), "manifests");
    assert_eq!(ca.trust_domain.as_deref(), Some(cfg.trust_domain.as_str()), "one trust domain");
    assert_eq!(ca.log_format, LogFormat::Json);
    // --cert/--key are in the Secret's mount.
    let secret = mount_path(ca_container, "ca");
    assert!(
        ca.cert.as_ref().unwrap().starts_with(&secret)
            && ca.key.as_ref().unwrap().starts_with(&secret)
    );
    // Nodes dial a name the CA's certificate carries, at the Service's port.
    let server_name = cfg.identity.ca_server_name.clone().unwrap();
    assert!(ca.server_names.contains(&server_name), "{server_name} not in {:?}", ca.server_names);
    assert_eq!(cfg.identity.ca_addr.as_deref(), Some(format!("{server_name}:15012").as_str()));
    let svc = object(&objs, "Service", "tlsmesh-ca");
    assert_eq!(svc["spec"]["ports"][0]["port"].as_u64(), Some(15012));
}

#[test]
fn helm_chart_matches_the_cli_and_config() {
    let node_sa = format!("system:serviceaccount:{NAMESPACE}:tlsmesh-node");
    let r = render_chart("{}");
    let cfg = resolve_node_args(&r.node_args, &r.node_toml, "chart-node");
    check_node_config(&cfg, &r.node, &r.volumes, "chart defaults");
    let ca = parse_ca_args(&r.ca_args, "chart-ca");
    check_ca_args(&ca, &node_sa, "chart defaults");
    assert!(ca.bundle.is_none());
    assert_eq!(ca.workload_lifetime, 86_400);

    // With the default values, the chart and the static manifests say the same.
    let objs = manifest_objects();
    let manifest_text =
        object(&objs, "ConfigMap", "tlsmesh-node")["data"]["node.toml"].as_str().unwrap();
    let from_manifest = parse_node_config(manifest_text, "manifest");
    let from_chart = parse_node_config(&r.node_toml, "chart");
    assert_eq!(
        serde_json::to_value(&from_chart).unwrap(),
        serde_json::to_value(&from_manifest).unwrap(),
        "deploy/manifests and the chart's default node config differ"
    );

    // Other values: every knob lands in a key or flag the binaries know.
    let r = render_chart(CUSTOM_VALUES);
    let cfg = resolve_node_args(&r.node_args, &r.node_toml, "chart-node-custom");
    check_node_config(&cfg, &r.node, &r.volumes, "chart custom");
    assert_eq!(cfg.trust_domain, "example.org");
    assert_eq!(cfg.transport, Transport::Quic);
    assert_eq!(cfg.log_format, LogFormat::Text);
    assert_eq!(cfg.bypass_ports, [22, 10250]);
    assert_eq!(cfg.cidrs().len(), 2);
    assert_eq!(cfg.probe_sources, ["10.244.0.1".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(cfg.drain_timeout_secs, 10, "extraArgs reach `tlsmesh node`");
    assert_eq!(cfg.metrics.compat, tlsmesh::config::MetricsCompat::Istio, "metrics.compat");
    assert_eq!(cfg.cni_socket, Path::new("/run/tlsmesh-alt/cni.sock"));
    assert_eq!(cfg.cni_state.as_deref(), Some(Path::new("/run/tlsmesh-alt/cni-pods.json")));
    assert_eq!(cfg.identity.ca_addr.as_deref(), Some("tlsmesh-ca.tlsmesh-system.svc:15013"));
    let ca = parse_ca_args(&r.ca_args, "chart-ca-custom");
    assert_eq!(ca.trust_domain.as_deref(), Some("example.org"));
    assert_eq!(ca.log_format, LogFormat::Text);
    assert_eq!(ca.workload_lifetime, 3600);
    assert_eq!(ca.listen.port(), 15013);
    assert_eq!(
        ca.bundle.as_deref(),
        Some(Path::new("/etc/tlsmesh/ca/ca.crt")),
        "cert-manager's tls.crt has no root: the CA needs ca.crt as --bundle"
    );
}
