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
//!
//! Upgrades: a new daemon first checks that the pinned maps fit its object
//! (`layout_verdict`: same type, key, value, size and flags for every map,
//! same `MAP_LAYOUT_VERSION`) and refuses to start otherwise, so old programs
//! and new maps never mix. It then loads its programs against the pinned
//! maps and, for each pinned link whose program's kernel tag differs from
//! the new one's, swaps the program in place with `BPF_LINK_UPDATE`
//! (compare-and-swap on the old program): capture never has a gap. A link
//! whose program is the same code is re-adopted. `TLSMESH_META` records the
//! layout version and the digest of the object in place, so the next daemon
//! reports `replaced (old → new)`. A link found running the same code from
//! an earlier load is swapped to this daemon's instance too (reported
//! re-adopted): every link then writes the decision log of this daemon's
//! load (aya-log's `AYA_LOGS` ring is one map per load, not pinned).

use std::{
    borrow::Cow,
    collections::BTreeMap,
    fs, io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{
        lpm_trie::Key as LpmKey, Array, HashMap, LpmTrie, MapData, MapInfo, MapType, PerCpuArray,
        SockHash,
    },
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSockAddr, ProgramInfo, SkLookup, SockOps,
    },
    Ebpf, EbpfLoader,
};
use tlsmesh_common::{
    counter, maps, programs, CaptureConfig, CidrKey, ConnKey, DeliveryKey, Enrollment, IpKey,
    ObjectMeta, SockAddr, CONFIG_LOG_DECISIONS, FAMILY_V4, FAMILY_V6, MAP_LAYOUT_VERSION,
};

/// aya-log's ring buffer in the object (one per load, not pinned).
const DECISION_RING: &str = "AYA_LOGS";

use crate::{
    kernel::{KernelCounters, OrigDst},
    netns::Netns,
};

/// The eBPF object built from `ebpf/` by build.rs.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tlsmesh-ebpf.o"));

/// Where the build left the test variant of the object (feature
/// `ebpf-variant`; `None` when the build copied a prebuilt object).
#[cfg(feature = "ebpf-variant")]
pub const EBPF_VARIANT_OBJECT: Option<&str> = option_env!("TLSMESH_EBPF_VARIANT");

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
    /// The eBPF object file given instead of the embedded one is unreadable.
    #[error("eBPF object {path}: {source}")]
    ObjectFile { path: PathBuf, source: io::Error },
    /// The object cannot be parsed.
    #[error("eBPF object does not parse: {0}")]
    Parse(String),
    /// The pinned maps do not fit this object's programs.
    #[error(
        "the maps pinned under {pin_dir} do not fit this build's eBPF programs ({problems}); \
         old programs and new maps must not mix, so capture was left as it is. To move across this \
         change: stop the running daemon, run `tlsmesh node --uninstall --pin-dir {pin_dir}` \
         (connections captured on this node are reset, new ones refused until a daemon is back), \
         then start this daemon"
    )]
    Layout { pin_dir: PathBuf, problems: String },
    /// Swapping a pinned link's program failed.
    #[error("replacing the program behind {path}: {source} (the link keeps its old program)")]
    Replace { path: PathBuf, source: io::Error },
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
    /// An eBPF object file to load instead of the embedded one (tests of
    /// program replacement; a hotfix build of the programs).
    pub object: Option<PathBuf>,
    /// The programs log their decisions from the start (`CONFIG_LOG_DECISIONS`).
    pub log_decisions: bool,
}

/// How an attachment came to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adoption {
    /// Attached by this process.
    Attached,
    /// Found pinned by an earlier daemon running the same program code, and kept.
    Readopted,
    /// Found pinned with other program code, and swapped in place to this
    /// daemon's (`from`: the digest of the object that was in place, or
    /// `unknown` when the earlier daemon did not record it).
    Replaced { from: String, to: String },
}

impl std::fmt::Display for Adoption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Adoption::Attached => f.write_str("attached"),
            Adoption::Readopted => f.write_str("re-adopted"),
            Adoption::Replaced { from, to } => write!(f, "replaced ({from} → {to})"),
        }
    }
}

/// One map's shape: what must match between a pinned map and the map the
/// programs were compiled against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapSpec {
    /// Pinned name.
    pub name: String,
    /// The map type (`Debug` name, e.g. `LruHash`).
    pub map_type: String,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
    /// Creation flags.
    pub flags: u32,
}

/// Whether programs compiled against `wanted` may run on the `pinned` maps
/// (pure; `pinned_version`: the layout version the pins record, `None` when
/// unknown). Maps not pinned yet are created fresh and always fit. Returns
/// every problem found.
pub fn layout_verdict(
    wanted: &[MapSpec],
    pinned: &[MapSpec],
    pinned_version: Option<u32>,
    our_version: u32,
) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    if let Some(v) = pinned_version {
        if v != our_version {
            problems.push(format!("map layout version {v}, this build needs {our_version}"));
        }
    }
    for w in wanted {
        let Some(p) = pinned.iter().find(|p| p.name == w.name) else { continue };
        let mut diff = Vec::new();
        if p.map_type != w.map_type {
            diff.push(format!("type {} ≠ {}", p.map_type, w.map_type));
        }
        for (what, have, want) in [
            ("key size", p.key_size, w.key_size),
            ("value size", p.value_size, w.value_size),
            ("max entries", p.max_entries, w.max_entries),
            ("flags", p.flags, w.flags),
        ] {
            if have != want {
                diff.push(format!("{what} {have}, needs {want}"));
            }
        }
        if !diff.is_empty() {
            problems.push(format!("{}: {}", w.name, diff.join(", ")));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// The pinned maps' layout version: what `TLSMESH_META` records, 1 when
/// other pins exist without it (the layout before it existed), `None` when
/// there is nothing to go by.
pub fn pinned_layout_version(meta: Option<ObjectMeta>, other_pins: bool) -> Option<u32> {
    match meta {
        Some(m) => Some(m.layout).filter(|&v| v != 0),
        None => other_pins.then_some(1),
    }
}

/// The shapes of the pinned maps an object wants (pinned by name).
fn object_maps(object: &[u8]) -> Result<Vec<MapSpec>, CaptureError> {
    let obj = aya_obj::Object::parse(object).map_err(|e| CaptureError::Parse(e.to_string()))?;
    let mut v: Vec<MapSpec> = obj
        .maps
        .iter()
        .filter(|(_, m)| m.pinning() == aya_obj::maps::PinningType::ByName)
        .map(|(name, m)| MapSpec {
            name: name.clone(),
            map_type: aya_obj::generated::bpf_map_type::try_from(m.map_type())
                .ok()
                .and_then(|t| MapType::try_from(t).ok())
                .map_or_else(|| format!("#{}", m.map_type()), |t| format!("{t:?}")),
            key_size: m.key_size(),
            value_size: m.value_size(),
            max_entries: m.max_entries(),
            flags: m.map_flags(),
        })
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(v)
}

/// The shapes of those of `wanted` that are pinned under `pin_dir`.
fn pinned_maps(pin_dir: &Path, wanted: &[MapSpec]) -> Vec<MapSpec> {
    wanted
        .iter()
        .filter_map(|w| {
            let info = MapInfo::from_pin(pin_dir.join(&w.name)).ok()?;
            Some(MapSpec {
                name: w.name.clone(),
                map_type: info.map_type().map_or_else(|_| "unknown".into(), |t| format!("{t:?}")),
                key_size: info.key_size(),
                value_size: info.value_size(),
                max_entries: info.max_entries(),
                flags: info.map_flags(),
            })
        })
        .collect()
}

/// What the pinned `TLSMESH_META` says, if it is pinned.
fn pinned_meta(pin_dir: &Path) -> Option<ObjectMeta> {
    let data = MapData::from_pin(pin_dir.join(maps::META)).ok()?;
    let arr: Array<MapData, ObjectMeta> = Array::try_from(aya::maps::Map::Array(data)).ok()?;
    arr.get(&0, 0).ok()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The program the link pinned at `path` runs now.
fn link_program(path: &Path) -> Option<ProgramInfo> {
    let link = FdLink::from(PinnedLink::from_pin(path).ok()?);
    let id = link.info().ok()?.program_id();
    aya::programs::loaded_programs().flatten().find(|p| p.id() == id)
}

/// The `bpf(2)` system call with one `union bpf_attr` member.
///
/// # Safety
/// `attr` must be the `bpf_attr` member that `cmd` reads, with every pointer
/// and fd in it valid for the call.
unsafe fn bpf<A>(cmd: libc::c_long, attr: &A) -> io::Result<libc::c_long> {
    // SAFETY: per the contract; the kernel reads `size_of::<A>()` bytes of
    // `attr` and zero-fills the rest of its `bpf_attr`.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_ref(attr), std::mem::size_of::<A>())
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `BPF_OBJ_GET`: a file descriptor of the object pinned at `path` (aya's
/// links do not lend theirs).
fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    /// `union bpf_attr`'s `obj_pin`/`obj_get` member.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let attr = ObjGet { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    // SAFETY: `obj_get` is the member BPF_OBJ_GET reads; the path string
    // outlives the call.
    let rc = unsafe { bpf(BPF_OBJ_GET, &attr)? };
    let fd = i32::try_from(rc).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `BPF_LINK_UPDATE` with `BPF_F_REPLACE`: the link runs `new` from now on,
/// provided it still ran `old` (another daemon may have swapped it).
fn link_update(link: BorrowedFd<'_>, new: BorrowedFd<'_>, old: BorrowedFd<'_>) -> io::Result<()> {
    /// `union bpf_attr`'s `link_update` member.
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    const BPF_LINK_UPDATE: libc::c_long = 29;
    const BPF_F_REPLACE: u32 = 1 << 2;
    let fd = |f: BorrowedFd<'_>| u32::try_from(f.as_raw_fd()).unwrap_or(u32::MAX);
    let attr = LinkUpdate {
        link_fd: fd(link),
        new_prog_fd: fd(new),
        flags: BPF_F_REPLACE,
        old_prog_fd: fd(old),
    };
    // SAFETY: `link_update` is the member BPF_LINK_UPDATE reads; the fds are
    // borrowed, so open for the call.
    unsafe { bpf(BPF_LINK_UPDATE, &attr) }.map(|_| ())
}

/// One of this daemon's loaded programs: its fd, kernel id and tag.
#[derive(Clone, Copy)]
struct Own<'a> {
    fd: BorrowedFd<'a>,
    id: u32,
    tag: u64,
}

impl<'a> Own<'a> {
    /// The loaded program `name` of `ebpf`.
    fn of(ebpf: &'a Ebpf, name: &'static str) -> Result<Self, CaptureError> {
        let prog = ebpf.program(name).ok_or(CaptureError::MissingProgram(name))?;
        let err = |source| CaptureError::Program { name, source };
        let info = prog.info().map_err(err)?;
        Ok(Self { fd: prog.fd().map_err(err)?.as_fd(), id: info.id(), tag: info.tag() })
    }
}

/// Keeps the pinned link at `path` running this daemon's `own` program:
/// re-adopted when the link runs the same code (swapped to this load's
/// instance unless it is that already), swapped in place otherwise.
fn adopt_link(path: &Path, own: Own<'_>, from: &str, to: &str) -> Result<Adoption, CaptureError> {
    let err = |source| CaptureError::Replace { path: path.to_path_buf(), source };
    let old = link_program(path)
        .ok_or_else(|| err(io::Error::other("cannot find the program the link runs")))?;
    if old.id() == own.id {
        return Ok(Adoption::Readopted);
    }
    let old_fd = old
        .fd()
        .map_err(|e| err(io::Error::other(format!("cannot open the link's program: {e}"))))?;
    let link = obj_get(path).map_err(err)?;
    link_update(link.as_fd(), own.fd, old_fd.as_fd()).map_err(err)?;
    if old.tag() == own.tag {
        return Ok(Adoption::Readopted);
    }
    Ok(Adoption::Replaced { from: from.to_string(), to: to.to_string() })
}

/// The loaded capture plane.
pub struct Capture {
    pin_dir: PathBuf,
    /// Digest of the object this daemon loaded.
    digest: String,
    ebpf: Mutex<Ebpf>,
    config: Mutex<Array<MapData, CaptureConfig>>,
    /// Kernel id of this load's connect4 program when the object carries
    /// aya-log's ring (`AYA_LOGS`): where the decision log is read from.
    log_program: Option<u32>,
    enrolled: Mutex<HashMap<MapData, u64, Enrollment>>,
    orig_by_addr: Mutex<HashMap<MapData, ConnKey, SockAddr>>,
    inbound: Mutex<SockHash<MapData, IpKey>>,
    deliveries: Mutex<HashMap<MapData, DeliveryKey, u32>>,
    counters: PerCpuArray<MapData, u64>,
    adoption: BTreeMap<&'static str, Adoption>,
    /// Digest of the object that was in place before this daemon, if recorded.
    previous: Option<String>,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture").field("pin_dir", &self.pin_dir).finish_non_exhaustive()
    }
}

/// Short SHA-256 (hex, 16 chars) of the embedded eBPF object: which build's
/// programs a daemon loads (`/config_dump`'s `ebpf_object`, `tlsmesh check`).
pub fn object_digest() -> String {
    hex(&digest_bytes(EBPF_OBJECT))
}

fn digest_bytes(object: &[u8]) -> [u8; 8] {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(object);
    let mut out = [0u8; 8];
    out.copy_from_slice(&d[..8]);
    out
}

/// Whether `path` is on a bpffs mount.
pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// The object's `sk_lookup` program.
fn sk_lookup_mut(ebpf: &mut Ebpf) -> Result<&mut SkLookup, CaptureError> {
    let name = programs::SK_LOOKUP;
    ebpf.program_mut(name)
        .ok_or(CaptureError::MissingProgram(name))?
        .try_into()
        .map_err(|source| CaptureError::Program { name, source })
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(CaptureError::MissingMap(name))?;
    T::try_from(map).map_err(|source| CaptureError::Map { name, source })
}

impl Capture {
    /// Checks that the pinned maps fit the object, loads it, attaches (or
    /// re-adopts, or replaces in place) the cgroup programs at the cgroup-v2
    /// root and the pinned `sk_lookup` links, and writes the configuration.
    #[expect(clippy::too_many_lines, reason = "one start-up sequence, in order")]
    pub fn install(settings: &CaptureSettings) -> Result<Self, CaptureError> {
        let pin_dir = settings.pin_dir.clone();
        let parent = pin_dir.parent().unwrap_or(Path::new("/"));
        if !is_bpffs(parent) && !is_bpffs(&pin_dir) {
            return Err(CaptureError::NoBpffs(pin_dir));
        }
        fs::create_dir_all(&pin_dir)
            .map_err(|source| CaptureError::Io { path: pin_dir.clone(), source })?;
        let object: Cow<'_, [u8]> = match &settings.object {
            None => Cow::Borrowed(EBPF_OBJECT),
            Some(p) => Cow::Owned(
                fs::read(p)
                    .map_err(|source| CaptureError::ObjectFile { path: p.clone(), source })?,
            ),
        };
        let digest_raw = digest_bytes(&object);
        let digest = hex(&digest_raw);

        // Old programs and new maps must never mix: check before loading,
        // because the loader reuses pinned maps by name whatever their shape.
        let wanted = object_maps(&object)?;
        let pinned = pinned_maps(&pin_dir, &wanted);
        let meta = pinned_meta(&pin_dir);
        let other_pins = pinned.iter().any(|m| m.name != maps::META);
        let version = pinned_layout_version(meta, other_pins);
        layout_verdict(&wanted, &pinned, version, MAP_LAYOUT_VERSION).map_err(|problems| {
            CaptureError::Layout { pin_dir: pin_dir.clone(), problems: problems.join("; ") }
        })?;
        let previous = meta.filter(|m| m.digest != [0; 8]).map(|m| hex(&m.digest));
        let from = previous.clone().unwrap_or_else(|| "unknown".into());

        let mut ebpf = EbpfLoader::new().default_map_pin_directory(&pin_dir).load(&object)?;
        let cgroup = fs::File::open(&settings.cgroup_root).map_err(|source| {
            CaptureError::Cgroup { path: settings.cgroup_root.clone(), source }
        })?;

        // Link-based cgroup attachments always coexist with other programs;
        // the kernel wants flags 0 here (aya maps `Single` to 0).
        let mut adoption = BTreeMap::new();
        for name in CGROUP_PROGRAMS {
            let link_path = pin_dir.join(format!("link_{name}"));
            let err = |source| CaptureError::Program { name, source };
            let pin_err = |e: &dyn std::fmt::Display| CaptureError::Pin {
                path: link_path.clone(),
                message: e.to_string(),
            };
            let prog = ebpf.program_mut(name).ok_or(CaptureError::MissingProgram(name))?;
            let is_sock_ops = name == programs::SOCK_OPS;
            if is_sock_ops {
                let p: &mut SockOps = prog.try_into().map_err(err)?;
                p.load().map_err(err)?;
            } else {
                let p: &mut CgroupSockAddr = prog.try_into().map_err(err)?;
                p.load().map_err(err)?;
            }
            if link_path.exists() && PinnedLink::from_pin(&link_path).is_ok() {
                let how = adopt_link(&link_path, Own::of(&ebpf, name)?, &from, &digest)?;
                adoption.insert(name, how);
                continue;
            }
            let prog = ebpf.program_mut(name).ok_or(CaptureError::MissingProgram(name))?;
            let _ = fs::remove_file(&link_path);
            let link: FdLink = if is_sock_ops {
                let p: &mut SockOps = prog.try_into().map_err(err)?;
                let id = p.attach(&cgroup, CgroupAttachMode::Single).map_err(err)?;
                p.take_link(id).map_err(err)?.try_into().map_err(|e| pin_err(&e))?
            } else {
                let p: &mut CgroupSockAddr = prog.try_into().map_err(err)?;
                let id = p.attach(&cgroup, CgroupAttachMode::Single).map_err(err)?;
                p.take_link(id).map_err(err)?.try_into().map_err(|e| pin_err(&e))?
            };
            link.pin(&link_path).map_err(|e| pin_err(&e))?;
            adoption.insert(name, Adoption::Attached);
        }
        {
            let name = programs::SK_LOOKUP;
            sk_lookup_mut(&mut ebpf)?
                .load()
                .map_err(|source| CaptureError::Program { name, source })?;
            let own = Own::of(&ebpf, name)?;
            // Every pod's pinned inbound link runs this daemon's program too.
            let mut found = Vec::new();
            for path in pins_with_prefix(&pin_dir, "sk_lookup_") {
                if PinnedLink::from_pin(&path).is_ok() {
                    found.push(adopt_link(&path, own, &from, &digest)?);
                }
            }
            let how = found
                .iter()
                .find(|h| matches!(h, Adoption::Replaced { .. }))
                .or(found.first())
                .cloned()
                .unwrap_or(Adoption::Attached);
            adoption.insert(programs::SK_LOOKUP, how);
        }
        let log_program = match ebpf.map(DECISION_RING) {
            Some(_) => Some(Own::of(&ebpf, programs::CONNECT4)?.id),
            None => None,
        };

        let mut config: Array<MapData, CaptureConfig> = take(&mut ebpf, maps::CONFIG)?;
        let mut ports: HashMap<MapData, u32, u32> = take(&mut ebpf, maps::BYPASS_PORTS)?;
        let mut cidrs: LpmTrie<MapData, CidrKey, u32> = take(&mut ebpf, maps::BYPASS_CIDRS)?;
        let mut meta_map: Array<MapData, ObjectMeta> = take(&mut ebpf, maps::META)?;
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
            flags: if settings.log_decisions { CONFIG_LOG_DECISIONS } else { 0 },
        };
        config.set(0, cfg, 0).map_err(map_err(maps::CONFIG))?;
        // Every program now runs this object's code: record it.
        let meta = ObjectMeta { layout: MAP_LAYOUT_VERSION, flags: 0, digest: digest_raw };
        meta_map.set(0, meta, 0).map_err(map_err(maps::META))?;

        Ok(Self {
            pin_dir,
            digest,
            ebpf: Mutex::new(ebpf),
            config: Mutex::new(config),
            log_program,
            enrolled: Mutex::new(enrolled),
            orig_by_addr: Mutex::new(orig_by_addr),
            inbound: Mutex::new(inbound),
            deliveries: Mutex::new(deliveries),
            counters,
            adoption,
            previous,
        })
    }

    /// The kernel id of a program whose maps include the decision log's
    /// ring, `None` when the loaded object has none (an older or foreign
    /// object given with `--ebpf-object`).
    pub fn decision_log_program(&self) -> Option<u32> {
        self.log_program
    }

    /// Whether the programs log their decisions now.
    pub fn log_decisions(&self) -> bool {
        let config = self.config.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        config.get(&0, 0).is_ok_and(|c| c.flags & CONFIG_LOG_DECISIONS != 0)
    }

    /// Switches the programs' decision log on or off (the next decision
    /// sees it). The rest of the configuration is left as it is.
    pub fn set_log_decisions(&self, on: bool) -> Result<(), CaptureError> {
        let map_err = |source| CaptureError::Map { name: maps::CONFIG, source };
        let mut config = self.config.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut c = config.get(&0, 0).map_err(map_err)?;
        c.flags = if on { c.flags | CONFIG_LOG_DECISIONS } else { c.flags & !CONFIG_LOG_DECISIONS };
        config.set(0, c, 0).map_err(map_err)
    }

    /// The digest of the object this daemon loaded.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The digest of the object that was in place before this daemon
    /// started, when the earlier daemon recorded it.
    pub fn previous(&self) -> Option<&str> {
        self.previous.as_deref()
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
        let name = programs::SK_LOOKUP;
        let mut ebpf = self.ebpf.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if path.exists() && PinnedLink::from_pin(&path).is_ok() {
            // Pinned by an earlier daemon (or by the old daemon beside us
            // during an upgrade, with its own program): ours runs from now on.
            let from = self.previous.as_deref().unwrap_or("unknown");
            let own = Own::of(&ebpf, name)?;
            return adopt_link(&path, own, from, &self.digest);
        }
        let err = |source| CaptureError::Program { name, source };
        let p = sk_lookup_mut(&mut ebpf)?;
        let _ = fs::remove_file(&path);
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

    /// The kernel-side counters, summed over CPUs, indexed by `counter::*`
    /// (every slot, named or reserved).
    pub fn counters(&self) -> [u64; counter::SLOTS as usize] {
        let mut out = [0u64; counter::SLOTS as usize];
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

    /// The reserved counter slots (past `counter::COUNT`) that are not zero:
    /// counted by an object newer than this daemon, or by the test variant.
    pub fn reserved_counters(&self) -> BTreeMap<u32, u64> {
        let c = self.counters();
        (counter::COUNT..counter::SLOTS)
            .filter_map(|i| Some((i, c[i as usize])).filter(|(_, v)| *v != 0))
            .collect()
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

/// The pins under `dir` whose names start with `prefix`.
fn pins_with_prefix(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect()
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

    fn reserved_counters(&self) -> BTreeMap<u32, u64> {
        Capture::reserved_counters(self)
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

    fn spec(name: &str, max_entries: u32) -> MapSpec {
        MapSpec {
            name: name.into(),
            map_type: "Hash".into(),
            key_size: 8,
            value_size: 8,
            max_entries,
            flags: 0,
        }
    }

    #[test]
    fn pinned_maps_of_the_same_shape_and_version_fit() {
        let wanted = vec![spec("A", 10), spec("B", 5)];
        assert_eq!(layout_verdict(&wanted, &wanted, Some(2), 2), Ok(()));
        // A map not pinned yet is created fresh: fits.
        assert_eq!(layout_verdict(&wanted, &wanted[..1], Some(2), 2), Ok(()));
        // Nothing pinned at all.
        assert_eq!(layout_verdict(&wanted, &[], None, 2), Ok(()));
    }

    #[test]
    fn another_shape_or_version_is_refused_naming_each_problem() {
        let wanted = vec![spec("A", 10), spec("B", 5)];
        let mut pinned = vec![spec("A", 9), spec("B", 5)];
        pinned[1].value_size = 4;
        let problems = layout_verdict(&wanted, &pinned, Some(1), 2).unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("version 1, this build needs 2"), "{problems:?}");
        assert!(problems[1].contains("A: max entries 9, needs 10"), "{problems:?}");
        assert!(problems[2].contains("B: value size 4, needs 8"), "{problems:?}");
        let mut other_type = spec("A", 10);
        other_type.map_type = "LruHash".into();
        let p = layout_verdict(&wanted, &[other_type], None, 2).unwrap_err();
        assert!(p[0].contains("type LruHash ≠ Hash"), "{p:?}");
    }

    #[test]
    fn pins_without_meta_are_the_first_layout() {
        assert_eq!(pinned_layout_version(None, true), Some(1));
        assert_eq!(pinned_layout_version(None, false), None);
        let m = ObjectMeta { layout: 2, flags: 0, digest: [1; 8] };
        assert_eq!(pinned_layout_version(Some(m), true), Some(2));
        // Created but never written (a daemon died before the end of start-up).
        assert_eq!(pinned_layout_version(Some(ObjectMeta::default()), true), None);
    }

    #[test]
    fn the_embedded_object_declares_every_pinned_map() {
        let names: Vec<String> =
            object_maps(EBPF_OBJECT).unwrap().into_iter().map(|m| m.name).collect();
        for m in [maps::ENROLLED, maps::COUNTERS, maps::META, maps::INBOUND, maps::DELIVERIES] {
            assert!(names.iter().any(|n| n == m), "{m} in {names:?}");
        }
        let counters = object_maps(EBPF_OBJECT)
            .unwrap()
            .into_iter()
            .find(|m| m.name == maps::COUNTERS)
            .unwrap();
        assert_eq!(counters.max_entries, counter::SLOTS);
    }

    #[test]
    fn adoption_reads_as_operators_expect() {
        let r = Adoption::Replaced { from: "aa".into(), to: "bb".into() };
        assert_eq!(r.to_string(), "replaced (aa → bb)");
        assert_eq!(Adoption::Readopted.to_string(), "re-adopted");
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
            object: None,
            log_decisions: false,
        };
        let p = bypass_ports(&s);
        assert!(p.contains(&22) && p.contains(&15008) && p.contains(&15021));
        assert_eq!(p.iter().filter(|&&x| x == 15008).count(), 1);
    }
}
