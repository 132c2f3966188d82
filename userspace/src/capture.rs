//! The capture plane's userspace half: load the embedded eBPF object, attach
//! its programs (cgroup hooks once at the cgroup-v2 root, `sk_lookup` per pod
//! netns), pin programs' links and maps under bpffs, and read/write the maps.
//!
//! Pinning is what makes capture fail closed: the links and maps outlive the
//! daemon, so when it stops, enrolled pods' connects are still rewritten to a
//! listener that is gone (connection refused) and inbound SYNs find no
//! listener in the socket map (dropped). A restarted daemon finds the pinned
//! links and re-adopts them instead of attaching twice. `uninstall` removes
//! every pinned object, which detaches everything.

use std::{
    collections::BTreeMap,
    fs, io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{lpm_trie::Key as LpmKey, Array, HashMap, LpmTrie, MapData, PerCpuArray, SockHash},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps,
    },
    Ebpf, EbpfLoader,
};
use tlsmesh_common::{
    counter, maps, programs, CaptureConfig, CidrKey, ConnKey, DeliveryKey, Enrollment, IpKey,
    SockAddr, FAMILY_V4, FAMILY_V6,
};

use crate::{
    kernel::{KernelCounters, OrigDst},
    netns::Netns,
};

/// The eBPF object built from `ebpf/` by build.rs.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tlsmesh-ebpf.o"));

/// The cgroup programs; each one's link is pinned as `link_<name>`.
pub const CGROUP_PROGRAMS: [&str; 5] = [
    programs::CONNECT4,
    programs::CONNECT6,
    programs::SOCK_OPS,
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
];

/// Errors of the capture plane.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// bpffs is missing.
    #[error("{0} is not on a bpffs mount; mount one with `mount -t bpf bpf /sys/fs/bpf` or choose a pin dir on one with --pin-dir")]
    NoBpffs(PathBuf),
    /// The cgroup-v2 root could not be opened.
    #[error("cannot open the cgroup-v2 root {path}: {source}; mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified`")]
    Cgroup { path: PathBuf, source: io::Error },
    /// The object failed to load.
    #[error("loading the eBPF object failed: {0} (the daemon needs root and a kernel with BPF, BTF and cgroup-bpf)")]
    Load(#[from] aya::EbpfError),
    /// A program failed to load or attach.
    #[error("eBPF program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    /// A map is missing from the object.
    #[error("eBPF map {0} is missing from the object (stale build?)")]
    MissingMap(&'static str),
    /// A program is missing from the object.
    #[error("eBPF program {0} is missing from the object (stale build?)")]
    MissingProgram(&'static str),
    /// A map operation failed.
    #[error("eBPF map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    /// A pin operation failed.
    #[error("pinning {path}: {message}")]
    Pin { path: PathBuf, message: String },
    /// Filesystem error on the pin directory.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// What `install` needs to know.
#[derive(Debug, Clone)]
pub struct CaptureSettings {
    /// bpffs directory for this daemon's pins (e.g. `/sys/fs/bpf/tlsmesh`).
    pub pin_dir: PathBuf,
    /// The cgroup-v2 root the cgroup programs attach to.
    pub cgroup_root: PathBuf,
    /// Outbound listener port inside each pod.
    pub outbound_port: u16,
    /// Mark of the daemon's own sockets.
    pub daemon_mark: u32,
    /// Destination ports never captured (tlsmesh's own ports are always added).
    pub bypass_ports: Vec<u16>,
    /// Destination CIDRs never captured.
    pub bypass_cidrs: Vec<(IpAddr, u8)>,
}

/// How an attachment came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adoption {
    /// Attached by this process.
    Attached,
    /// Found pinned by an earlier daemon and kept.
    Readopted,
}

/// The loaded capture plane.
pub struct Capture {
    pin_dir: PathBuf,
    ebpf: Mutex<Ebpf>,
    enrolled: Mutex<HashMap<MapData, u64, Enrollment>>,
    orig_by_addr: Mutex<HashMap<MapData, ConnKey, SockAddr>>,
    inbound: Mutex<SockHash<MapData, IpKey>>,
    deliveries: Mutex<HashMap<MapData, DeliveryKey, u32>>,
    counters: PerCpuArray<MapData, u64>,
    adoption: BTreeMap<&'static str, Adoption>,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture").field("pin_dir", &self.pin_dir).finish_non_exhaustive()
    }
}

/// Short SHA-256 (hex, 16 chars) of the embedded eBPF object: which build's
/// programs a daemon loads (`/config_dump`'s `ebpf_object`, `tlsmesh check`).
pub fn object_digest() -> String {
    use sha2::Digest as _;
    use std::fmt::Write as _;
    sha2::Sha256::digest(EBPF_OBJECT).iter().take(8).fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Whether `path` is on a bpffs mount.
pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(CaptureError::MissingMap(name))?;
    T::try_from(map).map_err(|source| CaptureError::Map { name, source })
}

impl Capture {
    /// Loads the object, attaches (or re-adopts) the cgroup programs at the
    /// cgroup-v2 root and writes the configuration.
    pub fn install(settings: &CaptureSettings) -> Result<Self, CaptureError> {
        let pin_dir = settings.pin_dir.clone();
        let parent = pin_dir.parent().unwrap_or(Path::new("/"));
        if !is_bpffs(parent) && !is_bpffs(&pin_dir) {
            return Err(CaptureError::NoBpffs(pin_dir));
        }
        fs::create_dir_all(&pin_dir)
            .map_err(|source| CaptureError::Io { path: pin_dir.clone(), source })?;
        let mut ebpf = EbpfLoader::new().default_map_pin_directory(&pin_dir).load(EBPF_OBJECT)?;
        let cgroup = fs::File::open(&settings.cgroup_root).map_err(|source| {
            CaptureError::Cgroup { path: settings.cgroup_root.clone(), source }
        })?;

        // Link-based cgroup attachments always coexist with other programs;
        // the kernel wants flags 0 here (aya maps `Single` to 0).
        let mut adoption = BTreeMap::new();
        for name in CGROUP_PROGRAMS {
            let link_path = pin_dir.join(format!("link_{name}"));
            if link_path.exists() && PinnedLink::from_pin(&link_path).is_ok() {
                adoption.insert(name, Adoption::Readopted);
                continue;
            }
            let _ = fs::remove_file(&link_path);
            let err = |source| CaptureError::Program { name, source };
            let prog = ebpf.program_mut(name).ok_or(CaptureError::MissingProgram(name))?;
            let link: FdLink = if name == programs::SOCK_OPS {
                let p: &mut SockOps = prog.try_into().map_err(err)?;
                p.load().map_err(err)?;
                let id = p.attach(&cgroup, CgroupAttachMode::Single).map_err(err)?;
                p.take_link(id).map_err(err)?.try_into().map_err(
                    |e: aya::programs::links::LinkError| CaptureError::Pin {
                        path: link_path.clone(),
                        message: e.to_string(),
                    },
                )?
            } else {
                let p: &mut CgroupSockAddr = prog.try_into().map_err(err)?;
                p.load().map_err(err)?;
                let id = p.attach(&cgroup, CgroupAttachMode::Single).map_err(err)?;
                p.take_link(id).map_err(err)?.try_into().map_err(
                    |e: aya::programs::links::LinkError| CaptureError::Pin {
                        path: link_path.clone(),
                        message: e.to_string(),
                    },
                )?
            };
            link.pin(&link_path).map_err(|e| CaptureError::Pin {
                path: link_path.clone(),
                message: e.to_string(),
            })?;
            adoption.insert(name, Adoption::Attached);
        }
        {
            let err = |source| CaptureError::Program { name: programs::SK_LOOKUP, source };
            let p: &mut SkLookup = ebpf
                .program_mut(programs::SK_LOOKUP)
                .ok_or(CaptureError::MissingProgram(programs::SK_LOOKUP))?
                .try_into()
                .map_err(err)?;
            p.load().map_err(err)?;
        }

        let mut config: Array<MapData, CaptureConfig> = take(&mut ebpf, maps::CONFIG)?;
        let mut ports: HashMap<MapData, u32, u32> = take(&mut ebpf, maps::BYPASS_PORTS)?;
        let mut cidrs: LpmTrie<MapData, CidrKey, u32> = take(&mut ebpf, maps::BYPASS_CIDRS)?;
        let enrolled = take(&mut ebpf, maps::ENROLLED)?;
        let orig_by_addr = take(&mut ebpf, maps::ORIG_BY_ADDR)?;
        let inbound = take(&mut ebpf, maps::INBOUND)?;
        let deliveries = take(&mut ebpf, maps::DELIVERIES)?;
        let counters = take(&mut ebpf, maps::COUNTERS)?;

        // Bypass lists first, then the switch that turns capture on.
        let map_err = |name| move |source| CaptureError::Map { name, source };
        let stale: Vec<u32> = ports.keys().filter_map(Result::ok).collect();
        for p in stale {
            ports.remove(&p).map_err(map_err(maps::BYPASS_PORTS))?;
        }
        for p in bypass_ports(settings) {
            ports.insert(u32::from(p), 1, 0).map_err(map_err(maps::BYPASS_PORTS))?;
        }
        let stale: Vec<LpmKey<CidrKey>> = cidrs.keys().filter_map(Result::ok).collect();
        for k in stale {
            cidrs.remove(&k).map_err(map_err(maps::BYPASS_CIDRS))?;
        }
        for &(ip, len) in &settings.bypass_cidrs {
            let (addr, plen) = cidr_key(ip, len);
            cidrs.insert(&LpmKey::new(plen, addr), 1, 0).map_err(map_err(maps::BYPASS_CIDRS))?;
        }
        let cfg = CaptureConfig {
            outbound_port: u32::from(settings.outbound_port),
            daemon_mark: settings.daemon_mark,
            ready: 1,
            flags: 0,
        };
        config.set(0, cfg, 0).map_err(map_err(maps::CONFIG))?;

        Ok(Self {
            pin_dir,
            ebpf: Mutex::new(ebpf),
            enrolled: Mutex::new(enrolled),
            orig_by_addr: Mutex::new(orig_by_addr),
            inbound: Mutex::new(inbound),
            deliveries: Mutex::new(deliveries),
            counters,
            adoption,
        })
    }

    /// How each cgroup program came to be attached.
    pub fn adoption(&self) -> &BTreeMap<&'static str, Adoption> {
        &self.adoption
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Enrolls the netns with this cookie (capture starts with its next connect).
    pub fn enroll(&self, cookie: u64, mode: u32) -> Result<(), CaptureError> {
        let mut m = self.enrolled.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        m.insert(cookie, Enrollment { mode, flags: 0 }, 0)
            .map_err(|source| CaptureError::Map { name: maps::ENROLLED, source })
    }

    /// Releases a netns (absent is fine).
    pub fn release(&self, cookie: u64) -> Result<(), CaptureError> {
        let mut m = self.enrolled.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match m.remove(&cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) if is_enoent(&e) => Ok(()),
            Err(source) => Err(CaptureError::Map { name: maps::ENROLLED, source }),
        }
    }

    /// The enrolled cookies and their modes.
    pub fn enrolled(&self) -> Vec<(u64, Enrollment)> {
        let m = self.enrolled.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        m.iter().filter_map(Result::ok).collect()
    }

    fn sk_lookup_pin(&self, cookie: u64) -> PathBuf {
        self.pin_dir.join(format!("sk_lookup_{cookie:x}"))
    }

    /// Attaches inbound capture to a pod netns (re-adopts a pinned attachment).
    pub fn attach_inbound(&self, netns: &Netns, cookie: u64) -> Result<Adoption, CaptureError> {
        let path = self.sk_lookup_pin(cookie);
        if path.exists() && PinnedLink::from_pin(&path).is_ok() {
            return Ok(Adoption::Readopted);
        }
        let _ = fs::remove_file(&path);
        let mut ebpf = self.ebpf.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let err = |source| CaptureError::Program { name: programs::SK_LOOKUP, source };
        let p: &mut SkLookup = ebpf
            .program_mut(programs::SK_LOOKUP)
            .ok_or(CaptureError::MissingProgram(programs::SK_LOOKUP))?
            .try_into()
            .map_err(err)?;
        let id = p.attach(netns.fd()).map_err(err)?;
        let link: FdLink = p.take_link(id).map_err(err)?.into();
        link.pin(&path)
            .map_err(|e| CaptureError::Pin { path: path.clone(), message: e.to_string() })?;
        Ok(Adoption::Attached)
    }

    /// Detaches inbound capture from a pod netns (absent is fine).
    pub fn detach_inbound(&self, cookie: u64) -> Result<(), CaptureError> {
        let path = self.sk_lookup_pin(cookie);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(CaptureError::Io { path, source }),
        }
    }

    /// Registers the daemon's inbound listener for a pod address.
    pub fn set_inbound_listener(
        &self,
        ip: IpAddr,
        listener: &impl AsRawFd,
    ) -> Result<(), CaptureError> {
        let mut m = self.inbound.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        m.insert(ip_key(ip), listener.as_raw_fd(), 0)
            .map_err(|source| CaptureError::Map { name: maps::INBOUND, source })
    }

    /// Forgets the inbound listener of a pod address (absent is fine).
    pub fn remove_inbound_listener(&self, ip: IpAddr) -> Result<(), CaptureError> {
        let mut m = self.inbound.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match m.remove(&ip_key(ip)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) if is_enoent(&e) => Ok(()),
            Err(source) => Err(CaptureError::Map { name: maps::INBOUND, source }),
        }
    }

    /// The daemon's deliveries into pods open now, as recorded by `sock_ops`
    /// (for `/config_dump` and tests).
    pub fn deliveries_open(&self) -> usize {
        self.deliveries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .flatten()
            .count()
    }

    /// Takes (looks up and deletes) the original destination of a captured
    /// connection accepted from `client` in the netns with `cookie`.
    pub fn take_orig_dst(&self, cookie: u64, client: SocketAddr) -> Option<SocketAddr> {
        let key = ConnKey { netns_cookie: cookie, client: sock_addr(client) };
        let mut m = self.orig_by_addr.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let v = m.get(&key, 0).ok()?;
        let _ = m.remove(&key);
        socket_addr(&v)
    }

    /// The kernel-side counters, summed over CPUs, indexed by `counter::*`.
    pub fn counters(&self) -> [u64; counter::COUNT as usize] {
        let mut out = [0u64; counter::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let idx = u32::try_from(i).expect("few counters");
            if let Ok(v) = self.counters.get(&idx, 0) {
                *slot = v.iter().sum();
            }
        }
        out
    }

    /// The kernel counters by name, in `counter::*` order.
    pub fn named_counters(&self) -> Vec<(&'static str, u64)> {
        let c = self.counters();
        let at = |i: u32| c[i as usize];
        vec![
            ("captured", at(counter::CAPTURED)),
            ("bypassed", at(counter::BYPASSED)),
            ("daemon_skipped", at(counter::DAEMON_SKIPPED)),
            ("orig_dst_recorded", at(counter::ORIG_DST_RECORDED)),
            ("peer_rewritten", at(counter::PEER_REWRITTEN)),
            ("inbound_steered", at(counter::INBOUND_STEERED)),
            ("inbound_dropped", at(counter::INBOUND_DROPPED)),
            ("inbound_delivery", at(counter::INBOUND_DELIVERY)),
            ("delivery_recorded", at(counter::DELIVERY_RECORDED)),
        ]
    }

    /// Removes every pinned object under `pin_dir`: links (detaching the
    /// programs) and maps. Safe to call when nothing is installed.
    pub fn uninstall(pin_dir: &Path) -> Result<usize, CaptureError> {
        let entries = match fs::read_dir(pin_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(source) => return Err(CaptureError::Io { path: pin_dir.to_path_buf(), source }),
        };
        let mut n = 0;
        for e in entries.flatten() {
            let p = e.path();
            fs::remove_file(&p).map_err(|source| CaptureError::Io { path: p.clone(), source })?;
            n += 1;
        }
        fs::remove_dir(pin_dir)
            .map_err(|source| CaptureError::Io { path: pin_dir.to_path_buf(), source })?;
        Ok(n)
    }
}

fn is_enoent(e: &aya::maps::MapError) -> bool {
    matches!(e, aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
}

/// tlsmesh's own ports plus the configured ones.
pub fn bypass_ports(settings: &CaptureSettings) -> Vec<u16> {
    let mut v = vec![
        tlsmesh_common::PORT_OUTBOUND,
        tlsmesh_common::PORT_INBOUND,
        tlsmesh_common::PORT_TUNNEL,
        tlsmesh_common::PORT_ADMIN,
        tlsmesh_common::PORT_METRICS,
        tlsmesh_common::PORT_READY,
    ];
    v.extend(&settings.bypass_ports);
    v.sort_unstable();
    v.dedup();
    v
}

/// The LPM key of a CIDR: IPv4 as IPv4-mapped IPv6 with prefix + 96.
pub fn cidr_key(ip: IpAddr, len: u8) -> (CidrKey, u32) {
    match ip {
        IpAddr::V4(v4) => {
            (CidrKey { addr: v4.to_ipv6_mapped().octets() }, 96 + u32::from(len.min(32)))
        }
        IpAddr::V6(v6) => (CidrKey { addr: v6.octets() }, u32::from(len.min(128))),
    }
}

/// The eBPF form of a socket address.
pub fn sock_addr(a: SocketAddr) -> SockAddr {
    let IpKey { family, addr } = ip_key(a.ip());
    SockAddr { family, port: u32::from(a.port()), addr }
}

/// The eBPF form of an address.
pub fn ip_key(ip: IpAddr) -> IpKey {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            IpKey { family: FAMILY_V4, addr: [u32::from_ne_bytes(v4.octets()), 0, 0, 0] }
        }
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            IpKey { family: FAMILY_V6, addr: [w(0), w(4), w(8), w(12)] }
        }
    }
}

/// Back from the eBPF form; IPv4-mapped IPv6 comes back as IPv4.
pub fn socket_addr(s: &SockAddr) -> Option<SocketAddr> {
    let port = u16::try_from(s.port).ok()?;
    let ip = match s.family {
        FAMILY_V4 => IpAddr::from(s.addr[0].to_ne_bytes()),
        FAMILY_V6 => {
            let mut o = [0u8; 16];
            for (i, w) in s.addr.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(o)).to_canonical()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

impl OrigDst for Capture {
    fn take_orig_dst(&self, cookie: u64, client: SocketAddr) -> Option<SocketAddr> {
        Capture::take_orig_dst(self, cookie, client)
    }
}

impl KernelCounters for Capture {
    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.named_counters()
    }

    fn enrolled_netns(&self) -> usize {
        self.enrolled().len()
    }

    fn deliveries_open(&self) -> usize {
        Capture::deliveries_open(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_the_ebpf_form() {
        for a in ["10.1.2.3:80", "[fd00::5]:443", "127.0.0.1:15001"] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(socket_addr(&sock_addr(a)), Some(a));
        }
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:8".parse().unwrap();
        assert_eq!(socket_addr(&sock_addr(mapped)), Some("10.0.0.1:8".parse().unwrap()));
    }

    #[test]
    fn ipv4_words_are_network_order_bytes() {
        let k = ip_key("10.1.2.3".parse().unwrap());
        assert_eq!(k.family, FAMILY_V4);
        assert_eq!(k.addr[0].to_ne_bytes(), [10, 1, 2, 3]);
    }

    #[test]
    fn cidr_keys_map_ipv4_into_ipv6() {
        let (k, len) = cidr_key("10.0.0.0".parse().unwrap(), 8);
        assert_eq!(len, 104);
        assert_eq!(&k.addr[10..], &[0xff, 0xff, 10, 0, 0, 0]);
        let (_, len6) = cidr_key("fd00::".parse().unwrap(), 200);
        assert_eq!(len6, 128);
    }

    #[test]
    fn own_ports_are_always_bypassed() {
        let s = CaptureSettings {
            pin_dir: "/x".into(),
            cgroup_root: "/y".into(),
            outbound_port: 15001,
            daemon_mark: 1,
            bypass_ports: vec![22, 15008],
            bypass_cidrs: vec![],
        };
        let p = bypass_ports(&s);
        assert!(p.contains(&22) && p.contains(&15008) && p.contains(&15021));
        assert_eq!(p.iter().filter(|&&x| x == 15008).count(), 1);
    }
}
