//! Metrics per workload pair: connections opened, closed and failed, and
//! bytes each way, labelled with the source and destination workload,
//! namespace and SPIFFE principal, the reporter (the source or the
//! destination side), route, transport, security policy and response
//! flags — as `tlsmesh_tcp_*`, or in Istio's names and labels
//! (`istio_tcp_*`, `metrics.compat = "istio"`) so Kiali and Istio's
//! dashboards work unchanged.
//!
//! The connection table tells [`Pairs`] (its [`Observer`]) about each
//! connection once when it opens and once when it closes: one hash lookup
//! under a lock each time (by a borrowed key: nothing is copied for a pair
//! already counted), one small allocation per open connection, nothing per
//! read or per byte. No port or address
//! is a label, and at most `max_series` label sets are kept; connections of
//! a new pair beyond that are counted in `tlsmesh_metrics_series_dropped_total`
//! (and still in the unlabelled `tlsmesh_*` totals).
//!
//! Whatever the mode, tunnel handshake failures are also counted by
//! reporter and reason in `tlsmesh_tunnel_handshake_failures_total` (six
//! series, there from the start), which the alert rules use.

use std::sync::{
    atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
    Arc, Mutex,
};

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
};

use hashbrown::{Equivalent, HashMap};

use crate::{
    config::{MetricsCompat, MetricsConfig, Transport},
    conns::{Closing, ConnInfo, Direction, Failure, Observer, Route, Transfer},
    sync::lock,
};

/// Which side of the connection reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reporter {
    /// The client's daemon (outbound).
    Source,
    /// The server's daemon (inbound).
    Destination,
}

impl Reporter {
    fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// One end of a connection, as far as it is known.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Peer {
    /// Workload name.
    pub workload: Option<String>,
    /// Namespace.
    pub namespace: Option<String>,
    /// SPIFFE ID.
    pub principal: Option<String>,
}

/// The labels of one series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// Who reports it.
    pub reporter: Reporter,
    /// The client.
    pub source: Peer,
    /// The server.
    pub destination: Peer,
    /// The Service (`namespace/name`) the client addressed, when it did.
    pub destination_service: Option<String>,
    /// Tunnel, local, passthrough, plaintext, probe.
    pub route: &'static str,
    /// `tcp`, `quic` (tunnel), else `None`.
    pub transport: Option<Transport>,
    /// Carried in mutual TLS.
    pub mutual_tls: bool,
    /// `None` for connections that were relayed.
    pub flags: Option<Failure>,
}

/// A [`Peer`] borrowed from a connection's description.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerRef<'a> {
    workload: Option<&'a str>,
    namespace: Option<&'a str>,
    principal: Option<&'a str>,
}

/// A [`Key`] borrowed from a connection's description: the series are
/// looked up by it, and only a new pair is copied into a [`Key`]. Its
/// fields are [`Key`]'s in the same order and of types that hash alike
/// (`&str` as `String`), so both hash the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyRef<'a> {
    reporter: Reporter,
    source: PeerRef<'a>,
    destination: PeerRef<'a>,
    destination_service: Option<&'a str>,
    route: &'static str,
    transport: Option<Transport>,
    mutual_tls: bool,
    flags: Option<Failure>,
}

impl Peer {
    fn as_ref(&self) -> PeerRef<'_> {
        PeerRef {
            workload: self.workload.as_deref(),
            namespace: self.namespace.as_deref(),
            principal: self.principal.as_deref(),
        }
    }
}

impl PeerRef<'_> {
    fn to_peer(self) -> Peer {
        Peer {
            workload: self.workload.map(str::to_owned),
            namespace: self.namespace.map(str::to_owned),
            principal: self.principal.map(str::to_owned),
        }
    }
}

impl Key {
    fn as_ref(&self) -> KeyRef<'_> {
        KeyRef {
            reporter: self.reporter,
            source: self.source.as_ref(),
            destination: self.destination.as_ref(),
            destination_service: self.destination_service.as_deref(),
            route: self.route,
            transport: self.transport,
            mutual_tls: self.mutual_tls,
            flags: self.flags,
        }
    }
}

impl KeyRef<'_> {
    /// The owned key (for a new series).
    pub fn to_key(self) -> Key {
        Key {
            reporter: self.reporter,
            source: self.source.to_peer(),
            destination: self.destination.to_peer(),
            destination_service: self.destination_service.map(str::to_owned),
            route: self.route,
            transport: self.transport,
            mutual_tls: self.mutual_tls,
            flags: self.flags,
        }
    }
}

impl Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        *self == key.as_ref()
    }
}

/// A series' counters.
#[derive(Debug, Default)]
struct Series {
    opened: AtomicU64,
    closed: AtomicU64,
    failed: AtomicU64,
    /// Client to server.
    received: AtomicU64,
    /// Server to client.
    sent: AtomicU64,
}

fn namespace_of(key: &str) -> Option<&str> {
    key.split_once('/').map(|(ns, _)| ns)
}

/// `spiffe://td/ns/<ns>/sa/<sa>` → `<ns>`.
fn namespace_of_principal(id: &str) -> Option<&str> {
    let (_, rest) = id.split_once("/ns/")?;
    rest.split_once("/sa/").map(|(ns, _)| ns)
}

/// Finds the workload of a pod by its key (`namespace/name`).
pub type WorkloadOf = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Calls `f` with each series a connection counts in (two for a
/// same-node delivery: this daemon is both its source and its destination)
/// and whether the pod of the entry is the client. Pure, given
/// `workload_of`.
pub fn for_each_key(
    info: &ConnInfo,
    workload_of: &dyn Fn(&str) -> Option<String>,
    mut f: impl FnMut(KeyRef<'_>, bool),
) {
    let (own_principal, peer_principal) = match info.direction {
        Direction::Outbound => (info.src_identity.as_deref(), info.dst_identity.as_deref()),
        Direction::Inbound => (info.dst_identity.as_deref(), info.src_identity.as_deref()),
    };
    let own_workload = workload_of(&info.pod);
    let peer_workload = info.peer_pod.as_deref().and_then(workload_of);
    let own = PeerRef {
        workload: own_workload.as_deref(),
        namespace: namespace_of(&info.pod),
        principal: own_principal,
    };
    let peer = PeerRef {
        workload: peer_workload.as_deref(),
        namespace: info
            .peer_pod
            .as_deref()
            .and_then(namespace_of)
            .or_else(|| peer_principal.and_then(namespace_of_principal)),
        principal: peer_principal,
    };
    let pod_is_client = info.direction == Direction::Outbound;
    let (source, destination) = if pod_is_client { (own, peer) } else { (peer, own) };
    let key = |reporter| KeyRef {
        reporter,
        source,
        destination,
        destination_service: info.dst_service.as_deref(),
        route: info.route.as_str(),
        transport: info.transport,
        mutual_tls: info.route == Route::Tunnel,
        flags: None,
    };
    match (info.direction, info.route) {
        (Direction::Outbound, Route::Local) => {
            f(key(Reporter::Source), true);
            f(key(Reporter::Destination), true);
        }
        (Direction::Outbound, _) => f(key(Reporter::Source), true),
        (Direction::Inbound, _) => f(key(Reporter::Destination), false),
    }
}

/// The workload-pair series of one daemon.
pub struct Pairs {
    /// Workloads are looked up when a connection opens (the connection
    /// table keeps no copy of them).
    workload_of: WorkloadOf,
    compat: MetricsCompat,
    max_series: usize,
    series: Mutex<HashMap<Key, Arc<Series>>>,
    dropped: AtomicU64,
    /// Open connections by reporter (source, destination): Istio's
    /// `istio_tcp_sockets_open`.
    open: [AtomicI64; 2],
    /// Tunnel handshake failures by reporter and [`HANDSHAKE_REASONS`].
    handshake_failures: [[AtomicU64; 3]; 2],
}

/// The failures that are handshake failures, in their label's order.
const HANDSHAKE_REASONS: [Failure; 3] =
    [Failure::TlsFailed, Failure::IdentityError, Failure::Revoked];

impl std::fmt::Debug for Pairs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pairs").field("compat", &self.compat).finish_non_exhaustive()
    }
}

impl Pairs {
    /// An empty set of series; `workload_of` names a pod's workload.
    pub fn new(cfg: &MetricsConfig, workload_of: WorkloadOf) -> Self {
        Self {
            workload_of,
            compat: cfg.compat,
            max_series: cfg.max_series,
            series: Mutex::new(HashMap::new()),
            dropped: AtomicU64::new(0),
            open: [AtomicI64::new(0), AtomicI64::new(0)],
            handshake_failures: Default::default(),
        }
    }

    /// The series for `key`, made if there is room.
    fn series(&self, key: KeyRef<'_>) -> Option<Arc<Series>> {
        let mut m = lock(&self.series);
        if let Some(s) = m.get(&key) {
            return Some(Arc::clone(s));
        }
        if m.len() >= self.max_series {
            self.dropped.fetch_add(1, Relaxed);
            return None;
        }
        let s = Arc::new(Series::default());
        m.insert(key.to_key(), Arc::clone(&s));
        Some(s)
    }

    fn open_gauge(&self, r: Reporter) -> &AtomicI64 {
        &self.open[usize::from(r == Reporter::Destination)]
    }

    /// Connections whose series were not kept (the cap).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }

    /// Writes the series (at scrape time).
    pub fn encode(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let mut rows: Vec<(Key, [u64; 5])> = lock(&self.series)
            .iter()
            .map(|(k, s)| {
                let v = [&s.opened, &s.closed, &s.failed, &s.received, &s.sent]
                    .map(|a| a.load(Relaxed));
                (k.clone(), v)
            })
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let istio = self.compat == MetricsCompat::Istio;
        let prefix = if istio { "istio" } else { "tlsmesh" };
        let families: [(&str, &str, usize); 5] = [
            ("tcp_connections_opened", "The total number of TCP connections opened", 0),
            ("tcp_connections_closed", "The total number of TCP connections closed", 1),
            (
                "tcp_connections_failed",
                "The total number of TCP connections that failed to establish",
                2,
            ),
            (
                "tcp_received_bytes",
                "The size of total bytes received during request in case of a TCP connection (client to server)",
                3,
            ),
            (
                "tcp_sent_bytes",
                "The size of total bytes sent during response in case of a TCP connection (server to client)",
                4,
            ),
        ];
        for (name, help, i) in families {
            let name = format!("{prefix}_{name}");
            let mut m = enc.encode_descriptor(&name, help, None, MetricType::Counter)?;
            for (k, v) in &rows {
                // Opened and bytes are counted under the relayed (flag-less)
                // series, closed under both, failed under the flagged ones.
                let relevant = match i {
                    0 | 3 | 4 => k.flags.is_none(),
                    2 => k.flags.is_some(),
                    _ => true,
                };
                if !relevant {
                    continue;
                }
                let labels = if istio { istio_labels(k) } else { labels(k) };
                let labels: Vec<(&str, &str)> =
                    labels.iter().map(|(a, b)| (*a, b.as_str())).collect();
                ConstCounter::new(v[i]).encode(m.encode_family(&labels)?)?;
            }
        }
        if istio {
            let mut m = enc.encode_descriptor(
                "istio_tcp_sockets_open",
                "The current number of open TCP sockets",
                None,
                MetricType::Gauge,
            )?;
            for r in [Reporter::Source, Reporter::Destination] {
                let v = self.open_gauge(r).load(Relaxed);
                ConstGauge::new(v).encode(m.encode_family(&[("reporter", r.as_str())])?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "tlsmesh_tunnel_handshake_failures",
            "Tunnel connections refused during the TLS handshake or for the peer's identity, by reporter and reason",
            None,
            MetricType::Counter,
        )?;
        for r in [Reporter::Source, Reporter::Destination] {
            for (i, why) in HANDSHAKE_REASONS.iter().enumerate() {
                let v = self.handshake_failures[usize::from(r == Reporter::Destination)][i]
                    .load(Relaxed);
                let labels = [("reporter", r.as_str()), ("reason", flag_name(Some(*why)))];
                ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "tlsmesh_metrics_series_dropped",
            "Connections not counted per workload pair because the series cap (metrics.max_series) was reached",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.dropped()).encode(m.encode_family(&Vec::<(&str, &str)>::new())?)?;
        Ok(())
    }
}

const UNKNOWN: &str = "unknown";

fn or_unknown(v: Option<&String>) -> String {
    v.cloned().unwrap_or_else(|| UNKNOWN.to_owned())
}

/// tlsmesh's own `response_flags` values.
pub fn flag_name(f: Option<Failure>) -> &'static str {
    match f {
        None => "-",
        Some(Failure::PolicyDenied) => "policy_denied",
        Some(Failure::PlaintextRefused) => "plaintext_refused",
        Some(Failure::ConnectFailed) => "connect_failed",
        Some(Failure::TlsFailed) => "tls_failed",
        Some(Failure::IdentityError) => "identity_error",
        Some(Failure::Revoked) => "revoked",
    }
}

/// ztunnel's `response_flags` values (a strict pod refusing plaintext is
/// an authorization deny there too).
pub fn istio_flag_name(f: Option<Failure>) -> &'static str {
    match f {
        None => "-",
        Some(Failure::PolicyDenied | Failure::PlaintextRefused) => "DENY",
        Some(Failure::ConnectFailed) => "CONNECT",
        Some(Failure::TlsFailed) => "TLS_FAILURE",
        Some(Failure::IdentityError) => "IDENTITY_ERROR",
        Some(Failure::Revoked) => "CERT_REVOKED",
    }
}

fn policy(k: &Key) -> String {
    if k.mutual_tls { "mutual_tls" } else { "none" }.to_owned()
}

/// tlsmesh's label set.
pub fn labels(k: &Key) -> Vec<(&'static str, String)> {
    vec![
        ("reporter", k.reporter.as_str().to_owned()),
        ("source_workload", or_unknown(k.source.workload.as_ref())),
        ("source_workload_namespace", or_unknown(k.source.namespace.as_ref())),
        ("source_principal", or_unknown(k.source.principal.as_ref())),
        ("destination_workload", or_unknown(k.destination.workload.as_ref())),
        ("destination_workload_namespace", or_unknown(k.destination.namespace.as_ref())),
        ("destination_principal", or_unknown(k.destination.principal.as_ref())),
        ("destination_service", or_unknown(k.destination_service.as_ref())),
        ("route", k.route.to_owned()),
        ("transport", k.transport.map_or("none", Transport::as_str).to_owned()),
        ("connection_security_policy", policy(k)),
        ("response_flags", flag_name(k.flags).to_owned()),
    ]
}

/// Istio's label set, in ztunnel's order (`CommonTrafficLabels`). The
/// canonical service and app are the workload, the revision and version
/// `latest` (Istio's default without the labels), the cluster Istio's
/// default `Kubernetes`; a Service is named by its cluster-local host name.
pub fn istio_labels(k: &Key) -> Vec<(&'static str, String)> {
    let side = |p: &Peer| {
        let known = p.workload.is_some();
        let w = or_unknown(p.workload.as_ref());
        let rev = if known { "latest" } else { UNKNOWN }.to_owned();
        let cluster = if known { "Kubernetes" } else { UNKNOWN }.to_owned();
        (w, rev, or_unknown(p.namespace.as_ref()), or_unknown(p.principal.as_ref()), cluster)
    };
    let (sw, srev, sns, sp, sc) = side(&k.source);
    let (dw, drev, dns, dp, dc) = side(&k.destination);
    let svc = k.destination_service.as_deref().and_then(|s| s.split_once('/'));
    let (svc_host, svc_ns, svc_name) = match svc {
        Some((ns, name)) => {
            (format!("{name}.{ns}.svc.cluster.local"), ns.to_owned(), name.to_owned())
        }
        None => (UNKNOWN.to_owned(), UNKNOWN.to_owned(), UNKNOWN.to_owned()),
    };
    vec![
        ("reporter", k.reporter.as_str().to_owned()),
        ("source_workload", sw.clone()),
        ("source_canonical_service", sw.clone()),
        ("source_canonical_revision", srev.clone()),
        ("source_workload_namespace", sns),
        ("source_principal", sp),
        ("source_app", sw),
        ("source_version", srev),
        ("source_cluster", sc),
        ("destination_service", svc_host),
        ("destination_service_namespace", svc_ns),
        ("destination_service_name", svc_name),
        ("destination_workload", dw.clone()),
        ("destination_canonical_service", dw.clone()),
        ("destination_canonical_revision", drev.clone()),
        ("destination_workload_namespace", dns),
        ("destination_principal", dp),
        ("destination_app", dw),
        ("destination_version", drev),
        ("destination_cluster", dc),
        ("request_protocol", "tcp".to_owned()),
        ("response_flags", istio_flag_name(k.flags).to_owned()),
        ("connection_security_policy", policy(k)),
    ]
}

/// What an open connection holds: its series (at most two: a same-node
/// delivery counts as source and destination), each with whether the
/// entry's pod is the client. One allocation per connection.
struct Open {
    pairs: Arc<Pairs>,
    series: [Option<(Arc<Series>, bool, Reporter)>; 2],
}

impl Open {
    /// The connection left this daemon after moving `t`: closed, or
    /// handed over (then the next daemon counts its close).
    fn settle(&self, t: Transfer, closed: bool) {
        for (s, pod_is_client, r) in self.series.iter().flatten() {
            let (c2s, s2c) =
                if *pod_is_client { (t.from_pod, t.to_pod) } else { (t.to_pod, t.from_pod) };
            if closed {
                s.closed.fetch_add(1, Relaxed);
            }
            s.received.fetch_add(c2s, Relaxed);
            s.sent.fetch_add(s2c, Relaxed);
            self.pairs.open_gauge(*r).fetch_sub(1, Relaxed);
        }
    }
}

impl Closing for Open {
    fn closed(self: Box<Self>, t: Transfer) {
        self.settle(t, true);
    }

    fn handed_over(self: Box<Self>, t: Transfer) {
        self.settle(t, false);
    }
}

/// The table's observer: a handle on the shared [`Pairs`].
#[derive(Debug, Clone)]
pub struct PairsObserver(pub Arc<Pairs>);

impl PairsObserver {
    /// The series of a connection now open here; `new` counts it as opened
    /// (else it was taken over from the previous daemon, which counted it).
    fn open(&self, info: &ConnInfo, new: bool) -> Option<Box<dyn Closing>> {
        let mut series = [None, None];
        let mut n = 0;
        for_each_key(info, &self.0.workload_of, |k, client| {
            let r = k.reporter;
            if let Some(s) = self.0.series(k) {
                if new {
                    s.opened.fetch_add(1, Relaxed);
                }
                self.0.open_gauge(r).fetch_add(1, Relaxed);
                series[n] = Some((s, client, r));
                n += 1;
            }
        });
        (n > 0).then(|| Box::new(Open { pairs: Arc::clone(&self.0), series }) as Box<dyn Closing>)
    }
}

impl Observer for PairsObserver {
    fn opened(&self, info: &ConnInfo) -> Option<Box<dyn Closing>> {
        self.open(info, true)
    }

    fn adopted(&self, info: &ConnInfo) -> Option<Box<dyn Closing>> {
        self.open(info, false)
    }

    fn refused(&self, info: &ConnInfo, why: Failure) {
        // As ztunnel: opened (without flags), then closed and failed with them.
        for_each_key(info, &self.0.workload_of, |k, _| {
            if let Some(i) = HANDSHAKE_REASONS.iter().position(|h| *h == why) {
                if info.route == Route::Tunnel {
                    let r = usize::from(k.reporter == Reporter::Destination);
                    self.0.handshake_failures[r][i].fetch_add(1, Relaxed);
                }
            }
            if let Some(s) = self.0.series(k) {
                s.opened.fetch_add(1, Relaxed);
            }
            if let Some(s) = self.0.series(KeyRef { flags: Some(why), ..k }) {
                s.closed.fetch_add(1, Relaxed);
                s.failed.fetch_add(1, Relaxed);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(direction: Direction, route: Route) -> ConnInfo {
        ConnInfo {
            direction,
            route,
            pod: "shop/web-1".into(),
            src: "10.0.0.2:4000".parse().unwrap(),
            dst: "10.0.1.2:80".parse().unwrap(),
            peer_pod: Some("db/db-0".into()),
            src_identity: Some("spiffe://td/ns/shop/sa/web".into()),
            dst_identity: Some("spiffe://td/ns/db/sa/db".into()),
            transport: Some(Transport::Tcp),
            dst_service: None,
        }
    }

    /// The owned keys of `info`'s series.
    fn keys(info: &ConnInfo, workload_of: &dyn Fn(&str) -> Option<String>) -> Vec<(Key, bool)> {
        let mut v = Vec::new();
        for_each_key(info, workload_of, |k, client| v.push((k.to_key(), client)));
        v
    }

    /// Workloads of the test pods: `shop/web-1` is `web`, `db/db-0` is
    /// `db`, `w/<name>` is `<name>`.
    fn workload_of(key: &str) -> Option<String> {
        match key {
            "shop/web-1" => Some("web".into()),
            "db/db-0" => Some("db".into()),
            k => k.strip_prefix("w/").map(str::to_owned),
        }
    }

    fn pairs(cfg: &MetricsConfig) -> Arc<Pairs> {
        Arc::new(Pairs::new(cfg, Box::new(workload_of)))
    }

    fn page(p: &Arc<Pairs>) -> String {
        #[derive(Debug)]
        struct C(Arc<Pairs>);
        impl prometheus_client::collector::Collector for C {
            fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
                self.0.encode(&mut enc)
            }
        }
        let mut r = prometheus_client::registry::Registry::default();
        r.register_collector(Box::new(C(Arc::clone(p))));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        out
    }

    #[test]
    fn outbound_is_reported_by_the_source_and_bytes_go_by_client_and_server() {
        let pairs = pairs(&MetricsConfig::default());
        let obs = PairsObserver(Arc::clone(&pairs));
        let c = obs.opened(&info(Direction::Outbound, Route::Tunnel)).unwrap();
        c.closed(Transfer { from_pod: 100, to_pod: 7 });
        let mut inbound = info(Direction::Inbound, Route::Tunnel);
        inbound.pod = "db/db-0".into();
        inbound.peer_pod = Some("shop/web-1".into());
        obs.opened(&inbound).unwrap().closed(Transfer { from_pod: 7, to_pod: 100 });
        let out = page(&pairs);
        let both = "source_workload=\"web\",source_workload_namespace=\"shop\",source_principal=\"spiffe://td/ns/shop/sa/web\",destination_workload=\"db\",destination_workload_namespace=\"db\",destination_principal=\"spiffe://td/ns/db/sa/db\",destination_service=\"unknown\",route=\"tunnel\",transport=\"tcp\",connection_security_policy=\"mutual_tls\",response_flags=\"-\"}";
        for r in ["source", "destination"] {
            for (m, v) in [("received_bytes", 100), ("sent_bytes", 7), ("connections_opened", 1)] {
                let line = format!("tlsmesh_tcp_{m}_total{{reporter=\"{r}\",{both} {v}");
                assert!(out.contains(&line), "{line}\n{out}");
            }
        }
    }

    #[test]
    fn refusals_count_opened_closed_and_failed_with_their_flag() {
        let pairs = pairs(&MetricsConfig::default());
        let obs = PairsObserver(Arc::clone(&pairs));
        let mut plain = info(Direction::Inbound, Route::Plaintext);
        plain.src_identity = None;
        plain.peer_pod = None;
        plain.transport = None;
        obs.refused(&plain, Failure::PlaintextRefused);
        let out = page(&pairs);
        assert!(out.contains("tlsmesh_tcp_connections_failed_total{reporter=\"destination\",source_workload=\"unknown\",source_workload_namespace=\"unknown\",source_principal=\"unknown\",destination_workload=\"web\",destination_workload_namespace=\"shop\""), "{out}");
        assert!(out.contains("response_flags=\"plaintext_refused\"} 1"), "{out}");
        assert!(
            out.contains("connection_security_policy=\"none\",response_flags=\"-\"} 1"),
            "opened without flags:\n{out}"
        );
        obs.refused(&info(Direction::Inbound, Route::Tunnel), Failure::Revoked);
        let out = page(&pairs);
        assert!(out.contains("tlsmesh_tunnel_handshake_failures_total{reporter=\"destination\",reason=\"revoked\"} 1"), "{out}");
        assert!(out.contains("tlsmesh_tunnel_handshake_failures_total{reporter=\"source\",reason=\"tls_failed\"} 0"), "{out}");
    }

    #[test]
    fn istio_mode_uses_istio_names_labels_and_flags() {
        let cfg = MetricsConfig { compat: MetricsCompat::Istio, ..MetricsConfig::default() };
        let pairs = pairs(&cfg);
        let obs = PairsObserver(Arc::clone(&pairs));
        let mut i = info(Direction::Outbound, Route::Tunnel);
        i.dst_service = Some("db/postgres".into());
        let open = obs.opened(&i).unwrap();
        obs.refused(&info(Direction::Outbound, Route::Tunnel), Failure::PolicyDenied);
        let out = page(&pairs);
        assert!(out.contains("istio_tcp_sockets_open{reporter=\"source\"} 1"), "{out}");
        drop(open);
        for l in [
            "istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"web\",source_canonical_service=\"web\",source_canonical_revision=\"latest\",source_workload_namespace=\"shop\",source_principal=\"spiffe://td/ns/shop/sa/web\",source_app=\"web\",source_version=\"latest\",source_cluster=\"Kubernetes\",destination_service=\"postgres.db.svc.cluster.local\",destination_service_namespace=\"db\",destination_service_name=\"postgres\",destination_workload=\"db\"",
            "request_protocol=\"tcp\",response_flags=\"DENY\",connection_security_policy=\"mutual_tls\"} 1",
        ] {
            assert!(out.contains(l), "{l}\n{out}");
        }
        assert!(!out.contains("tlsmesh_tcp_"), "{out}");
    }

    #[test]
    fn local_delivery_is_reported_by_both_sides() {
        let keys = keys(&info(Direction::Outbound, Route::Local), &workload_of);
        let r: Vec<Reporter> = keys.iter().map(|(k, _)| k.reporter).collect();
        assert_eq!(r, [Reporter::Source, Reporter::Destination]);
        assert!(keys.iter().all(|(k, client)| *client && !k.mutual_tls));
    }

    #[test]
    fn the_cap_bounds_series_and_counts_what_it_drops() {
        let cfg = MetricsConfig { max_series: 2, ..MetricsConfig::default() };
        let pairs = pairs(&cfg);
        let obs = PairsObserver(Arc::clone(&pairs));
        for n in 0..5 {
            let mut i = info(Direction::Outbound, Route::Passthrough);
            i.peer_pod = Some(format!("w/w{n}"));
            drop(obs.opened(&i));
        }
        assert_eq!(lock(&pairs.series).len(), 2);
        assert_eq!(pairs.dropped(), 3);
        let out = page(&pairs);
        assert!(out.contains("tlsmesh_metrics_series_dropped_total{} 3"), "{out}");
        // A known pair is still counted.
        let mut i = info(Direction::Outbound, Route::Passthrough);
        i.peer_pod = Some("w/w0".into());
        assert!(obs.opened(&i).is_some());
    }

    #[test]
    fn a_borrowed_key_hashes_and_compares_as_its_owned_key() {
        use std::hash::BuildHasher as _;
        let h = hashbrown::DefaultHashBuilder::default();
        let mut i = info(Direction::Outbound, Route::Tunnel);
        i.dst_service = Some("db/postgres".into());
        for_each_key(&i, &workload_of, |k, _| {
            let owned = k.to_key();
            assert_eq!(h.hash_one(k), h.hash_one(&owned));
            assert!(k.equivalent(&owned));
            assert!(!KeyRef { flags: Some(Failure::Revoked), ..k }.equivalent(&owned));
        });
    }

    #[test]
    fn a_peer_known_only_by_its_principal_gets_its_namespace() {
        let mut i = info(Direction::Inbound, Route::Tunnel);
        i.peer_pod = None;
        let (k, _) = &keys(&i, &workload_of)[0];
        assert_eq!(k.source.namespace.as_deref(), Some("shop"));
        assert_eq!(k.source.workload, None);
    }
}
