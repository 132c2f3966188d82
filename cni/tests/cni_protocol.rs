//! The built `tlsmesh-cni` binary driven the way a container runtime drives
//! it (environment + stdin, result on stdout, exit code), against a test
//! daemon on a Unix socket.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tlsmesh_cni::protocol::{Command as Verb, Request, Response};

const BIN: &str = env!("CARGO_BIN_EXE_tlsmesh-cni");

/// A scratch directory of one test, removed when the test ends (passing or
/// not), so a run leaves nothing in /tmp.
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(tag: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("tlsmesh-cni-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Scratch(d)
}

fn prev_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "0a:58:0a:f4:01:05", "sandbox": "/var/run/netns/cni-1234"}],
        "ips": [{"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 0}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {}
    })
}

fn config(socket: &Path, extra: &Value) -> Value {
    let mut c = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "tlsmesh-cni",
        "socketPath": socket,
        "prevResult": prev_result(),
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn plugin(command: &str, stdin: &Value) -> Run {
    let mut child = Command::new(BIN)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "3f5c0ffee")
        .env("CNI_NETNS", "/var/run/netns/cni-1234")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=3f5c0ffee;K8S_POD_UID=1234-5678")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tlsmesh-cni");
    child.stdin.take().unwrap().write_all(stdin.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().expect("exited"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// A one-connection-at-a-time test daemon answering `answer` to every request.
fn daemon(socket: &Path, answer: Option<Response>) -> mpsc::Receiver<Request> {
    let listener = UnixListener::bind(socket).unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let mut line = String::new();
            BufReader::new(&conn).read_line(&mut line).unwrap();
            let req: Request = serde_json::from_str(&line).expect("request is protocol JSON");
            if tx.send(req).is_err() {
                return;
            }
            match &answer {
                Some(a) => writeln!(&conn, "{}", serde_json::to_string(a).unwrap()).unwrap(),
                // Never answer: hold the connection open for a while.
                None => thread::sleep(Duration::from_secs(5)),
            }
        }
    });
    rx
}

#[test]
fn add_waits_for_the_daemon_and_prints_prev_result() {
    let dir = temp_dir("add");
    let socket = dir.join("cni.sock");
    let seen = daemon(&socket, Some(Response::Enrolled { mode: "strict".into() }));
    let out = plugin("ADD", &config(&socket, &json!({})));
    assert_eq!(out.code, 0, "stdout {} stderr {}", out.stdout, out.stderr);
    let printed: Value = serde_json::from_str(&out.stdout).expect("stdout is one JSON result");
    assert_eq!(printed, prev_result(), "prevResult unchanged");
    let req = seen.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(req.command, Verb::Add);
    assert_eq!((req.pod_namespace.as_str(), req.pod_name.as_str()), ("shop", "web-0"));
    assert_eq!(req.netns.as_deref(), Some("/var/run/netns/cni-1234"));
    assert_eq!(req.container_id, "3f5c0ffee");
    assert_eq!(req.pod_uid.as_deref(), Some("1234-5678"));
    assert_eq!(req.ips, ["10.244.1.5".parse::<std::net::IpAddr>().unwrap()]);
    assert!(out.stderr.contains("enrolled (strict)"), "{}", out.stderr);
}

#[test]
fn add_for_an_unenrolled_pod_succeeds() {
    let dir = temp_dir("not-enrolled");
    let socket = dir.join("cni.sock");
    let _seen = daemon(
        &socket,
        Some(Response::NotEnrolled { reason: "namespace shop is not labelled".into() }),
    );
    let out = plugin("ADD", &config(&socket, &json!({})));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(serde_json::from_str::<Value>(&out.stdout).unwrap(), prev_result());
}

#[test]
fn add_fails_closed_when_the_daemon_is_down() {
    let dir = temp_dir("down");
    let socket = dir.join("cni.sock");
    let out = plugin("ADD", &config(&socket, &json!({})));
    assert_eq!(out.code, 1);
    let err: Value = serde_json::from_str(&out.stdout).expect("stdout is a CNI error object");
    assert_eq!(err["code"], 999);
    assert_eq!(err["cniVersion"], "1.0.0");
    let msg = err["msg"].as_str().unwrap();
    assert_eq!(
        msg,
        format!("tlsmesh daemon not reachable at {}; pod would run unprotected", socket.display())
    );
    assert!(err["details"].as_str().unwrap().contains("failOpen"), "{err}");

    // A stale socket file nobody listens on (the daemon crashed).
    drop(UnixListener::bind(&socket).unwrap());
    let out = plugin("ADD", &config(&socket, &json!({})));
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("\"code\":999"), "{}", out.stdout);

    // failOpen: the pod starts, with a warning in the runtime's log.
    let out = plugin("ADD", &config(&socket, &json!({"failOpen": true})));
    assert_eq!(out.code, 0);
    assert_eq!(serde_json::from_str::<Value>(&out.stdout).unwrap(), prev_result());
    assert!(out.stderr.contains("may run unprotected"), "{}", out.stderr);
}

#[test]
fn add_fails_when_the_daemon_does_not_answer_in_time() {
    let dir = temp_dir("slow");
    let socket = dir.join("cni.sock");
    let _seen = daemon(&socket, None);
    let t = Instant::now();
    let out = plugin("ADD", &config(&socket, &json!({"timeoutSeconds": 1})));
    assert!(t.elapsed() < Duration::from_secs(4), "took {:?}", t.elapsed());
    assert_eq!(out.code, 1);
    let err: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(err["code"], 999);
    assert!(err["msg"].as_str().unwrap().contains("did not answer in time"), "{err}");
}

#[test]
fn add_fails_when_the_daemon_cannot_enroll() {
    let dir = temp_dir("refused");
    let socket = dir.join("cni.sock");
    let _seen = daemon(&socket, Some(Response::Error { message: "netns vanished".into() }));
    let out = plugin("ADD", &config(&socket, &json!({})));
    assert_eq!(out.code, 1);
    let err: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(err["code"], 101);
    assert!(err["msg"].as_str().unwrap().contains("netns vanished"), "{err}");
}

#[test]
fn del_succeeds_with_or_without_the_daemon() {
    let dir = temp_dir("del");
    let socket = dir.join("cni.sock");
    let mut conf = config(&socket, &json!({}));
    conf.as_object_mut().unwrap().remove("prevResult");
    let out = plugin("DEL", &conf);
    assert_eq!((out.code, out.stdout.as_str()), (0, ""), "{}", out.stderr);
    assert!(out.stderr.contains("could not tell the daemon"), "{}", out.stderr);

    let seen = daemon(&socket, Some(Response::Ok));
    let out = plugin("DEL", &conf);
    assert_eq!((out.code, out.stdout.as_str()), (0, ""));
    assert_eq!(seen.recv_timeout(Duration::from_secs(5)).unwrap().command, Verb::Del);

    let out = plugin("CHECK", &config(&socket, &json!({})));
    assert_eq!(out.code, 0);
}

#[test]
fn version_lists_the_supported_versions() {
    let out = plugin("VERSION", &json!({"cniVersion": "1.0.0"}));
    assert_eq!(out.code, 0);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["cniVersion"], "1.0.0");
    let versions: Vec<&str> =
        v["supportedVersions"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert_eq!(versions, ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]);
}

#[test]
fn install_subcommand_chains_the_plugin() {
    let dir = temp_dir("install");
    let (bin, net) = (dir.join("bin"), dir.join("net.d"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&net).unwrap();
    std::fs::write(
        net.join("10-calico.conflist"),
        r#"{"name":"k8s-pod-network","cniVersion":"0.3.1","plugins":[{"type":"calico"},{"type":"portmap"}]}"#,
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["install", "--bin-dir"])
        .arg(&bin)
        .arg("--conf-dir")
        .arg(&net)
        .args(["--timeout-seconds", "15", "--exclude-namespace", "tlsmesh-system"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(bin.join("tlsmesh-cni").exists());
    let conf: Value =
        serde_json::from_slice(&std::fs::read(net.join("10-calico.conflist")).unwrap()).unwrap();
    assert_eq!(
        conf["plugins"][2],
        json!({"type":"tlsmesh-cni","socketPath":"/var/run/tlsmesh/cni.sock","failOpen":false,"timeoutSeconds":15,
               "excludeNamespaces":["kube-system","tlsmesh-system"]})
    );
}
