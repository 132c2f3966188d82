//! `deploy/` and `vagrant/` checked with the real tools instead of by hand:
//!
//! * the Helm chart is linted and rendered by real Helm (v4: the
//!   `libhelm_c.so` that the Python package helm-python-sdk ships, driven by
//!   `scripts/helm-render.py` from the venv `target/tools/helm-venv`), and
//!   what it renders must be what the test renderer of `deploy_config.rs`
//!   (`support/helm_mini.rs`) renders, and pass the same checks against the
//!   real CLI and config;
//! * the Vagrantfile passes `ruby -c`, `vagrant/`'s YAML parses, and the
//!   provisioning scripts pass `bash -n`.
//!
//! `bash scripts/bootstrap.sh` installs the tools. When one is missing the
//! test says so and skips; with `CI=true` a missing tool fails the test.

#[path = "support/helm_mini.rs"]
mod helm_mini;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Output},
};

use helm_mini::{
    check_ca_args, check_node_config, check_surge_upgrade, container, manifest_objects, read,
    render_chart, resolve_node_args, strings, CUSTOM_VALUES, NAMESPACE, RELEASE,
};
use serde_yaml::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn chart_dir() -> PathBuf {
    repo().join("deploy/helm/tlsmesh")
}

// ---------------------------------------------------------------------------
// Tools.

/// Whether `probe` runs and succeeds. When it does not: under `CI=true` a
/// panic, otherwise a note on stderr and `false` (the caller skips).
fn have_tool(what: &str, probe: &mut Command) -> bool {
    let outcome = match probe.output() {
        Ok(out) if out.status.success() => return true,
        Ok(out) => format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        Err(e) => e.to_string(),
    };
    let why = format!(
        "{what} is not available ({probe:?}: {outcome}); install it with: bash scripts/bootstrap.sh"
    );
    assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true and {why}");
    eprintln!("SKIPPED: {why}");
    false
}

/// Real Helm: `scripts/helm-render.py` run by the venv's python.
struct Helm {
    python: PathBuf,
}

impl Helm {
    /// `None` (after saying why) when the venv is missing, outside CI.
    fn find() -> Option<Self> {
        let python = repo().join("target/tools/helm-venv/bin/python");
        have_tool(
            "Helm (helm-python-sdk in target/tools/helm-venv)",
            Command::new(&python).args(["-c", "import helm_python"]),
        )
        .then_some(Self { python })
    }

    /// `helm-render.py <command> <chart> <values as JSON>`.
    fn run(&self, command: &str, chart: &Path, values_yaml: &str) -> Output {
        let values: serde_json::Value = serde_yaml::from_str(values_yaml)
            .unwrap_or_else(|e| panic!("values are not YAML: {e}:\n{values_yaml}"));
        Command::new(&self.python)
            .arg(repo().join("scripts/helm-render.py"))
            .arg(command)
            .arg(chart)
            .arg(values.to_string())
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", self.python.display()))
    }

    /// {template path: manifest}, or Helm's error.
    fn render(&self, chart: &Path, values_yaml: &str) -> Result<BTreeMap<String, String>, String> {
        let out = self.run("render", chart, values_yaml);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(serde_json::from_slice(&out.stdout).expect("helm-render.py render prints JSON"))
    }

    fn lint(&self, chart: &Path, values_yaml: &str) -> serde_json::Value {
        let out = self.run("lint", chart, values_yaml);
        assert!(
            out.status.success(),
            "helm lint {}: {}",
            chart.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("helm-render.py lint prints JSON")
    }
}

/// A lint report's errors (severity 3 messages and `errors`); its other
/// messages are printed.
fn lint_errors(report: &serde_json::Value, tag: &str) -> Vec<String> {
    let mut errors: Vec<String> = Vec::new();
    for m in report["messages"].as_array().expect("lint report has messages") {
        let line = format!("{}: {}", m["path"].as_str().unwrap_or("?"), m["error"]);
        match m["severity"].as_u64() {
            Some(3) => errors.push(line),
            Some(2) => eprintln!("helm lint ({tag}): WARNING {line}"),
            Some(1) => eprintln!("helm lint ({tag}): INFO {line}"),
            _ => eprintln!("helm lint ({tag}): {line}"),
        }
    }
    let listed = report["errors"].as_array().expect("lint report has errors");
    errors.extend(listed.iter().map(|e| format!("errors: {e}")));
    errors
}

/// Every object of a render (the `.yaml` templates; `NOTES.txt` is text), by
/// (kind, name); duplicates and unparsable YAML are errors.
fn objects(
    manifests: &BTreeMap<String, String>,
) -> Result<BTreeMap<(String, String), Value>, String> {
    let mut out = BTreeMap::new();
    let is_yaml = |p: &str| Path::new(p).extension().is_some_and(|x| x == "yaml" || x == "yml");
    for (path, text) in manifests.iter().filter(|(p, _)| is_yaml(p)) {
        for doc in serde_yaml::Deserializer::from_str(text) {
            let v = <Value as serde::Deserialize>::deserialize(doc)
                .map_err(|e| format!("{path}: {e}\n{text}"))?;
            if v.is_null() {
                continue;
            }
            let key = |k: &Value| k.as_str().map(str::to_owned);
            let (Some(kind), Some(name)) = (key(&v["kind"]), key(&v["metadata"]["name"])) else {
                return Err(format!("{path}: an object without kind or metadata.name: {v:?}"));
            };
            if let Some(old) = out.insert((kind.clone(), name.clone()), v) {
                return Err(format!("{path}: {kind} {name} twice (also {old:?})"));
            }
        }
    }
    Ok(out)
}

fn get<'a>(objs: &'a BTreeMap<(String, String), Value>, kind: &str, name: &str) -> &'a Value {
    objs.get(&(kind.to_owned(), name.to_owned()))
        .unwrap_or_else(|| panic!("real Helm rendered no {kind} {name}: {:?}", objs.keys()))
}

/// The value at `path` (`a.b.c`) in a set of overrides (YAML), null if unset.
fn overridden(values_yaml: &str, path: &str) -> Value {
    let mut v: Value = serde_yaml::from_str(values_yaml).unwrap();
    for k in path.split('.') {
        v = v[k].clone();
    }
    v
}

/// Value sets the chart is linted and rendered with: `deploy_config.rs`'s two,
/// plus the external-CA and optional-parts paths, and `vagrant/`'s install.
const VALUE_SETS: &[(&str, &str)] = &[
    ("defaults", "{}"),
    ("custom", CUSTOM_VALUES),
    ("external-ca", "ca: {address: 'ca.example.net:8443'}"),
    ("external-ca-name", "ca: {address: '10.0.0.9:8443', serverName: ca.example.net}"),
    (
        "minimal",
        r"
        cni: {enabled: false}
        ca: {enabled: false, address: 'ca.example.net:15012'}
        metrics: {annotations: false}
        imagePullSecrets: [{name: regcred}]
        node:
          podAnnotations: {example.com/team: mesh}
          tolerations: []
          nodeSelector: {kubernetes.io/os: linux}
        ",
    ),
    ("vagrant", "image: {repository: localhost/tlsmesh, tag: dev, pullPolicy: Never}"),
];

// ---------------------------------------------------------------------------
// Tests.

#[test]
fn helm_lint_passes_with_real_helm() {
    let Some(helm) = Helm::find() else { return };
    for (tag, values) in VALUE_SETS {
        let report = helm.lint(&chart_dir(), values);
        assert_eq!(report["total_charts_linted"], 1, "{tag}: {report}");
        let errors = lint_errors(&report, tag);
        assert!(errors.is_empty(), "helm lint ({tag}) found errors:\n{}", errors.join("\n"));
    }
}

#[test]
#[allow(clippy::too_many_lines, reason = "one scenario: render, compare, check every object")]
fn real_helm_renders_what_the_test_renderer_renders() {
    let Some(helm) = Helm::find() else { return };
    let node_sa = format!("system:serviceaccount:{NAMESPACE}:tlsmesh-node");
    for (tag, values) in VALUE_SETS {
        let manifests = helm
            .render(&chart_dir(), values)
            .unwrap_or_else(|e| panic!("helm template ({tag}) failed:\n{e}"));
        let objs = objects(&manifests).unwrap_or_else(|e| panic!("{tag}: {e}"));
        for ((kind, name), o) in &objs {
            assert!(o["apiVersion"].is_string(), "{tag}: {kind} {name} has no apiVersion");
            let cluster_wide = kind.starts_with("Cluster") || kind == "CustomResourceDefinition";
            assert_eq!(
                o["metadata"]["namespace"].as_str(),
                (!cluster_wide).then_some(NAMESPACE),
                "{tag}: {kind} {name}: namespace"
            );
            let labels = &o["metadata"]["labels"];
            assert_eq!(labels["app.kubernetes.io/instance"], RELEASE, "{tag}: {kind} {name}");
            assert_eq!(labels["app.kubernetes.io/managed-by"], "Helm", "{tag}: {kind} {name}");
        }

        let mini = render_chart(values);
        let cm = get(&objs, "ConfigMap", "tlsmesh-node");
        let node_toml = cm["data"]["node.toml"].as_str().expect("ConfigMap has node.toml");
        let parse = |text: &str, who: &str| -> toml::Table {
            text.parse().unwrap_or_else(|e| panic!("{tag}: {who}'s node.toml: {e}\n{text}"))
        };
        assert_eq!(
            parse(node_toml, "real Helm"),
            parse(&mini.node_toml, "the test renderer"),
            "{tag}: node.toml differs:\nreal Helm:\n{node_toml}\ntest renderer:\n{}",
            mini.node_toml
        );
        let ds = get(&objs, "DaemonSet", "tlsmesh-node");
        let pod = &ds["spec"]["template"]["spec"];
        let node = container(ds, "node");
        assert_eq!(strings(&node["args"]), mini.node_args, "{tag}: node args");
        assert_eq!(node["volumeMounts"], mini.node["volumeMounts"], "{tag}: node volumeMounts");
        assert_eq!(pod["volumes"], mini.volumes, "{tag}: DaemonSet volumes");

        // Real Helm's DaemonSet passes deploy_config.rs's checks.
        let cfg = resolve_node_args(&strings(&node["args"]), node_toml, &format!("helm-{tag}"));
        check_node_config(&cfg, node, &pod["volumes"], &format!("real Helm, {tag}"));
        check_surge_upgrade(ds, &cfg, &format!("real Helm, {tag}"));
        assert_eq!(pod["serviceAccountName"], "tlsmesh-node", "{tag}");
        let args = strings(&node["args"]);
        let at = args.iter().position(|a| a == "--config").expect("--config");
        let config_mount = node["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "config")
            .expect("config mount");
        assert_eq!(config_mount["mountPath"].as_str(), Some(args[at + 1].as_str()), "{tag}");
        assert_eq!(config_mount["subPath"], "node.toml", "{tag}");

        let ca_enabled = overridden(values, "ca.enabled").as_bool().unwrap_or(true);
        let external_ca = overridden(values, "ca.address").as_str().is_some_and(|a| !a.is_empty());
        let cert_manager = overridden(values, "ca.certManager.enabled").as_bool() == Some(true);
        let ca_key = ("Deployment".to_owned(), "tlsmesh-ca".to_owned());
        assert_eq!(objs.contains_key(&ca_key), ca_enabled, "{tag}: Deployment tlsmesh-ca");
        if ca_enabled {
            let deployment = get(&objs, "Deployment", "tlsmesh-ca");
            let ca_args = strings(&container(deployment, "ca")["args"]);
            assert_eq!(ca_args, mini.ca_args, "{tag}: CA args");
            let ca = helm_mini::parse_ca_args(&ca_args, &format!("helm-ca-{tag}"));
            if overridden(values, "ca.port").is_null() {
                // (check_ca_args expects the default port.)
                check_ca_args(&ca, &node_sa, &format!("real Helm, {tag}"));
            }
            assert_eq!(ca.trust_domain.as_deref(), Some(cfg.trust_domain.as_str()), "{tag}");
            let svc = get(&objs, "Service", "tlsmesh-ca");
            let port = ca.listen.port();
            assert_eq!(svc["spec"]["ports"][0]["port"].as_u64(), Some(u64::from(port)), "{tag}");
            if !external_ca {
                // Nodes dial the in-cluster CA by a name its certificate carries.
                let server_name = cfg.identity.ca_server_name.clone().unwrap();
                assert!(ca.server_names.contains(&server_name), "{tag}: {server_name}");
                assert_eq!(
                    cfg.identity.ca_addr.as_deref(),
                    Some(format!("{server_name}:{port}").as_str()),
                    "{tag}"
                );
            }
        }
        let certificate = objs.contains_key(&("Certificate".to_owned(), "tlsmesh-ca".to_owned()));
        assert_eq!(certificate, ca_enabled && cert_manager, "{tag}: Certificate tlsmesh-ca");

        match *tag {
            // With the default values, the chart makes the objects deploy/manifests has
            // (which adds the Namespace).
            "defaults" => {
                let from_manifests: BTreeSet<(String, String)> = manifest_objects()
                    .iter()
                    .map(|o| {
                        let s = |v: &Value| v.as_str().unwrap().to_owned();
                        (s(&o["kind"]), s(&o["metadata"]["name"]))
                    })
                    .filter(|(kind, _)| kind != "Namespace")
                    .collect();
                let from_chart: BTreeSet<(String, String)> = objs.keys().cloned().collect();
                assert_eq!(from_chart, from_manifests, "chart defaults vs deploy/manifests");
            }
            "minimal" => {
                assert!(
                    pod["initContainers"].is_null()
                        && pod["containers"].as_sequence().unwrap().len() == 1,
                    "cni.enabled=false: no CNI containers"
                );
                assert_eq!(pod["imagePullSecrets"][0]["name"], "regcred");
                assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
                assert!(pod["tolerations"].is_null());
                let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
                assert_eq!(annotations["example.com/team"], "mesh");
                assert!(annotations["prometheus.io/scrape"].is_null());
                assert!(!objs.keys().any(|(_, name)| name.contains("-ca")), "ca.enabled=false");
            }
            "custom" => {
                // The monitoring objects carry the chart's files unchanged.
                let file = |name: &str| read(&chart_dir().join("files").join(name));
                let dash = get(&objs, "ConfigMap", "tlsmesh-dashboard");
                assert_eq!(dash["metadata"]["labels"]["grafana_dashboard"], "1");
                let json = |t: &str| -> serde_json::Value { serde_json::from_str(t).unwrap() };
                assert_eq!(
                    json(dash["data"]["tlsmesh.json"].as_str().unwrap()),
                    json(&file("tlsmesh-dashboard.json"))
                );
                let alerts: Value = serde_yaml::from_str(&file("tlsmesh-alerts.yaml")).unwrap();
                let cm = get(&objs, "ConfigMap", "tlsmesh-alerts");
                let in_cm: Value =
                    serde_yaml::from_str(cm["data"]["tlsmesh-alerts.yaml"].as_str().unwrap())
                        .unwrap();
                assert_eq!(in_cm, alerts);
                assert_eq!(get(&objs, "PrometheusRule", "tlsmesh")["spec"], alerts);
            }
            "vagrant" => {
                assert_eq!(node["image"], "localhost/tlsmesh:dev");
                assert_eq!(node["imagePullPolicy"], "Never");
            }
            _ => {}
        }
    }
}

/// Copies of the chart with one file changed, removed when dropped.
struct ChartCopy(PathBuf);

impl ChartCopy {
    fn new(tag: &str, template: &str, edit: impl FnOnce(String) -> String) -> Self {
        let dir = std::env::temp_dir().join(format!("tlsmesh-chart-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        copy_dir(&chart_dir(), &dir);
        let file = dir.join("templates").join(template);
        let before = read(&file);
        let after = edit(before.clone());
        assert_ne!(before, after, "{tag}: the edit changed nothing");
        std::fs::write(&file, after).unwrap();
        Self(dir)
    }
}

impl Drop for ChartCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The checks above do fail: a template error, a value the chart refuses
/// (`fail`), and a template that renders invalid YAML.
#[test]
fn real_helm_reports_broken_charts() {
    let Some(helm) = Helm::find() else { return };

    let broken = ChartCopy::new("badfunc", "node-configmap.yaml", |t| {
        t.replacen("| toJson }}", "| toJsn }}", 1)
    });
    let out = helm.run("render", &broken.0, "{}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a template calling an unknown function rendered");
    assert!(
        stderr.contains(r#"function "toJsn" not defined"#)
            && stderr.contains("node-configmap.yaml"),
        "no Helm error on stderr: {stderr}"
    );
    let errors = lint_errors(&helm.lint(&broken.0, "{}"), "badfunc");
    assert!(errors.iter().any(|e| e.contains("toJsn")), "lint missed it: {errors:?}");
    drop(broken);

    let err = helm.render(&chart_dir(), "transport: carrier-pigeon").unwrap_err();
    assert!(err.contains("transport must be tcp or quic"), "{err}");

    let broken = ChartCopy::new("badyaml", "rbac.yaml", |t| t + "oops: [\n  - {a: b\n");
    let manifests = helm.render(&broken.0, "{}").expect("Helm renders text, YAML or not");
    let err = objects(&manifests).unwrap_err();
    assert!(err.starts_with("tlsmesh/templates/rbac.yaml: "), "{err}");
    let errors = lint_errors(&helm.lint(&broken.0, "{}"), "badyaml");
    assert!(
        errors.iter().any(|e| e.contains("unable to parse YAML")),
        "lint missed it: {errors:?}"
    );
    let dir = broken.0.clone();
    drop(broken);
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn vagrant_files_are_valid() {
    let vagrant = repo().join("vagrant");
    let ruby_ok = have_tool("ruby (for `ruby -c`)", Command::new("ruby").arg("--version"));
    let bash_ok = have_tool("bash", Command::new("bash").arg("--version"));

    if ruby_ok {
        let out = Command::new("ruby").arg("-c").arg(vagrant.join("Vagrantfile")).output().unwrap();
        assert!(
            out.status.success(),
            "ruby -c vagrant/Vagrantfile:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Every YAML file under vagrant/, every document.
    let mut yaml_files = Vec::new();
    let mut dirs = vec![vagrant.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                yaml_files.push(path);
            }
        }
    }
    assert!(!yaml_files.is_empty(), "no YAML under vagrant/");
    for f in &yaml_files {
        let text = read(f);
        let mut docs = 0;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            <Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            docs += 1;
        }
        assert!(docs > 0, "{}: no YAML document", f.display());
    }

    // Every shell script in vagrant/provision (`*.sh` or a `#!…sh` line).
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(vagrant.join("provision"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let shebang =
                || read(p).lines().next().is_some_and(|l| l.starts_with("#!") && l.ends_with("sh"));
            p.extension().is_some_and(|x| x == "sh") || (p.is_file() && shebang())
        })
        .collect();
    scripts.sort();
    assert!(!scripts.is_empty(), "no scripts in vagrant/provision");
    if bash_ok {
        for s in &scripts {
            let out = Command::new("bash").arg("-n").arg(s).output().unwrap();
            assert!(
                out.status.success(),
                "bash -n {}:\n{}",
                s.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
