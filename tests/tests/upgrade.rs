//! Upgrades, end to end (issue 14): a new daemon replaces the eBPF programs
//! behind the pinned links in place (`BPF_LINK_UPDATE`) while a client
//! connects every 10 ms — no connect fails, `/config_dump` says what was
//! replaced, and the new programs' behaviour shows; the same code again is
//! re-adopted; pinned maps of another layout are refused with what to do.

use std::{net::SocketAddr, time::Duration};

use netkit::{
    echo_server, require_root, wait_for, write_inventory, ConnectLoop, Daemon, Role, Topology,
};
use tlsmesh_common::counter;

/// The test variant object (the real programs plus one counter).
fn variant_object() -> String {
    let path = tlsmesh::capture::EBPF_VARIANT_OBJECT.expect(
        "the test variant of the eBPF object was not built (TLSMESH_EBPF_OBJECT copies a \
         prebuilt object and builds no variant): unset it and rebuild",
    );
    assert!(std::path::Path::new(path).is_file(), "variant object {path} is missing: rebuild");
    path.to_string()
}

/// Starts a daemon beside `old` on node 0 with the same pins, sends `old`
/// SIGTERM and waits until the new one owns the admin API.
fn replace(topo: &Topology, old: Daemon, inv: &std::path::Path, extra: &[&str]) -> Daemon {
    let node = topo.node(0).clone();
    let new = Daemon::start_with_pin(topo, &node, &old.pin_dir, inv, extra);
    let mut old = old;
    old.proc.signal(nix::sys::signal::Signal::SIGTERM);
    let pid = u64::from(new.proc.pid());
    let took = wait_for(Duration::from_secs(20), || {
        (new.get("/config_dump").ok()?.1["pid"].as_u64() == Some(pid)).then_some(())
    });
    assert!(took.is_some(), "the new daemon owns the admin API once the old one drained");
    assert!(old.proc.wait_timeout(Duration::from_secs(30)).is_some(), "the old daemon exits");
    new
}

fn connect_programs() -> Vec<String> {
    vec![tlsmesh_common::programs::CONNECT4.into(), tlsmesh_common::programs::CONNECT6.into()]
}

/// The programs reported replaced (and how), checking the rest re-adopted.
fn programs_by_change(dump: &serde_json::Value) -> (Vec<String>, String) {
    let mut replaced = Vec::new();
    let mut how_replaced = String::new();
    for (prog, how) in dump["capture"]["programs"].as_object().expect("programs") {
        let how = how.as_str().expect("a string");
        if how.starts_with("replaced") {
            replaced.push(prog.clone());
            how_replaced = how.to_string();
        } else {
            assert_eq!(how, "re-adopted", "{prog}: unchanged code is re-adopted");
        }
    }
    replaced.sort();
    (replaced, how_replaced)
}

fn variant_count(d: &Daemon) -> u64 {
    d.config_dump()["capture"]["reserved_counters"][counter::VARIANT_CAPTURED.to_string()]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn upgrade_replaces_the_ebpf_programs_in_place_with_no_failed_connect() {
    if !require_root("upgrade_replaces_the_ebpf_programs_in_place_with_no_failed_connect") {
        return;
    }
    let variant = variant_object();
    let topo = Topology::build(2, 1).expect("topology");
    let inv = write_inventory(&topo, "inv.toml", &|_| Role::Strict);
    let first = Daemon::start(&topo, 0, &inv, &[]);
    let _d1 = Daemon::start(&topo, 1, &inv, &[]);
    let (client, server) = (topo.pod(0, 0).clone(), topo.pod(1, 0).clone());
    let dst = SocketAddr::new(server.ip4.into(), 7000);
    echo_server(&server.netns, dst);
    netkit::echo_exchange(&client.netns, dst, 1000).expect("warm-up through the tunnel");
    let dump = first.config_dump();
    let built_in = dump["capture"]["object"].as_str().expect("object digest").to_string();
    for (prog, how) in dump["capture"]["programs"].as_object().expect("programs") {
        assert_eq!(how, "attached", "{prog} on a fresh node");
    }
    assert_eq!(variant_count(&first), 0, "the built-in programs never bump the variant counter");

    // Old and new programs swap under a client that connects every 10 ms.
    let looper = ConnectLoop::start(&client.netns, dst, Duration::from_millis(10));
    std::thread::sleep(Duration::from_millis(500));
    let second = replace(&topo, first, &inv, &["--ebpf-object", &variant]);
    let dump = second.config_dump();
    let new_obj = dump["capture"]["object"].as_str().expect("object digest").to_string();
    assert_ne!(new_obj, built_in, "the variant is another object");
    assert_eq!(dump["capture"]["previous_object"], built_in.as_str(), "{}", dump["capture"]);
    // The variant changed the connect programs only: those are swapped in
    // place, the others run the same code and are re-adopted.
    let replaced = format!("replaced ({built_in} → {new_obj})");
    assert_eq!(
        programs_by_change(&dump),
        (connect_programs(), replaced.clone()),
        "{}",
        dump["capture"]
    );
    // The new programs run: the variant counts each captured connect.
    let seen = wait_for(Duration::from_secs(10), || (variant_count(&second) >= 20).then_some(()));
    assert!(
        seen.is_some(),
        "the variant's counter rises with connects ({})",
        variant_count(&second)
    );

    // The same code again is re-adopted, not replaced.
    let third = replace(&topo, second, &inv, &["--ebpf-object", &variant]);
    for (prog, how) in third.config_dump()["capture"]["programs"].as_object().expect("programs") {
        assert_eq!(how, "re-adopted", "{prog}: same program code");
    }
    // And back to the built-in object: replaced again, the counter stops.
    let fourth = replace(&topo, third, &inv, &[]);
    let dump = fourth.config_dump();
    let back = format!("replaced ({new_obj} → {built_in})");
    assert_eq!(programs_by_change(&dump), (connect_programs(), back), "{}", dump["capture"]);
    let before = variant_count(&fourth);
    let ok_before = looper.ok();
    let more = wait_for(Duration::from_secs(10), || (looper.ok() >= ok_before + 20).then_some(()));
    assert!(more.is_some(), "connections go on after the last replacement");
    assert_eq!(variant_count(&fourth), before, "the built-in programs run again");
    let (ok, failed) = looper.stop();
    assert!(ok >= 40, "the loop ran across three replacements ({ok} ok)");
    assert_eq!(failed, 0, "no connect failed while programs were swapped");
    let log = fourth.log_text();
    assert!(log.contains("eBPF program in place"), "the daemon logs what it did:\n{log}");
}
