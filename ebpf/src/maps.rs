//! The maps shared with the daemon. All are pinned by name under the daemon's
//! bpffs directory so that a restarted daemon re-adopts them.

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::LpmTrie, Array, HashMap, LruHashMap, PerCpuArray, SockHash},
};
use tlsmesh_common::{
    CaptureConfig, CidrKey, ConnKey, DeliveryKey, Enrollment, IpKey, ObjectMeta, SockAddr,
};

#[map(name = "TLSMESH_ENROLLED")]
pub static ENROLLED: HashMap<u64, Enrollment> = HashMap::pinned(16_384, 0);

#[map(name = "TLSMESH_CONFIG")]
pub static CONFIG: Array<CaptureConfig> = Array::pinned(1, 0);

#[map(name = "TLSMESH_ORIG_COOKIE")]
pub static ORIG_BY_COOKIE: LruHashMap<u64, SockAddr> = LruHashMap::pinned(262_144, 0);

#[map(name = "TLSMESH_ORIG_ADDR")]
pub static ORIG_BY_ADDR: LruHashMap<ConnKey, SockAddr> = LruHashMap::pinned(262_144, 0);

#[map(name = "TLSMESH_BYPASS_PORTS")]
pub static BYPASS_PORTS: HashMap<u32, u32> = HashMap::pinned(256, 0);

/// BPF_F_NO_PREALLOC (1) is mandatory for LPM tries.
#[map(name = "TLSMESH_BYPASS_CIDRS")]
pub static BYPASS_CIDRS: LpmTrie<CidrKey, u32> = LpmTrie::pinned(1024, 1);

#[map(name = "TLSMESH_INBOUND")]
pub static INBOUND: SockHash<IpKey> = SockHash::pinned(16_384, 0);

/// The daemon's open deliveries into pods (written by sock_ops).
#[map(name = "TLSMESH_DELIVERIES")]
pub static DELIVERIES: LruHashMap<DeliveryKey, u32> = LruHashMap::pinned(65_536, 0);

#[map(name = "TLSMESH_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(tlsmesh_common::counter::SLOTS, 0);

/// Written and read by the daemon only (layout version, object digest).
#[map(name = "TLSMESH_META")]
pub static META: Array<ObjectMeta> = Array::pinned(1, 0);

/// Adds one to counter `idx`.
#[inline(always)]
pub fn bump(idx: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// The configuration, if the daemon has written it.
#[inline(always)]
pub fn config() -> Option<CaptureConfig> {
    let c = *CONFIG.get(0)?;
    (c.ready == 1).then_some(c)
}

/// True when the destination matches a configured bypass port or CIDR.
#[inline(always)]
pub fn bypassed(port: u16, v6: &[u8; 16], prefix_len: u32) -> bool {
    // SAFETY: read-only lookup of a plain value.
    if unsafe { BYPASS_PORTS.get(u32::from(port)) }.is_some() {
        return true;
    }
    let key = aya_ebpf::maps::lpm_trie::Key::new(prefix_len, CidrKey { addr: *v6 });
    BYPASS_CIDRS.get(&key).is_some()
}
