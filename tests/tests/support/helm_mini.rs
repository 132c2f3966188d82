//! What `deploy_config.rs` and `deploy_tools.rs` share: reading deploy/, the
//! checks that a rendered node config, `tlsmesh node` arguments and `tlsmesh
//! ca serve` arguments agree with the real CLI, config and volumes, and the
//! test renderer for the Helm chart (`render_chart`). Included by both with
//! `#[path = "support/helm_mini.rs"] mod helm_mini;`.

#![allow(dead_code, reason = "each test crate including this module uses a part of it")]

use std::path::{Path, PathBuf};

use clap::Parser as _;
use serde_yaml::Value;
use tlsmesh::{
    ca_cmd::{CaCommand, NodeAuth, ServeArgs},
    cli::{Cli, Command},
    config::{InventorySource, NodeConfig},
};
use tlsmesh_k8s::tokenreview::DEFAULT_AUDIENCE;

pub fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every YAML document of every file in deploy/manifests.
pub fn manifest_objects() -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy().join("manifests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        for doc in serde_yaml::Deserializer::from_str(&read(&f)) {
            let v = <Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if !v.is_null() {
                out.push(v);
            }
        }
    }
    out
}

pub fn object<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("deploy/manifests has no {kind} {name}"))
}

pub fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

pub fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
        .iter()
        .map(|s| match s {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => panic!("not a string: {other:?}"),
        })
        .collect()
}

/// Where the container mounts the pod volume `volume`.
pub fn mount_path(c: &Value, volume: &str) -> PathBuf {
    let m = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume)
        .unwrap_or_else(|| panic!("container {:?} does not mount {volume}", c["name"]));
    PathBuf::from(m["mountPath"].as_str().unwrap())
}

pub fn parse_node_config(toml_text: &str, what: &str) -> NodeConfig {
    toml::from_str(toml_text).unwrap_or_else(|e| panic!("{what}: not a valid node config: {e}"))
}

/// `tlsmesh node <args>` with `--config` pointing at `config` (a file
/// holding the `ConfigMap`'s node.toml): the effective config.
pub fn resolve_node_args(args: &[String], config_text: &str, tag: &str) -> NodeConfig {
    let path =
        std::env::temp_dir().join(format!("tlsmesh-deploy-{tag}-{}.toml", std::process::id()));
    std::fs::write(&path, config_text).unwrap();
    let mut command_line = vec!["tlsmesh".to_owned()];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        command_line.push(a.clone());
        if a == "--config" || a == "-c" {
            it.next().expect("--config needs a value");
            command_line.push(path.display().to_string());
        }
    }
    let cli = Cli::try_parse_from(&command_line)
        .unwrap_or_else(|e| panic!("{tag}: {command_line:?}: {e}"));
    let Command::Node(node) = cli.command else { panic!("{tag}: not `tlsmesh node`") };
    let cfg = node.resolve().unwrap_or_else(|e| panic!("{tag}: {e}"));
    std::fs::remove_file(&path).unwrap();
    cfg
}

pub fn parse_ca_args(args: &[String], tag: &str) -> ServeArgs {
    let command_line = std::iter::once("tlsmesh".to_owned()).chain(args.iter().cloned());
    let parsed =
        Cli::try_parse_from(command_line).unwrap_or_else(|e| panic!("{tag}: {args:?}: {e}"));
    let Command::Ca(CaCommand::Serve(serve)) = parsed.command else {
        panic!("{tag}: not `tlsmesh ca serve`: {:?}", parsed.command)
    };
    *serve
}

/// What both the manifests and the chart must agree on: `node` is the node
/// container, `volumes` the pod's volumes.
/// The `DaemonSet`'s update starts the new daemon beside the old one on each
/// node (issue 14): `maxSurge: 1`, `maxUnavailable: 0`; with `hostNetwork`
/// no container declares ports (each would imply a `hostPort`, and the
/// scheduler would never place the surge pod beside the old one); the run
/// directory both daemons share is a hostPath.
pub fn check_surge_upgrade(ds: &Value, cfg: &NodeConfig, tag: &str) {
    let strategy = &ds["spec"]["updateStrategy"];
    assert_eq!(strategy["type"].as_str(), Some("RollingUpdate"), "{tag}: {strategy:?}");
    let rolling = &strategy["rollingUpdate"];
    assert_eq!(rolling["maxSurge"].as_u64(), Some(1), "{tag}: maxSurge: {rolling:?}");
    assert_eq!(rolling["maxUnavailable"].as_u64(), Some(0), "{tag}: maxUnavailable: {rolling:?}");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true), "{tag}");
    for c in pod["containers"].as_sequence().expect("containers") {
        assert!(
            c["ports"].is_null(),
            "{tag}: container {:?} declares ports: with hostNetwork each is a hostPort and blocks the surge pod",
            c["name"]
        );
    }
    let run_dir = cfg.cni_socket.parent().expect("cni_socket has a directory");
    let node = container(ds, "node");
    let volume = node["volumeMounts"]
        .as_sequence()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["mountPath"].as_str().map(Path::new) == Some(run_dir))
        .and_then(|m| m["name"].as_str())
        .unwrap_or_else(|| {
            panic!("{tag}: nothing mounted at the run directory {}", run_dir.display())
        });
    let v = pod["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .find(|v| v["name"].as_str() == Some(volume))
        .expect("the run directory's volume");
    assert!(v["hostPath"]["path"].is_string(), "{tag}: the run directory is not a hostPath: {v:?}");
}

pub fn check_node_config(cfg: &NodeConfig, node: &Value, volumes: &Value, tag: &str) {
    assert_eq!(cfg.inventory_source, InventorySource::Kubernetes, "{tag}");
    assert_eq!(cfg.node, "$(NODE_NAME)", "{tag}: --node comes from the downward API");
    let id = &cfg.identity;
    assert!(id.ca_addr.is_some() && id.ca_bundle.is_some(), "{tag}: no CA service configured");
    assert!(id.ca_dir.is_none(), "{tag}: a DaemonSet signs nothing itself");
    // The paths the config names are where the volumes are mounted.
    assert_eq!(
        id.join_token_file.as_deref(),
        Some(mount_path(node, "ca-token").join("token").as_path()),
        "{tag}: join_token_file is not the projected token"
    );
    assert_eq!(
        id.ca_bundle.as_deref().unwrap().parent(),
        Some(mount_path(node, "ca-root").as_path()),
        "{tag}: ca_bundle is not in the root ConfigMap's mount"
    );
    let run = mount_path(node, "run");
    assert_eq!(
        cfg.cni_socket.parent(),
        Some(run.as_path()),
        "{tag}: cni_socket not on the host mount"
    );
    assert_eq!(
        cfg.cni_state.as_deref().and_then(Path::parent),
        Some(run.as_path()),
        "{tag}: cni_state must be on the host mount (it must survive daemon restarts)"
    );
    assert_eq!(cfg.cgroup_root, mount_path(node, "cgroup"), "{tag}: cgroup_root");
    assert!(cfg.pin_dir.starts_with(mount_path(node, "bpffs")), "{tag}: pin_dir not on bpffs");
    assert_eq!(cfg.readiness_addr.port(), 15021, "{tag}");
    assert_eq!(cfg.metrics_addr.port(), 15020, "{tag}");
    // The projected token's audience is the one the CA asks TokenReview for.
    let token = volumes.as_sequence().unwrap().iter().find(|v| v["name"] == "ca-token").unwrap();
    let sa_token = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(sa_token["path"], "token", "{tag}");
    assert_eq!(sa_token["audience"], DEFAULT_AUDIENCE, "{tag}");
}

pub fn check_ca_args(ca: &ServeArgs, node_sa: &str, tag: &str) {
    assert_eq!(ca.inventory_source, InventorySource::Kubernetes, "{tag}");
    assert_eq!(ca.node_auth, NodeAuth::Kubernetes, "{tag}");
    assert!(ca.inventory.is_none() && ca.tokens.is_none(), "{tag}: no files in the cluster");
    assert!(
        ca.cert.is_some() && ca.key.is_some() && ca.dir.is_none(),
        "{tag}: --cert/--key from the Secret"
    );
    assert_eq!(ca.node_service_accounts, [node_sa], "{tag}: the DaemonSet's ServiceAccount");
    assert_eq!(ca.node_token_audience, DEFAULT_AUDIENCE, "{tag}");
    assert_eq!(ca.listen.port(), 15012, "{tag}");
}

// ---------------------------------------------------------------------------
// The Helm chart, rendered without helm: a small renderer that knows only the
// constructs these templates use (values, `quote`, `toJson`, `printf`/`dir`,
// the `_helpers.tpl` includes, `if`/`with`/`end`). Anything else makes the
// test fail with a message saying to teach it, rather than pass silently.
// deploy_tools.rs checks that real Helm renders the same.

pub const RELEASE: &str = "tlsmesh";
pub const NAMESPACE: &str = "tlsmesh-system";

/// The non-default values `deploy_config.rs` renders the chart with (and
/// `deploy_tools.rs` renders and lints with real Helm): every knob it checks
/// lands in a key or flag the binaries know.
pub const CUSTOM_VALUES: &str = r#"
        trustDomain: example.org
        transport: quic
        logFormat: text
        certLifetimeSeconds: 3600
        node:
          bypassPorts: [22, 10250]
          bypassCidrs: ["169.254.0.0/16", "10.96.0.0/12"]
          probeSources: ["10.244.0.1"]
          extraArgs: ["--drain-timeout", "10"]
        cni: {socketPath: /run/tlsmesh-alt/cni.sock}
        ca:
          port: 15013
          certManager: {enabled: true, issuerRef: {name: root}}
        metrics:
          compat: istio
          dashboard: {enabled: true}
          alerts: {configMap: true, prometheusRule: true}
        "#;

struct Chart {
    values: Value,
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::String(s) => !s.is_empty(),
        Value::Sequence(s) => !s.is_empty(),
        Value::Mapping(m) => !m.is_empty(),
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::Tagged(t) => truthy(&t.value),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        other => panic!("not a scalar: {other:?}"),
    }
}

fn unsupported(what: &str) -> ! {
    panic!("the chart uses {what:?}, which the renderer in tests/tests/support/helm_mini.rs does not know; teach it")
}

impl Chart {
    fn load(overrides: &str) -> Self {
        let mut values: Value =
            serde_yaml::from_str(&read(&deploy().join("helm/tlsmesh/values.yaml"))).unwrap();
        let overrides: Value = serde_yaml::from_str(overrides).unwrap();
        merge(&mut values, overrides);
        Self { values }
    }

    fn value(&self, path: &str) -> Value {
        let mut v = &self.values;
        for k in path.split('.') {
            v = &v[k];
        }
        v.clone()
    }

    /// One pipeline element's input: `.Values.x`, `.Release.*`, `include`,
    /// `printf`, `dir`, or `.` (inside `with`).
    fn term(&self, t: &str, dot: Option<&Value>) -> Value {
        let t = t.trim();
        if let Some(path) = t.strip_prefix(".Values.") {
            return self.value(path);
        }
        match t {
            ".Release.Namespace" => return Value::String(NAMESPACE.into()),
            ".Release.Name" => return Value::String(RELEASE.into()),
            "." => return dot.cloned().unwrap_or_else(|| unsupported("`.` outside with")),
            _ => {}
        }
        if let Some(inner) = t.strip_prefix('(').and_then(|r| r.strip_suffix(')')) {
            return self.term(inner, dot);
        }
        if let Some(arg) = t.strip_prefix("dir ") {
            let p = scalar(&self.term(arg, dot));
            return Value::String(Path::new(&p).parent().unwrap().display().to_string());
        }
        if let Some(rest) = t.strip_prefix("include ") {
            let name = rest.trim().trim_end_matches('.').trim().trim_matches('"');
            return Value::String(self.helper(name));
        }
        if let Some(rest) = t.strip_prefix("printf ") {
            let rest = rest.trim().strip_prefix('"').unwrap_or_else(|| unsupported(t));
            let (format, args) = rest.split_once('"').unwrap_or_else(|| unsupported(t));
            let arg = scalar(&self.term(args, dot));
            assert_eq!(format.matches("%s").count(), 1, "printf with one %s only");
            return Value::String(format.replacen("%s", &arg, 1));
        }
        unsupported(t)
    }

    /// `_helpers.tpl`'s definitions used in the templates checked here.
    fn helper(&self, name: &str) -> String {
        let address = scalar(&self.value("ca.address"));
        match name {
            "tlsmesh.caAddress" if address.is_empty() => {
                format!("tlsmesh-ca.{NAMESPACE}.svc:{}", scalar(&self.value("ca.port")))
            }
            "tlsmesh.caAddress" => address,
            "tlsmesh.caServerName" => {
                let name = scalar(&self.value("ca.serverName"));
                if !name.is_empty() {
                    name
                } else if !address.is_empty() {
                    address.split(':').next().unwrap().to_owned()
                } else {
                    format!("tlsmesh-ca.{NAMESPACE}.svc")
                }
            }
            other => unsupported(&format!("include {other}")),
        }
    }

    fn expr(&self, e: &str, dot: Option<&Value>) -> String {
        let mut stages = e.split('|');
        let first = stages.next().unwrap().trim();
        let mut out = if let Some(arg) = first.strip_prefix("toYaml ") {
            serde_yaml::to_string(&self.term(arg, dot)).unwrap().trim_end().to_owned()
        } else {
            let v = self.term(first, dot);
            match stages.clone().next().map(str::trim) {
                Some("toJson") => {
                    stages.next();
                    serde_json::to_string(&v).unwrap()
                }
                _ => scalar(&v),
            }
        };
        for stage in stages {
            let stage = stage.trim();
            if stage == "quote" {
                out = serde_json::to_string(&out).unwrap();
            } else if let Some(n) = stage.strip_prefix("nindent ") {
                let pad = " ".repeat(n.trim().parse().unwrap());
                out = out.lines().fold(String::new(), |mut acc, l| {
                    acc.push('\n');
                    acc.push_str(&pad);
                    acc.push_str(l);
                    acc
                });
            } else {
                unsupported(stage);
            }
        }
        out
    }

    /// Renders template text: `{{ … }}` inline, and `if`/`with`/`end`
    /// lines (each on a line of its own).
    fn render(&self, text: &str) -> String {
        // (active, value of `with`)
        let mut stack: Vec<(bool, Option<Value>)> = Vec::new();
        let mut out = String::new();
        for line in text.lines() {
            let t = line.trim();
            let active = stack.iter().all(|(a, _)| *a);
            let dot = stack.iter().rev().find_map(|(_, d)| d.clone());
            if let Some(control) = t.strip_prefix("{{-").and_then(|r| r.strip_suffix("}}")) {
                let control = control.trim().trim_end_matches('-').trim();
                if let Some(cond) = control.strip_prefix("if ") {
                    stack.push((active && truthy(&self.term(cond, dot.as_ref())), None));
                    continue;
                }
                if let Some(path) = control.strip_prefix("with ") {
                    let v = self.term(path, dot.as_ref());
                    stack.push((active && truthy(&v), Some(v)));
                    continue;
                }
                if control == "end" {
                    stack.pop().expect("unbalanced end");
                    continue;
                }
                if control.starts_with("else") || control.starts_with("range") {
                    unsupported(control);
                }
                // `{{- expr }}`: output glued to the previous line.
                if active {
                    out.pop();
                    out.push_str(&self.expr(control, dot.as_ref()));
                    out.push('\n');
                }
                continue;
            }
            if !active {
                continue;
            }
            let mut rest = line;
            while let Some(open) = rest.find("{{") {
                out.push_str(&rest[..open]);
                let close = rest[open..].find("}}").expect("unclosed {{") + open;
                out.push_str(&self.expr(rest[open + 2..close].trim_matches('-'), dot.as_ref()));
                rest = &rest[close + 2..];
            }
            out.push_str(rest);
            out.push('\n');
        }
        assert!(stack.is_empty(), "unbalanced if/with");
        out
    }
}

fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Mapping(a), Value::Mapping(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

fn indent(l: &str) -> usize {
    l.len() - l.trim_start().len()
}

/// The block under the first line matching `key` after a line matching
/// `after` (more indented lines, blank lines and template lines). Not
/// dedented: `nindent` in the template counts from column 0.
fn block(text: &str, after: &str, key: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let from =
        lines.iter().position(|l| l.trim() == after).unwrap_or_else(|| panic!("no {after:?}"));
    let at = from
        + lines[from..]
            .iter()
            .position(|l| l.trim() == key)
            .unwrap_or_else(|| panic!("no {key:?} after {after:?}"));
    let base = indent(lines[at]);
    let body: Vec<&str> = lines[at + 1..]
        .iter()
        .take_while(|l| l.trim().is_empty() || indent(l) > base)
        .copied()
        .collect();
    body.join("\n")
}

fn template(name: &str) -> String {
    read(&deploy().join("helm/tlsmesh/templates").join(name))
}

/// What the chart renders for a set of values.
pub struct Rendered {
    pub node_toml: String,
    pub node_args: Vec<String>,
    /// The node container's `volumeMounts` (as `{volumeMounts: [...]}`).
    pub node: Value,
    /// The `DaemonSet` pod's volumes.
    pub volumes: Value,
    pub ca_args: Vec<String>,
}

pub fn render_chart(overrides: &str) -> Rendered {
    let chart = Chart::load(overrides);
    let ds = template("node-daemonset.yaml");
    let yaml = |text: &str| -> Value {
        serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{e}:\n{text}"))
    };
    let mut node = serde_yaml::Mapping::new();
    node.insert(
        "volumeMounts".into(),
        yaml(&chart.render(&block(&ds, "- name: node", "volumeMounts:"))),
    );
    Rendered {
        node_toml: chart.render(&block(&template("node-configmap.yaml"), "data:", "node.toml: |")),
        node_args: strings(&yaml(&chart.render(&block(&ds, "- name: node", "args:")))),
        node: Value::Mapping(node),
        volumes: yaml(&chart.render(&block(&ds, "containers:", "volumes:"))),
        ca_args: strings(&yaml(&chart.render(&block(&template("ca.yaml"), "- name: ca", "args:")))),
    }
}
