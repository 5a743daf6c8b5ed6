//! VIPs and their backends, turned into the balancer's map contents.
//!
//! This owns the index assignment (a VIP index per VIP, a backend index per backend address,
//! shared by the VIPs that use it) and writes through [`Balancer`]. Every request is checked
//! whole before anything is written.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    str::FromStr,
};

use lb_common::{
    AddrKey, BACKEND_F_IN_USE, Backend, DEFAULT_RING_SIZE, MAX_BACKENDS, MAX_RING_SIZE, MAX_VIPS,
    PROTO_TCP, PROTO_UDP, VIP_F_AFFINITY_SRC_IP, VipKey, VipMeta,
};

use crate::{
    addr,
    balancer::{Balancer, BalancerError},
    maglev,
};

/// Largest backend weight.
pub const MAX_WEIGHT: u32 = 65_535;

/// Transport protocol of a VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }
}

/// A VIP's identity: `ADDR:PORT/tcp|udp` (IPv6 as `[ADDR]:PORT/tcp`); port 0 is all ports.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct VipId {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for VipId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{proto}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{proto}", self.port),
        }
    }
}

impl TryFrom<String> for VipId {
    type Error = ServiceError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<VipId> for String {
    fn from(v: VipId) -> String {
        v.to_string()
    }
}

impl FromStr for VipId {
    type Err = ServiceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| ServiceError::BadVip {
            input: s.into(),
            why: why.into(),
        };
        let (hostport, proto) = s
            .rsplit_once('/')
            .ok_or_else(|| bad("missing /tcp or /udp"))?;
        let proto = match proto {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => return Err(bad("protocol must be tcp or udp")),
        };
        let sa: std::net::SocketAddr = hostport
            .parse()
            .map_err(|_| bad("expected ADDR:PORT (IPv6 as [ADDR]:PORT), port 0-65535"))?;
        Ok(VipId {
            addr: sa.ip(),
            port: sa.port(),
            proto,
        })
    }
}

/// A backend of a VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: IpAddr,
    /// Share of new flows; 0 takes none (drained).
    pub weight: u32,
    /// False when the backend is down or disabled: out of the ring, and its established
    /// flows move elsewhere.
    pub live: bool,
}

impl BackendSpec {
    pub fn new(addr: IpAddr, weight: u32) -> Self {
        Self {
            addr,
            weight,
            live: true,
        }
    }
}

/// Everything about one VIP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipSpec {
    pub id: VipId,
    /// Hash on the client address only.
    pub affinity_src_ip: bool,
    /// Maglev ring size (prime).
    pub ring_size: u32,
    pub backends: Vec<BackendSpec>,
}

impl VipSpec {
    pub fn new(id: VipId) -> Self {
        Self {
            id,
            affinity_src_ip: false,
            ring_size: DEFAULT_RING_SIZE,
            backends: Vec::new(),
        }
    }
}

/// A request that cannot be applied, or a write that failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("invalid VIP {input:?}: {why}")]
    BadVip { input: String, why: String },
    #[error("VIP {0} already exists")]
    DuplicateVip(VipId),
    #[error("VIP {0} does not exist: list VIPs first")]
    UnknownVip(VipId),
    #[error("VIP {vip}: backend {backend} is listed twice")]
    DuplicateBackend { vip: VipId, backend: IpAddr },
    #[error("VIP {vip}: weight {weight} of backend {backend} is out of range 0-{MAX_WEIGHT}")]
    BadWeight {
        vip: VipId,
        backend: IpAddr,
        weight: u32,
    },
    #[error(
        "VIP {vip}: backend {backend} is IPv4 and cannot carry IPv6 traffic; use an IPv6 backend address"
    )]
    FamilyMismatch { vip: VipId, backend: IpAddr },
    #[error(
        "VIP {vip}: ring size {size} must be a prime between 3 and {MAX_RING_SIZE} (e.g. 65537)"
    )]
    BadRingSize { vip: VipId, size: u32 },
    #[error("VIP {0}: the address must be a unicast address")]
    BadVipAddr(VipId),
    #[error("too many VIPs (at most {MAX_VIPS})")]
    TooManyVips,
    #[error("too many backends (at most {MAX_BACKENDS} VIP-backend pairs)")]
    TooManyBackends,
    #[error(transparent)]
    Datapath(#[from] BalancerError),
}

struct VipState {
    index: u32,
    /// Offset of the active table in the VIP's ring map.
    ring_off: u32,
    spec: VipSpec,
}

/// The slot of one backend of one VIP.
#[derive(Clone, Copy, Debug)]
struct BackendSlot {
    index: u32,
    generation: u32,
    /// The VIP lists this backend.
    in_use: bool,
    /// It may keep its flows (up, or drained); false: down or disabled, its flows moved.
    live: bool,
}

type SlotKey = (VipId, IpAddr);

/// The VIPs and backends the balancer carries, and their indices.
#[derive(Default)]
pub struct Services {
    vips: BTreeMap<VipId, VipState>,
    /// Never shrinks: a retired slot keeps its index (and generation) for its pair.
    backends: BTreeMap<SlotKey, BackendSlot>,
    /// The lowest slot index above every slot handed out or adopted.
    next_slot: u32,
}

impl Services {
    pub fn new() -> Self {
        Self::default()
    }

    /// The VIP index of a VIP (for its counters).
    pub fn vip_index(&self, id: &VipId) -> Option<u32> {
        self.vips.get(id).map(|v| v.index)
    }

    /// The slot index of a backend of a VIP (for its counters).
    pub fn backend_index(&self, vip: &VipId, addr: &IpAddr) -> Option<u32> {
        self.backends.get(&(*vip, *addr)).map(|b| b.index)
    }

    pub fn vip(&self, id: &VipId) -> Option<&VipSpec> {
        self.vips.get(id).map(|v| &v.spec)
    }

    fn check(spec: &VipSpec) -> Result<(), ServiceError> {
        let vip = spec.id;
        if spec.id.addr.is_unspecified() || spec.id.addr.is_multicast() {
            return Err(ServiceError::BadVipAddr(vip));
        }
        if spec.ring_size < 3 || spec.ring_size > MAX_RING_SIZE || !maglev::is_prime(spec.ring_size)
        {
            return Err(ServiceError::BadRingSize {
                vip,
                size: spec.ring_size,
            });
        }
        let mut seen = BTreeSet::new();
        for b in &spec.backends {
            if !seen.insert(b.addr) {
                return Err(ServiceError::DuplicateBackend {
                    vip,
                    backend: b.addr,
                });
            }
            if b.weight > MAX_WEIGHT {
                return Err(ServiceError::BadWeight {
                    vip,
                    backend: b.addr,
                    weight: b.weight,
                });
            }
            if vip.addr.is_ipv6() && b.addr.is_ipv4() {
                return Err(ServiceError::FamilyMismatch {
                    vip,
                    backend: b.addr,
                });
            }
        }
        Ok(())
    }

    /// Adds or replaces a VIP with its backend list: validated whole, then written (backend
    /// slots, ring, then the VIP key, so the VIP is never visible without its ring). Only
    /// live backends with a weight get ring slots; a backend that stops being live gets a new
    /// generation, so its connection-table entries stop being honoured.
    pub fn set_vip(&mut self, bal: &mut Balancer, spec: VipSpec) -> Result<(), ServiceError> {
        Self::check(&spec)?;
        let index = match self.vips.get(&spec.id) {
            Some(v) => v.index,
            None => {
                let used: BTreeSet<u32> = self.vips.values().map(|v| v.index).collect();
                (0..MAX_VIPS)
                    .find(|i| !used.contains(i))
                    .ok_or(ServiceError::TooManyVips)?
            }
        };
        let new_slots = spec
            .backends
            .iter()
            .filter(|b| !self.backends.contains_key(&(spec.id, b.addr)))
            .count();
        if self.backends.len() + new_slots > MAX_BACKENDS as usize {
            return Err(ServiceError::TooManyBackends);
        }
        // Backend slots first: a ring must never point at an empty slot.
        let mut entries = Vec::with_capacity(spec.backends.len());
        for b in &spec.backends {
            let slot = self.backend_slot(bal, spec.id, index, *b)?;
            if b.live && b.weight > 0 {
                entries.push(maglev::Entry {
                    id: addr::bytes(b.addr),
                    weight: b.weight,
                    value: slot.index,
                });
            }
        }
        let table = maglev::build(&entries, spec.ring_size);
        let (ring_off, _) = bal.set_ring(index, &table)?;
        let (words, family) = addr::to_words(spec.id.addr);
        let key = VipKey {
            addr: words,
            port: spec.id.port.to_be(),
            proto: spec.id.proto.number(),
            family,
        };
        let id = spec.id;
        let listed: BTreeSet<IpAddr> = spec.backends.iter().map(|b| b.addr).collect();
        let state = VipState {
            index,
            ring_off,
            spec,
        };
        bal.set_vip(&key, &meta(&state))?;
        self.vips.insert(id, state);
        // Backends the VIP no longer lists: their flows end.
        let gone: Vec<IpAddr> = self
            .backends
            .iter()
            .filter(|((v, a), s)| *v == id && s.in_use && !listed.contains(a))
            .map(|((_, a), _)| *a)
            .collect();
        for a in gone {
            self.retire(bal, (id, a))?;
        }
        self.sync_addr(bal, id.addr)?;
        Ok(())
    }

    /// Removes a VIP; the flows of its backends end.
    pub fn del_vip(&mut self, bal: &mut Balancer, id: &VipId) -> Result<(), ServiceError> {
        let state = self.vips.get(id).ok_or(ServiceError::UnknownVip(*id))?;
        let (words, family) = addr::to_words(id.addr);
        bal.del_vip(&VipKey {
            addr: words,
            port: id.port.to_be(),
            proto: id.proto.number(),
            family,
        })?;
        bal.drop_ring(state.index);
        self.vips.remove(id);
        let slots: Vec<SlotKey> = self
            .backends
            .iter()
            .filter(|((v, _), s)| v == id && s.in_use)
            .map(|(k, _)| *k)
            .collect();
        for k in slots {
            self.retire(bal, k)?;
        }
        self.sync_addr(bal, id.addr)?;
        Ok(())
    }

    /// Sets a VIP's backend list (validated whole first).
    pub fn set_backends(
        &mut self,
        bal: &mut Balancer,
        id: &VipId,
        backends: Vec<BackendSpec>,
    ) -> Result<(), ServiceError> {
        let mut spec = self.vip(id).ok_or(ServiceError::UnknownVip(*id))?.clone();
        spec.backends = backends;
        self.set_vip(bal, spec)
    }

    /// Rebuilds the index assignment from the maps of an adopted datapath (a restarted agent):
    /// VIP indices from `VIPS` and each VIP's live ring, backend slots from `BACKENDS` (each
    /// slot names its VIP). The VIPs' backend lists are not in the maps; `reconcile` fills
    /// them in.
    pub fn adopt(bal: &mut Balancer) -> Result<Self, ServiceError> {
        let mut svc = Services::default();
        let mut by_index = BTreeMap::new();
        for (key, meta) in bal.vips() {
            let proto = match key.proto {
                PROTO_TCP => Proto::Tcp,
                PROTO_UDP => Proto::Udp,
                _ => continue,
            };
            let id = VipId {
                addr: addr::from_words(key.addr, key.family),
                port: u16::from_be(key.port),
                proto,
            };
            bal.adopt_ring(meta.index, meta.ring_size, meta.ring_off)?;
            let mut spec = VipSpec::new(id);
            spec.ring_size = meta.ring_size;
            spec.affinity_src_ip = meta.flags & VIP_F_AFFINITY_SRC_IP != 0;
            by_index.insert(meta.index, id);
            svc.vips.insert(
                id,
                VipState {
                    index: meta.index,
                    ring_off: meta.ring_off,
                    spec,
                },
            );
        }
        for index in 0..MAX_BACKENDS {
            let Some(b) = bal.backend(index) else {
                continue;
            };
            let Some(vip) = by_index.get(&(b.vip as u32)) else {
                continue;
            };
            if b.generation == 0 {
                continue;
            }
            svc.next_slot = svc.next_slot.max(index + 1);
            svc.backends.insert(
                (*vip, addr::from_words(b.addr, b.family)),
                BackendSlot {
                    index,
                    generation: b.generation,
                    in_use: b.flags & BACKEND_F_IN_USE != 0,
                    // Not known from the map; the next reconcile says. Assuming live keeps the
                    // flows of a backend that is down until then: it is out of the ring anyway.
                    live: true,
                },
            );
        }
        Ok(svc)
    }

    /// Makes the datapath carry exactly `desired` (validated specs), changing only what
    /// differs: VIPs that are gone are removed and changed ones rewritten (a ring diff and one
    /// switch each). Returns how many VIPs changed.
    pub fn reconcile(
        &mut self,
        bal: &mut Balancer,
        desired: &[VipSpec],
    ) -> Result<usize, ServiceError> {
        let mut changed = 0;
        let gone: Vec<VipId> = self
            .vips
            .keys()
            .filter(|id| !desired.iter().any(|d| d.id == **id))
            .copied()
            .collect();
        for id in gone {
            self.del_vip(bal, &id)?;
            changed += 1;
        }
        for spec in desired {
            if self.vip(&spec.id) != Some(spec) {
                self.set_vip(bal, spec.clone())?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Number of backend slots in use.
    pub fn backends_in_use(&self) -> usize {
        self.backends.values().filter(|s| s.in_use).count()
    }

    /// Ends the established flows of a VIP's backend: its connection-table entries stop being
    /// honoured (new generation), so they move to whatever the ring says now.
    pub fn reset_flows(
        &mut self,
        bal: &mut Balancer,
        vip: &VipId,
        addr: IpAddr,
    ) -> Result<(), ServiceError> {
        let Some(slot) = self.backends.get_mut(&(*vip, addr)) else {
            return Ok(());
        };
        slot.generation = slot.generation.wrapping_add(1).max(1);
        let (slot, vip_index) = (*slot, self.vips.get(vip).map_or(0, |v| v.index));
        bal.set_backend(slot.index, &backend(addr, vip_index, slot))?;
        Ok(())
    }

    /// Marks a slot unused: its connection-table entries stop being honoured. The index stays
    /// reserved for the pair, with its generation, so old entries never come back to life.
    fn retire(&mut self, bal: &mut Balancer, key: SlotKey) -> Result<(), ServiceError> {
        let vip_index = self.vips.get(&key.0).map_or(0, |v| v.index);
        let slot = self.backends.get_mut(&key).expect("caller listed it");
        slot.in_use = false;
        slot.generation = slot.generation.wrapping_add(1).max(1);
        let slot = *slot;
        bal.set_backend(slot.index, &backend(key.1, vip_index, slot))?;
        Ok(())
    }

    /// A slot index for a new pair: the next fresh one, without looking at every slot in use.
    /// Only at the end of the range is it searched for a gap (a slot in the adopted maps that
    /// no VIP claimed).
    fn free_slot(&mut self) -> Result<u32, ServiceError> {
        if self.next_slot < MAX_BACKENDS {
            self.next_slot += 1;
            return Ok(self.next_slot - 1);
        }
        let used: BTreeSet<u32> = self.backends.values().map(|b| b.index).collect();
        (0..MAX_BACKENDS)
            .find(|i| !used.contains(i))
            .ok_or(ServiceError::TooManyBackends)
    }

    /// The slot of `b` for VIP `vip`, created or updated and written when it changed.
    fn backend_slot(
        &mut self,
        bal: &mut Balancer,
        vip: VipId,
        vip_index: u32,
        b: BackendSpec,
    ) -> Result<BackendSlot, ServiceError> {
        let old = self.backends.get(&(vip, b.addr)).copied();
        let index = match old {
            Some(s) => s.index,
            None => self.free_slot()?,
        };
        let mut generation = old.map_or(1, |s| s.generation);
        // A backend that was retired, or stops being live, starts a new generation: entries
        // from before never count again.
        if old.is_some_and(|s| s.in_use && s.live && !b.live) {
            generation = generation.wrapping_add(1).max(1);
        }
        let slot = BackendSlot {
            index,
            generation,
            in_use: true,
            live: b.live,
        };
        let unchanged =
            old.is_some_and(|s| s.in_use && s.generation == slot.generation && s.live == slot.live);
        if !unchanged {
            bal.set_backend(index, &backend(b.addr, vip_index, slot))?;
        }
        self.backends.insert((vip, b.addr), slot);
        Ok(slot)
    }

    /// Rewrites the address-level entries of `a`: "is a VIP" (proto 0), and per protocol the
    /// VIP that takes fragments (the port-wildcard VIP if any, else the lowest port); and the
    /// VIP address filter, from every VIP address.
    fn sync_addr(&mut self, bal: &mut Balancer, a: IpAddr) -> Result<(), ServiceError> {
        let mut words = vec![0u64; lb_common::VIP_FILTER_WORDS as usize];
        for v in self.vips.keys() {
            let bit = lb_common::vip_filter_bit(&addr::to_words(v.addr).0);
            words[(bit >> 6) as usize] |= 1 << (bit & 63);
        }
        bal.set_vip_filter(&words)?;
        let (words, family) = addr::to_words(a);
        let key = |proto| AddrKey {
            addr: words,
            family,
            proto,
            _pad: [0; 2],
        };
        let on_addr: Vec<&VipState> = self.vips.values().filter(|v| v.spec.id.addr == a).collect();
        match on_addr.first() {
            Some(first) => bal.set_vip_addr(&key(0), &meta(first))?,
            None => ignore_missing(bal.del_vip_addr(&key(0)))?,
        }
        for proto in [Proto::Tcp, Proto::Udp] {
            // BTreeMap order: by port, so port 0 (wildcard) comes first.
            match on_addr.iter().find(|v| v.spec.id.proto == proto) {
                Some(v) => bal.set_vip_addr(&key(proto.number()), &meta(v))?,
                None => ignore_missing(bal.del_vip_addr(&key(proto.number())))?,
            }
        }
        Ok(())
    }
}

fn meta(v: &VipState) -> VipMeta {
    VipMeta {
        index: v.index,
        flags: if v.spec.affinity_src_ip {
            VIP_F_AFFINITY_SRC_IP
        } else {
            0
        },
        ring_size: v.spec.ring_size,
        ring_off: v.ring_off,
    }
}

fn backend(a: IpAddr, vip_index: u32, slot: BackendSlot) -> Backend {
    let (addr, family) = addr::to_words(a);
    Backend {
        addr,
        family,
        flags: if slot.in_use { BACKEND_F_IN_USE } else { 0 },
        vip: vip_index as u16,
        generation: slot.generation,
    }
}

/// Deleting a key that is not there is not an error here.
fn ignore_missing(r: Result<(), BalancerError>) -> Result<(), BalancerError> {
    match r {
        Err(BalancerError::Map {
            source: aya::maps::MapError::KeyNotFound,
            ..
        }) => Ok(()),
        Err(BalancerError::Map {
            source: aya::maps::MapError::SyscallError(e),
            ..
        }) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vip_ids_parse_and_print() {
        let v: VipId = "10.0.0.1:80/tcp".parse().unwrap();
        assert_eq!(v.port, 80);
        assert_eq!(v.proto, Proto::Tcp);
        assert_eq!(v.to_string(), "10.0.0.1:80/tcp");
        let v: VipId = "[fd00::1]:0/udp".parse().unwrap();
        assert_eq!(v.to_string(), "[fd00::1]:0/udp");
        for bad in [
            "10.0.0.1:80",
            "10.0.0.1:80/sctp",
            "10.0.0.1/tcp",
            "10.0.0.1:70000/tcp",
            "fd00::1:80/tcp",
            "host:80/tcp",
        ] {
            assert!(bad.parse::<VipId>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn bad_specs_are_refused_whole() {
        let id: VipId = "10.0.0.1:80/tcp".parse().unwrap();
        let b = |a: &str, w| BackendSpec::new(a.parse().unwrap(), w);
        let mut s = VipSpec::new(id);
        s.backends = vec![b("10.1.0.1", 1), b("10.1.0.1", 2)];
        assert!(matches!(
            Services::check(&s),
            Err(ServiceError::DuplicateBackend { .. })
        ));
        s.backends = vec![b("10.1.0.1", MAX_WEIGHT + 1)];
        assert!(matches!(
            Services::check(&s),
            Err(ServiceError::BadWeight { .. })
        ));
        s.backends = vec![];
        s.ring_size = 65536;
        assert!(matches!(
            Services::check(&s),
            Err(ServiceError::BadRingSize { .. })
        ));
        let mut s6 = VipSpec::new("[fd00::1]:80/tcp".parse().unwrap());
        s6.backends = vec![b("10.1.0.1", 1)];
        assert!(matches!(
            Services::check(&s6),
            Err(ServiceError::FamilyMismatch { .. })
        ));
        s6.backends = vec![b("fd00:1::1", 1)];
        assert!(Services::check(&s6).is_ok());
    }
}
