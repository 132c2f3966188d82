//! `kube-scale`: one node daemon (`--inventory-source kubernetes`) against a
//! real kube-apiserver populated with a cluster's worth of objects — by
//! default 500 nodes, 5,000 pods, 1,000 Services (their `EndpointSlices`
//! made by the real controller-manager) — while pods churn. It prints the
//! daemon's memory, CPU and watch traffic at each stage, the growth per
//! 1,000 pods, and how long a new pod on the daemon's node takes from its
//! creation to its enrollment (the CNI `ADD`, which returns once the pod is
//! enrolled). A benchmark: it asserts nothing about speed, it reports.
//!
//! `cargo xtask kube-scale [-- --nodes N --pods N --services N --churn N]`
//! (as root; the control plane comes from scripts/bootstrap.sh).
//!
//! Stages: the daemon starts with a fifth of the pods listed (A), the rest
//! are added while it runs (B: growth per 1,000 pods = (B − A) / 4 for the
//! defaults), then `churn` remote pods are replaced (delete + create +
//! Running), then the local pods are created and enrolled one by one.

#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "figures for a report"
)]

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use futures::{stream, StreamExt as _};
use kube::Client;
use netkit::{cni::cni_add, forward::LoopbackForwarder, require_root, Daemon, Topology};
use serde_json::json;
use tlsmesh_kube_harness::{
    objects::{delete_pod, namespace, node, pod, run_pod, service, service_account},
    ControlPlane,
};

/// Requests in flight while populating.
const IN_FLIGHT: usize = 16;
/// Namespaces the pods and Services are spread over.
const NAMESPACES: usize = 50;

struct Args {
    nodes: usize,
    pods: usize,
    services: usize,
    churn: usize,
    local: usize,
}

fn args() -> Args {
    let mut a = Args { nodes: 500, pods: 5000, services: 1000, churn: 500, local: 10 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().and_then(|v| v.parse().ok());
        let slot = match flag.as_str() {
            "--nodes" => &mut a.nodes,
            "--pods" => &mut a.pods,
            "--services" => &mut a.services,
            "--churn" => &mut a.churn,
            "--local" => &mut a.local,
            other => {
                eprintln!("kube-scale: unknown argument {other}; use --nodes --pods --services --churn --local N");
                std::process::exit(2);
            }
        };
        *slot = value.unwrap_or_else(|| {
            eprintln!("kube-scale: {flag} needs a number");
            std::process::exit(2)
        });
    }
    a.nodes = a.nodes.max(2);
    a.services = a.services.max(NAMESPACES);
    a
}

/// A remote pod's address: 10.128.0.0/10, one per index.
fn pod_ip(i: usize) -> String {
    Ipv4Addr::from(0x0a80_0000u32 + 1 + i as u32).to_string()
}

/// Where remote pod `i` lives: never node 0 (the daemon's).
fn pod_node(i: usize, nodes: usize) -> String {
    format!("n{}", 1 + i % (nodes - 1))
}

fn ns(i: usize) -> String {
    format!("ns-{}", i % NAMESPACES)
}

/// Creates remote pods `range` (name `p-<i>`, Running, Ready, labelled
/// for Service `i % services`).
async fn add_pods(c: &Client, range: std::ops::Range<usize>, a: &Args, tag: &str) {
    stream::iter(range)
        .for_each_concurrent(IN_FLIGHT, |i| {
            let c = c.clone();
            let (nodes, services) = (a.nodes, a.services);
            async move {
                let (n, name) = (ns(i), format!("p-{i}{tag}"));
                let labels = json!({"app": format!("svc-{}", i % services)});
                pod(&c, &n, &name, &pod_node(i, nodes), "app", labels).await;
                run_pod(&c, &n, &name, &pod_ip(i)).await;
            }
        })
        .await;
}

/// The daemon process's resident memory (KiB) and CPU time (s).
fn usage(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the
    // 12th, stime the 13th.
    let after = stat.rsplit_once(") ").map_or("", |x| x.1);
    let field = |i: usize| -> u64 {
        after.split_whitespace().nth(i).and_then(|x| x.parse().ok()).unwrap_or(0)
    };
    // In USER_HZ clock ticks, 100 per second on Linux.
    let ticks = field(11) + field(12);
    (rss, ticks as f64 / 100.0)
}

fn inventory_pods(d: &Daemon) -> u64 {
    d.config_dump()["inventory"]["pods"].as_u64().unwrap_or(0)
}

/// Waits until the daemon's inventory holds `n` pods; the time it took.
fn until_pods(d: &Daemon, n: u64, limit: Duration) -> Duration {
    let t = Instant::now();
    while inventory_pods(d) != n {
        assert!(
            t.elapsed() < limit,
            "the daemon's inventory has {} pods, not {n}, after {limit:?}",
            inventory_pods(d)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    t.elapsed()
}

struct Sample {
    stage: String,
    pods: u64,
    rss_kib: u64,
    cpu_s: f64,
    rx_bytes: u64,
    took: Duration,
}

fn sample(stage: &str, d: &Daemon, fwd: &LoopbackForwarder, took: Duration) -> Sample {
    let (rss_kib, cpu_s) = usage(d.proc.pid());
    Sample {
        stage: stage.into(),
        pods: inventory_pods(d),
        rss_kib,
        cpu_s,
        rx_bytes: fwd.bytes().1,
        took,
    }
}

fn main() {
    if !require_root("kube-scale") {
        std::process::exit(1);
    }
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let cp = rt.block_on(ControlPlane::start());
    let c = cp.client();
    let topo = Topology::build(1, a.local).expect("topology");
    let port = cp.port();
    let fwd = LoopbackForwarder::start(&topo.node(0).netns, port);
    let first = a.pods / 5;
    let t_pop = Instant::now();
    rt.block_on(async {
        node(&c, "n0", &topo.node(0).ip4.to_string()).await;
        stream::iter(1..a.nodes)
            .for_each_concurrent(IN_FLIGHT, |i| {
                let c = c.clone();
                async move {
                    let ip = Ipv4Addr::from(0xc0a8_0000u32 + 10 + i as u32).to_string();
                    node(&c, &format!("n{i}"), &ip).await;
                }
            })
            .await;
        for i in 0..NAMESPACES {
            namespace(&c, &ns(i), Some("strict")).await;
            service_account(&c, &ns(i), "app").await;
        }
        namespace(&c, "local", Some("strict")).await;
        service_account(&c, "local", "app").await;
        stream::iter(0..a.services)
            .for_each_concurrent(IN_FLIGHT, |j| {
                let c = c.clone();
                async move {
                    service(&c, &ns(j), &format!("svc-{j}"), &format!("svc-{j}"), 80).await;
                }
            })
            .await;
        add_pods(&c, 0..first, &a, "").await;
    });
    eprintln!(
        "kube-scale: {} nodes, {} Services, {first} pods created in {:.1?}",
        a.nodes,
        a.services,
        t_pop.elapsed()
    );

    let sock = Daemon::cni_socket(&topo, 0);
    let t_start = Instant::now();
    let d = Daemon::start_kubernetes(&topo, 0, cp.kubeconfig());
    let mut samples = vec![sample("A: started (ready)", &d, &fwd, t_start.elapsed())];
    std::thread::sleep(Duration::from_secs(10));
    samples.push(sample("A: 10 s idle", &d, &fwd, Duration::from_secs(10)));

    let t_b = Instant::now();
    rt.block_on(add_pods(&c, first..a.pods, &a, ""));
    let synced = until_pods(&d, a.pods as u64, Duration::from_secs(300));
    samples.push(sample("B: all pods added, synced", &d, &fwd, t_b.elapsed()));
    eprintln!("kube-scale: stage B synced {synced:?} after the last create");

    let t_churn = Instant::now();
    rt.block_on(async {
        stream::iter(0..a.churn)
            .for_each_concurrent(IN_FLIGHT / 2, |i| {
                let c = c.clone();
                let a = &a;
                async move {
                    delete_pod(&c, &ns(i), &format!("p-{i}")).await;
                    add_pods(&c, i..i + 1, a, "-r").await;
                }
            })
            .await;
    });
    until_pods(&d, a.pods as u64, Duration::from_secs(120));
    samples.push(sample(&format!("C: {} pods replaced", a.churn), &d, &fwd, t_churn.elapsed()));

    // Local pods: created Pending on n0, then the runtime's CNI ADD, which
    // returns once the daemon has enrolled the pod.
    let mut enroll = Vec::new();
    for p in &topo.node(0).pods {
        let t = Instant::now();
        let created = rt.block_on(pod(&c, "local", &p.name, "n0", "app", json!({"app": "local"})));
        let uid = created.metadata.uid.unwrap_or_default();
        let run = cni_add(&sock, "local", p, &uid);
        assert_eq!(run.code, Some(0), "CNI ADD for {}: {run:?}\n{}", p.name, d.log_text());
        enroll.push(t.elapsed());
        rt.block_on(run_pod(&c, "local", &p.name, &p.ip4.to_string()));
    }
    samples.push(sample(&format!("D: {} local pods enrolled", a.local), &d, &fwd, Duration::ZERO));
    report(&a, &samples, &mut enroll);
    drop(d);
    drop(fwd);
    drop(topo);
    drop(cp);
}

fn report(a: &Args, samples: &[Sample], enroll: &mut [Duration]) {
    println!(
        "\nkube-scale: {} nodes, {} pods ({} at start), {} Services, {} replaced, one node daemon\n",
        a.nodes,
        a.pods,
        a.pods / 5,
        a.services,
        a.churn
    );
    println!(
        "{:<34} {:>7} {:>9} {:>9} {:>11} {:>9}",
        "stage", "pods", "RSS MiB", "CPU s", "watch MiB", "took s"
    );
    for s in samples {
        println!(
            "{:<34} {:>7} {:>9.1} {:>9.2} {:>11.2} {:>9.1}",
            s.stage,
            s.pods,
            s.rss_kib as f64 / 1024.0,
            s.cpu_s,
            s.rx_bytes as f64 / 1_048_576.0,
            s.took.as_secs_f64()
        );
    }
    let (sa, sb) = (&samples[1], &samples[2]);
    let per_k = 1000.0 / (sb.pods.saturating_sub(sa.pods).max(1)) as f64;
    println!(
        "\ngrowth per 1,000 pods (A idle -> B): {:.1} MiB RSS, {:.2} s CPU, {:.2} MiB watch traffic",
        (sb.rss_kib as f64 - sa.rss_kib as f64) / 1024.0 * per_k,
        (sb.cpu_s - sa.cpu_s) * per_k,
        (sb.rx_bytes - sa.rx_bytes) as f64 / 1_048_576.0 * per_k
    );
    let idle_cpu = sa.cpu_s - samples[0].cpu_s;
    println!("idle CPU over 10 s with {} pods: {idle_cpu:.2} s", sa.pods);
    let churn = &samples[3];
    println!(
        "churn: {} replacements in {:.1} s cost {:.2} s CPU and {:.2} MiB watch traffic",
        a.churn,
        churn.took.as_secs_f64(),
        churn.cpu_s - sb.cpu_s,
        (churn.rx_bytes - sb.rx_bytes) as f64 / 1_048_576.0
    );
    enroll.sort();
    if let (Some(min), Some(max)) = (enroll.first(), enroll.last()) {
        let median = enroll[enroll.len() / 2];
        println!(
            "local pod creation -> enrolled (CNI ADD returned): median {:.0} ms, min {:.0} ms, max {:.0} ms ({} pods)",
            median.as_secs_f64() * 1000.0,
            min.as_secs_f64() * 1000.0,
            max.as_secs_f64() * 1000.0,
            enroll.len()
        );
    }
}
