//! The eBPF pipeline end to end: the embedded object loads, its cgroup/connect4
//! program attaches at the cgroup-v2 root gated by the netns-cookie map, and
//! only the enrolled pod's connect is rewritten.

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

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use netkit::{cgroup2_root, require_root, Topology};
use tlsmesh::{
    capture::{Capture, CaptureSettings},
    netns::Netns,
};
use tlsmesh_common::{counter, DAEMON_MARK, MODE_PERMISSIVE, PORT_OUTBOUND};

/// A listener inside `netns` that answers every connection with `reply`.
fn answering_listener(netns: &str, addr: SocketAddr, reply: &'static str) {
    let l = Topology::in_netns(netns, move || TcpListener::bind(addr).expect("bind"));
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut s = s;
            let _ = s.write_all(reply.as_bytes());
        }
    });
}

/// Connects from inside `netns` and returns (what the server said, getpeername).
fn ask(netns: &str, addr: SocketAddr) -> (String, SocketAddr) {
    Topology::in_netns(netns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).expect("read");
        (buf, s.peer_addr().expect("peer"))
    })
}

#[test]
fn connect4_rewrites_only_enrolled_pods() {
    if !require_root("connect4_rewrites_only_enrolled_pods") {
        return;
    }
    let topo = Topology::build(1, 2).expect("topology");
    let node = topo.node(0).clone();
    let (enrolled, other) = (topo.pod(0, 0).clone(), topo.pod(0, 1).clone());
    let server: SocketAddr = (node.ip4, 7000).into();
    answering_listener(&node.netns, server, "real");
    for pod in [&enrolled, &other] {
        answering_listener(&pod.netns, ([127, 0, 0, 1], PORT_OUTBOUND).into(), "captured");
    }

    // Control: with nothing attached both pods reach the real server.
    assert_eq!(ask(&enrolled.netns, server).0, "real");
    assert_eq!(ask(&other.netns, server).0, "real");

    let pin_dir = topo.pin_dir("pipeline");
    let capture = Capture::install(&CaptureSettings {
        pin_dir: pin_dir.clone(),
        cgroup_root: cgroup2_root().unwrap(),
        outbound_port: PORT_OUTBOUND,
        daemon_mark: DAEMON_MARK,
        bypass_ports: vec![],
        bypass_cidrs: vec![],
        object: None,
        log_decisions: false,
    })
    .expect("install capture");
    let cookie = Netns::open(enrolled.netns_path()).unwrap().cookie().unwrap();
    capture.enroll(cookie, MODE_PERMISSIVE).unwrap();

    let (said, peer) = ask(&enrolled.netns, server);
    assert_eq!(
        said, "captured",
        "the enrolled pod's connect must be rewritten to the outbound listener"
    );
    assert_eq!(peer, server, "getpeername must still show the original destination");
    assert_eq!(
        ask(&other.netns, server).0,
        "real",
        "a pod that is not enrolled must not be captured"
    );
    assert!(capture.counters()[counter::CAPTURED as usize] >= 1);

    // Releasing the pod stops capture at once.
    capture.release(cookie).unwrap();
    assert_eq!(ask(&enrolled.netns, server).0, "real");

    drop(capture);
    let removed = Capture::uninstall(&pin_dir).unwrap();
    assert!(removed >= 5, "links and maps were pinned ({removed} removed)");
    assert!(!pin_dir.exists());

    // The pins lived on the topology's own bpffs, which goes with it (and
    // with it the kernel's maps.debug/progs.debug iterators of that mount).
    let bpffs = pin_dir.parent().expect("bpffs root").to_path_buf();
    let mounted = |p: &std::path::Path| {
        std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(&*p.to_string_lossy()))
    };
    assert!(mounted(&bpffs), "{} is a mount while the topology lives", bpffs.display());
    drop(topo);
    assert!(!mounted(&bpffs), "the topology's bpffs is unmounted when it drops");
    assert!(!bpffs.exists(), "and its mount point removed");
}
