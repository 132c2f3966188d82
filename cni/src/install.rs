//! `tlsmesh-cni install`: puts the plugin binary in the host's CNI bin dir
//! and chains the plugin into the host's primary network configuration (the
//! first `.conf`/`.conflist`/`.json` file in lexical order, which is the one
//! containerd and CRI-O use). Run by the `DaemonSet`'s init container, and
//! with `--watch` by a small container that puts the entry back when the
//! main CNI rewrites its file (Calico and Cilium do, on upgrades).
//!
//! The JSON edits are pure ([`chain`], [`unchain`]); the file work around
//! them is atomic (write to a temporary file, then rename).

use std::{
    ffi::OsStr,
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use serde_json::{json, Map, Value};

use crate::plugin::{DEFAULT_TIMEOUT_SECONDS, PLUGIN_TYPE};
use crate::protocol::DEFAULT_SOCKET;

/// Installation errors; each says what to look at.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// File system trouble.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The primary configuration is not usable JSON.
    #[error("CNI config {path} is not a CNI network configuration: {message}")]
    BadConfig { path: PathBuf, message: String },
    /// No primary configuration (yet).
    #[error("no CNI network configuration in {0}: is the cluster's network plugin installed? (use --wait to wait for it)")]
    NoConfig(PathBuf),
}

/// What `install` is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Host CNI binary directory (as mounted in the installer).
    pub bin_dir: PathBuf,
    /// Host CNI configuration directory (as mounted in the installer).
    pub conf_dir: PathBuf,
    /// The daemon's socket as the plugin sees it on the host.
    pub socket_path: PathBuf,
    /// `failOpen` in the plugin entry.
    pub fail_open: bool,
    /// `timeoutSeconds` in the plugin entry.
    pub timeout_seconds: u64,
    /// `excludeNamespaces` in the plugin entry.
    pub exclude_namespaces: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            bin_dir: PathBuf::from("/opt/cni/bin"),
            conf_dir: PathBuf::from("/etc/cni/net.d"),
            socket_path: PathBuf::from(DEFAULT_SOCKET),
            fail_open: false,
            timeout_seconds: DEFAULT_TIMEOUT_SECONDS,
            exclude_namespaces: vec!["kube-system".to_owned()],
        }
    }
}

/// The plugin's entry in a `.conflist`.
pub fn plugin_entry(opts: &Options) -> Value {
    json!({
        "type": PLUGIN_TYPE,
        "socketPath": opts.socket_path,
        "failOpen": opts.fail_open,
        "timeoutSeconds": opts.timeout_seconds,
        "excludeNamespaces": opts.exclude_namespaces,
    })
}

fn is_ours(p: &Value) -> bool {
    p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// Adds `entry` as the last plugin of `conf` (a `.conflist`, or a single
/// `.conf` that is turned into a list), replacing any earlier tlsmesh entry.
pub fn chain(conf: &Value, entry: &Value) -> Result<Value, String> {
    let obj = conf.as_object().ok_or("not a JSON object")?;
    let mut out: Map<String, Value>;
    let mut plugins: Vec<Value>;
    if let Some(list) = obj.get("plugins") {
        plugins = list.as_array().ok_or("\"plugins\" is not an array")?.clone();
        out = obj.clone();
    } else {
        if !obj.contains_key("type") {
            return Err("neither \"plugins\" nor \"type\"".into());
        }
        // A single-plugin .conf: the list takes its name and version.
        let mut single = obj.clone();
        out = Map::new();
        for k in ["cniVersion", "name"] {
            if let Some(v) = single.remove(k) {
                out.insert(k.into(), v);
            }
        }
        plugins = vec![Value::Object(single)];
    }
    plugins.retain(|p| !is_ours(p));
    if plugins.is_empty() {
        return Err("no main network plugin to chain after".into());
    }
    plugins.push(entry.clone());
    out.insert("plugins".into(), Value::Array(plugins));
    Ok(Value::Object(out))
}

/// Removes tlsmesh entries from a `.conflist`.
pub fn unchain(conf: &Value) -> Value {
    let mut out = conf.clone();
    if let Some(list) = out.get_mut("plugins").and_then(Value::as_array_mut) {
        list.retain(|p| !is_ours(p));
    }
    out
}

/// Whether `conf` already ends with exactly `entry`.
pub fn is_chained(conf: &Value, entry: &Value) -> bool {
    let Some(list) = conf.get("plugins").and_then(Value::as_array) else { return false };
    list.last() == Some(entry) && list.iter().filter(|p| is_ours(p)).count() == 1
}

/// The configuration the runtime uses: the first file in lexical order.
pub fn primary_conf(dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    let rd = fs::read_dir(dir).map_err(|source| InstallError::Io {
        what: "cannot read",
        path: dir.into(),
        source,
    })?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            matches!(p.extension().and_then(OsStr::to_str), Some("conf" | "conflist" | "json"))
        })
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), InstallError> {
    let name = path.file_name().and_then(OsStr::to_str).unwrap_or("tlsmesh");
    let tmp = path.with_file_name(format!(".{name}.tlsmesh-tmp"));
    let io = |what, source| InstallError::Io { what, path: tmp.clone(), source };
    let mut f = fs::File::create(&tmp).map_err(|e| io("cannot create", e))?;
    f.write_all(data).map_err(|e| io("cannot write", e))?;
    f.sync_all().map_err(|e| io("cannot sync", e))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .map_err(|e| io("cannot chmod", e))?;
    fs::rename(&tmp, path).map_err(|source| InstallError::Io {
        what: "cannot rename into",
        path: path.into(),
        source,
    })
}

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installed {
    /// The configuration already had the entry.
    Unchanged(PathBuf),
    /// The entry was written into this file.
    Chained(PathBuf),
}

/// Chains the plugin into the primary configuration (idempotent).
pub fn install_conf(opts: &Options) -> Result<Installed, InstallError> {
    let path = primary_conf(&opts.conf_dir)?
        .ok_or_else(|| InstallError::NoConfig(opts.conf_dir.clone()))?;
    let text = fs::read(&path).map_err(|source| InstallError::Io {
        what: "cannot read",
        path: path.clone(),
        source,
    })?;
    let bad = |message: String| InstallError::BadConfig { path: path.clone(), message };
    let conf: Value = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    let entry = plugin_entry(opts);
    if is_chained(&conf, &entry) {
        return Ok(Installed::Unchanged(path));
    }
    let chained = chain(&conf, &entry).map_err(bad)?;
    let mut out = serde_json::to_vec_pretty(&chained).map_err(|e| bad(e.to_string()))?;
    out.push(b'\n');
    let target =
        if conf.get("plugins").is_some() { path.clone() } else { path.with_extension("conflist") };
    write_atomic(&target, &out, 0o644)?;
    if target != path {
        fs::remove_file(&path).map_err(|source| InstallError::Io {
            what: "cannot remove",
            path: path.clone(),
            source,
        })?;
    }
    Ok(Installed::Chained(target))
}

/// Copies `binary` to `<bin_dir>/tlsmesh-cni` (atomically, mode 0755).
pub fn install_binary(binary: &Path, opts: &Options) -> Result<PathBuf, InstallError> {
    let data = fs::read(binary).map_err(|source| InstallError::Io {
        what: "cannot read",
        path: binary.into(),
        source,
    })?;
    let target = opts.bin_dir.join(PLUGIN_TYPE);
    if fs::read(&target).is_ok_and(|old| old == data) {
        return Ok(target);
    }
    write_atomic(&target, &data, 0o755)?;
    Ok(target)
}

/// Removes the entry from the primary configuration and the binary.
pub fn uninstall(opts: &Options) -> Result<(), InstallError> {
    if let Some(path) = primary_conf(&opts.conf_dir)? {
        let text = fs::read(&path).map_err(|source| InstallError::Io {
            what: "cannot read",
            path: path.clone(),
            source,
        })?;
        if let Ok(conf) = serde_json::from_slice::<Value>(&text) {
            let out = unchain(&conf);
            if out != conf {
                let mut data = serde_json::to_vec_pretty(&out).unwrap_or_default();
                data.push(b'\n');
                write_atomic(&path, &data, 0o644)?;
            }
        }
    }
    let bin = opts.bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&bin) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(InstallError::Io { what: "cannot remove", path: bin, source: e })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Value {
        plugin_entry(&Options::default())
    }

    #[test]
    fn chains_last_into_a_conflist_and_is_idempotent() {
        let conf = json!({"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[
            {"type":"calico"},{"type":"portmap","capabilities":{"portMappings":true}}]});
        let once = chain(&conf, &entry()).unwrap();
        let types: Vec<_> =
            once["plugins"].as_array().unwrap().iter().map(|p| p["type"].clone()).collect();
        assert_eq!(types, ["calico", "portmap", "tlsmesh-cni"]);
        assert!(is_chained(&once, &entry()));
        assert_eq!(chain(&once, &entry()).unwrap(), once, "no second entry");
        assert_eq!(once["cniVersion"], "1.0.0");
        assert_eq!(unchain(&once), conf);
        let other = plugin_entry(&Options { fail_open: true, ..Options::default() });
        assert!(!is_chained(&once, &other), "a changed option rewrites the entry");
    }

    #[test]
    fn turns_a_single_conf_into_a_list() {
        let conf = json!({"cniVersion":"0.3.1","name":"cbr0","type":"flannel","delegate":{"isDefaultGateway":true}});
        let out = chain(&conf, &entry()).unwrap();
        assert_eq!(out["cniVersion"], "0.3.1");
        assert_eq!(out["name"], "cbr0");
        assert_eq!(
            out["plugins"][0],
            json!({"type":"flannel","delegate":{"isDefaultGateway":true}})
        );
        assert_eq!(out["plugins"][1]["socketPath"], DEFAULT_SOCKET);
        assert!(chain(&json!({"name":"x"}), &entry()).is_err());
        assert!(chain(&json!({"plugins":[{"type":"tlsmesh-cni"}]}), &entry()).is_err());
    }

    #[test]
    fn installs_into_the_first_file_in_lexical_order() {
        let dir = std::env::temp_dir().join(format!("tlsmesh-cni-install-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (conf_dir, bin_dir) = (dir.join("net.d"), dir.join("bin"));
        fs::create_dir_all(&conf_dir).unwrap();
        fs::create_dir_all(&bin_dir).unwrap();
        let opts =
            Options { conf_dir: conf_dir.clone(), bin_dir: bin_dir.clone(), ..Options::default() };
        assert!(matches!(install_conf(&opts), Err(InstallError::NoConfig(_))));
        fs::write(
            conf_dir.join("10-flannel.conf"),
            r#"{"cniVersion":"0.3.1","name":"cbr0","type":"flannel"}"#,
        )
        .unwrap();
        fs::write(
            conf_dir.join("99-loopback.conf"),
            r#"{"cniVersion":"0.3.1","name":"lo","type":"loopback"}"#,
        )
        .unwrap();
        fs::write(conf_dir.join("README"), "not a config").unwrap();
        let list = conf_dir.join("10-flannel.conflist");
        assert_eq!(install_conf(&opts).unwrap(), Installed::Chained(list.clone()));
        assert!(
            !conf_dir.join("10-flannel.conf").exists(),
            "the .conf is replaced by the .conflist"
        );
        assert_eq!(install_conf(&opts).unwrap(), Installed::Unchanged(list.clone()));
        let exe = std::env::current_exe().unwrap();
        let bin = install_binary(&exe, &opts).unwrap();
        assert_eq!(fs::metadata(&bin).unwrap().permissions().mode() & 0o777, 0o755);
        uninstall(&opts).unwrap();
        let after: Value = serde_json::from_slice(&fs::read(&list).unwrap()).unwrap();
        assert_eq!(after["plugins"].as_array().unwrap().len(), 1);
        assert!(!bin.exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
