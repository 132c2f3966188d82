//! `tlsmesh check` and the `tlsmesh status` views against real daemons in
//! the netns topology: a healthy node passes (text and `-o json`); a CA that
//! does not answer, a stopped daemon and detached programs each fail with
//! their hint; a certificate about to expire fails naming the identity.

#![allow(clippy::too_many_lines, reason = "test scenarios: long, explicit")]

use std::{path::Path, process::Command, time::Duration};

use netkit::{require_root, tlsmesh_bin, wait_for, write_inventory, Daemon, Role, Topology};

/// `tlsmesh <args>` in node 0's netns: (exit success, stdout, stderr).
fn tlsmesh_in(topo: &Topology, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", topo.node(0).netns_path().display()))
        .arg(tlsmesh_bin())
        .args(args)
        .output()
        .expect("run tlsmesh in the node netns");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The line of `out` for the check `name` (`[ok] name: …`).
fn line<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find(|l| l.split_once("] ").is_some_and(|(_, rest)| rest.starts_with(name)))
        .unwrap_or_else(|| panic!("no check {name:?} in:\n{out}"))
}

/// The hint printed under the check `name`.
fn hint<'a>(out: &'a str, name: &str) -> &'a str {
    let l = line(out, name);
    let mut it = out.lines().skip_while(|x| *x != l).skip(1);
    it.next()
        .and_then(|h| h.trim().strip_prefix("hint: "))
        .unwrap_or_else(|| panic!("no hint under {l:?}:\n{out}"))
}

/// Waits until the daemon holds a certificate for every pod it serves.
fn wait_for_certificates(d: &Daemon) {
    let ok = wait_for(Duration::from_secs(20), || {
        let dump = d.get("/config_dump").ok()?.1;
        let pods = dump["pods"].as_array()?.len();
        let certs = dump["certificates"].as_array()?.len();
        (pods > 0 && certs >= pods).then_some(())
    });
    assert!(ok.is_some(), "no certificate for every pod within 20 s:\n{}", d.log_text());
}

#[test]
fn check_passes_on_a_healthy_node_and_fails_with_a_hint_when_broken() {
    if !require_root("check_passes_on_a_healthy_node_and_fails_with_a_hint_when_broken") {
        return;
    }
    let topo = Topology::build(1, 1).expect("topology");
    let inv = write_inventory(&topo, "inv.toml", &|_| Role::Strict);
    let mut d = Daemon::start(&topo, 0, &inv, &[]);
    wait_for_certificates(&d);

    // Healthy: every check passes, the config comes from the daemon.
    let (ok, out, err) = tlsmesh_in(&topo, &["check"]);
    assert!(ok, "check failed on a healthy node:\n{out}\n{err}");
    assert!(!out.contains("[FAIL]") && out.contains("all passed"), "{out}");
    assert!(line(&out, "config is readable").contains("the running daemon"), "{out}");
    assert!(line(&out, "daemon is ready").starts_with("[ok]"));
    assert!(line(&out, "cgroup programs attached").starts_with("[ok]"));
    assert!(line(&out, "inbound capture attached").contains("1 enrolled pods"), "{out}");
    assert!(line(&out, "daemon's programs are of this build").starts_with("[ok]"), "{out}");
    assert!(line(&out, "every local identity holds a certificate").starts_with("[ok]"), "{out}");
    assert!(line(&out, "trust roots far from expiry").starts_with("[ok]"), "{out}");
    assert!(line(&out, "sk_lookup supported").starts_with("[ok]"), "{out}");
    assert!(!out.contains('\u{221a}'), "ASCII marks off a terminal");

    let (ok, json, _) = tlsmesh_in(&topo, &["check", "-o", "json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&json).expect("check -o json is JSON");
    assert_eq!(v["passed"], true);
    let groups: Vec<&str> =
        v["groups"].as_array().unwrap().iter().filter_map(|g| g["name"].as_str()).collect();
    for g in ["tlsmesh-daemon", "capture", "identity", "clock", "kernel", "policy"] {
        assert!(groups.contains(&g), "group {g} in {groups:?}");
    }

    // The status views on the live daemon, then on a saved dump.
    let (ok, w, err) = tlsmesh_in(&topo, &["status", "workloads"]);
    assert!(ok, "{err}");
    assert!(
        w.lines().any(|l| l.starts_with("strict")
            && l.contains("n0p0")
            && l.contains("spiffe://cluster.local/ns/strict/sa/n0p0")),
        "{w}"
    );
    let dump_file = topo.scratch_dir().join("dump.json");
    std::fs::write(&dump_file, serde_json::to_vec(&d.config_dump()).unwrap()).unwrap();
    let file = dump_file.display().to_string();
    let (ok, yaml, err) =
        tlsmesh_in(&topo, &["status", "certificates", "-o", "yaml", "--file", &file]);
    assert!(ok, "{err}");
    assert!(yaml.contains("identity: spiffe://cluster.local/ns/strict/sa/n0p0"), "{yaml}");
    let (ok, table, _) = tlsmesh_in(&topo, &["status", "certificates", "--file", &file]);
    assert!(
        ok && table.lines().any(|l| l.starts_with("spiffe://cluster.local/ns/strict/sa/n0p0")
            && l.contains("Available")),
        "{table}"
    );

    // A CA that does not answer (nothing listens on port 9 of the node).
    let bundle = topo.ca_dir().join("ca.pem");
    let (ok, out, _) = tlsmesh_in(
        &topo,
        &[
            "check",
            "--ca-addr",
            "127.0.0.1:9",
            "--ca-bundle",
            &bundle.display().to_string(),
            "--ca-server-name",
            "localhost",
        ],
    );
    assert!(!ok, "check passed with an unreachable CA:\n{out}");
    assert!(line(&out, "CA reachable and answering").starts_with("[FAIL]"), "{out}");
    assert!(hint(&out, "CA reachable and answering").contains("port 15012"), "{out}");

    // Daemon down: fails on the admin API with its hint; the programs stay
    // pinned (fail closed), which the check sees.
    let pin = d.pin_dir.display().to_string();
    d.proc.kill();
    let ca = topo.ca_dir().display().to_string();
    let gone = wait_for(Duration::from_secs(10), || {
        let (ok, out, _) = tlsmesh_in(&topo, &["check", "--pin-dir", &pin, "--ca-dir", &ca]);
        (!ok && out.contains("[FAIL] admin API answers")).then_some(out)
    })
    .expect("check fails once the daemon is down");
    assert!(hint(&gone, "admin API answers").contains("start the daemon"), "{gone}");
    assert!(line(&gone, "cgroup programs attached").starts_with("[ok]"), "{gone}");
    assert!(gone.contains("1 failed"), "only the daemon check fails:\n{gone}");

    // Programs detached (pins removed): capture fails too.
    let out = Command::new(tlsmesh_bin())
        .args(["node", "--uninstall", "--node", "n0", "--pin-dir", &pin])
        .arg("--inventory")
        .arg(&inv)
        .output()
        .expect("uninstall");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!Path::new(&pin).exists());
    let (ok, out, _) = tlsmesh_in(&topo, &["check", "--pin-dir", &pin, "--ca-dir", &ca]);
    assert!(!ok);
    let l = line(&out, "cgroup programs attached");
    assert!(l.starts_with("[FAIL]") && l.contains("link_tlsmesh_connect4"), "{out}");
    assert!(hint(&out, "cgroup programs attached").contains("start the daemon"), "{out}");
}

#[test]
fn check_fails_naming_an_identity_whose_certificate_is_about_to_expire() {
    if !require_root("check_fails_naming_an_identity_whose_certificate_is_about_to_expire") {
        return;
    }
    let topo = Topology::build(1, 1).expect("topology");
    let inv = write_inventory(&topo, "inv.toml", &|_| Role::Strict);
    // 2-minute certificates, renewed at half-life: never more than 2 min left.
    let d = Daemon::start(&topo, 0, &inv, &["--cert-lifetime", "120"]);
    wait_for_certificates(&d);
    let (ok, out, _) = tlsmesh_in(&topo, &["check", "--min-cert-validity", "10m"]);
    assert!(!ok, "check passed with a certificate shorter than the threshold:\n{out}");
    let l = line(&out, "certificates valid for more than 10m0s");
    assert!(
        l.starts_with("[FAIL]")
            && l.contains("spiffe://cluster.local/ns/strict/sa/n0p0 expires in"),
        "{out}"
    );
    assert!(
        hint(&out, "certificates valid for more than").contains("--min-cert-validity"),
        "{out}"
    );
    assert!(out.contains("1 failed"), "only that check fails:\n{out}");
    // The same node passes with a threshold below the renewal point (60 s left).
    let (ok, out, _) = tlsmesh_in(&topo, &["check", "--min-cert-validity", "20s"]);
    assert!(ok, "{out}");
}
