/*!
What fills the conntrack table: a streaming breakdown of a ctnetlink table dump, and the
NOTRACK eligibility of the hot ports it finds.

One `IPCTNL_MSG_CT_GET` dump (`NLM_F_DUMP`, nfgenmsg family `AF_UNSPEC`: IPv4 and IPv6
alike) is aggregated datagram by datagram as it arrives and never stored: memory is one
receive buffer, one counter per (protocol, destination port) and a bounded top-sources
summary, whatever the table's size.

- [`parse_flow`] turns one dump message into a [`Flow`] (tuples, status, TCP state). It
  walks the attributes by hand, allocation-free: `netlink-packet-netfilter` does model
  these messages, but builds several `Vec`s per entry, which costs more than the kernel
  spends producing the dump. Pure and total; errors name the attribute and what was
  expected.
- [`parse_address`] reads one `RTM_NEWADDR` message: the namespace's own addresses, which
  tell flows that end on this host from flows it forwards.
- [`TableAggregator`] folds flows into a [`TableBreakdown`]; [`DumpReplies`] drives a dump
  reply (sequence numbers, `NLMSG_DONE`, `NLMSG_ERROR`, `NLM_F_DUMP_INTR`) over the
  framing shared with [`super::ctnetlink`].
- [`TableReader`] is the I/O: two sockets ([`NetlinkSocket`], the ctnetlink one opened only
  when that loads no module), opened in the calling thread's namespace. The table dump is
  received on a reader thread while the calling thread parses (`pipeline`), so the
  kernel's formatting and our parsing overlap instead of taking turns.
- [`notrack_eligibility`] decides, port by port, whether a NOTRACK rule would be safe and
  worth it, with a reason a person can read.

A flow's *port* is the destination port of its original direction (the service it
reaches). A flow *terminates locally* when that destination is an address of this
namespace (loopback, multicast and broadcast included: the host receives them), is
*outgoing* when only its source is local, and is *forwarded* otherwise. It is *NAT'd* when
the kernel set `IPS_SRC_NAT`/`IPS_DST_NAT` or its reply tuple is not the inverted original;
a DNAT'd flow also marks the port it was translated to, since a NOTRACK rule there would
catch the replies and break the translation. A NAT'd or forwarded flow also marks the port
its replies are addressed to (an SNAT'd client's kept source port, a routed client's port),
for the same reason.
*/

pub mod notrack;
mod pipeline;

use super::ObserveError;
use super::ctnetlink::{
    Control, NetlinkSocket, RawMessage, RawMessages, errno_message, receive_error_message,
};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

// include/uapi/linux/netfilter/nfnetlink.h and nfnetlink_conntrack.h
// The ones `pub(crate)` are shared with the requests of `crate::act::evict`.
pub(crate) const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
pub(crate) const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_TIMEOUT: u16 = 7;
pub(crate) const CTA_ID: u16 = 12;
pub(crate) const CTA_ZONE: u16 = 18;
pub(crate) const CTA_TUPLE_IP: u16 = 1;
pub(crate) const CTA_TUPLE_PROTO: u16 = 2;
pub(crate) const CTA_IP_V4_SRC: u16 = 1;
pub(crate) const CTA_IP_V4_DST: u16 = 2;
pub(crate) const CTA_IP_V6_SRC: u16 = 3;
pub(crate) const CTA_IP_V6_DST: u16 = 4;
pub(crate) const CTA_PROTO_NUM: u16 = 1;
pub(crate) const CTA_PROTO_SRC_PORT: u16 = 2;
pub(crate) const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
// include/uapi/linux/netfilter/nf_conntrack_common.h: enum ip_conntrack_status.
const IPS_SRC_NAT: u32 = 1 << 4;
const IPS_DST_NAT: u32 = 1 << 5;
// include/uapi/linux/rtnetlink.h, if_addr.h
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const IFADDRMSG_LEN: usize = 8;
pub(crate) const NFGENMSG_LEN: usize = 4;
// include/uapi/linux/netlink.h
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLA_TYPE_MASK: u16 = 0x3fff;
// include/uapi/linux/in.h: the protocols whose tuples carry ports.
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_DCCP: u8 = 33;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;

const TABLE_CHANNEL: &str = "ctnetlink table dump";
const ADDRESS_CHANNEL: &str = "rtnetlink address dump";

/// How many times a dump the kernel flagged as inconsistent (or that overflowed the
/// receive queue) is restarted before the last result is reported as it is.
const DUMP_ATTEMPTS: usize = 3;
/// The ctnetlink socket's receive queue: room for a few 32 KiB dump datagrams.
pub(crate) const RECEIVE_QUEUE_BYTES: usize = 4 << 20;

/// An IP protocol number, shown by name where it has a usual one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Protocol(pub u8);

impl Protocol {
    pub const TCP: Protocol = Protocol(IPPROTO_TCP);
    pub const UDP: Protocol = Protocol(IPPROTO_UDP);

    /// Whether conntrack tuples of this protocol carry ports.
    pub fn has_ports(self) -> bool {
        matches!(
            self.0,
            IPPROTO_TCP | IPPROTO_UDP | IPPROTO_DCCP | IPPROTO_SCTP | IPPROTO_UDPLITE
        )
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            1 => "icmp",
            IPPROTO_TCP => "tcp",
            IPPROTO_UDP => "udp",
            IPPROTO_DCCP => "dccp",
            47 => "gre",
            58 => "icmpv6",
            IPPROTO_SCTP => "sctp",
            IPPROTO_UDPLITE => "udplite",
            other => return write!(f, "{other}"),
        };
        f.write_str(name)
    }
}

impl Serialize for Protocol {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// One direction of a flow. Ports are present for the protocols that have them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple {
    pub source: IpAddr,
    pub destination: IpAddr,
    pub protocol: Protocol,
    pub source_port: Option<u16>,
    pub destination_port: Option<u16>,
}

impl Tuple {
    /// The tuple the reply direction has when nothing rewrote the flow.
    pub fn inverted(&self) -> Tuple {
        Tuple {
            source: self.destination,
            destination: self.source,
            protocol: self.protocol,
            source_port: self.destination_port,
            destination_port: self.source_port,
        }
    }
}

/// What the table analysis needs of one conntrack entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub original: Tuple,
    pub reply: Option<Tuple>,
    /// `CTA_STATUS` bits (0 when absent).
    pub status: u32,
    /// `CTA_PROTOINFO_TCP_STATE`, for TCP flows that carry it.
    pub tcp_state: Option<u8>,
    /// `CTA_ID`: the entry's identity, which a reused tuple does not share.
    pub id: Option<u32>,
    /// `CTA_TIMEOUT`: whole seconds until the entry expires unless a packet refreshes it.
    pub timeout: Option<u32>,
    /// `CTA_ZONE`, present only for entries outside the default zone.
    pub zone: Option<u16>,
}

impl Flow {
    /// Whether the kernel translated this flow's addresses or ports.
    pub fn is_nat(&self) -> bool {
        self.status & (IPS_SRC_NAT | IPS_DST_NAT) != 0
            || self.reply.is_some_and(|r| r != self.original.inverted())
    }
}

/// The attributes of one netlink attribute block, in order, kinds without the
/// nested/byte-order flags; a length that does not fit is an error, after which the walk
/// stops.
struct Attributes<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Attributes<'a> {
    type Item = Result<(u16, &'a [u8]), String>;

    fn next(&mut self) -> Option<Self::Item> {
        // Fewer than 4 bytes left is trailing padding at most.
        let header = self.rest.first_chunk::<4>()?;
        let length = usize::from(u16::from_ne_bytes([header[0], header[1]]));
        let kind = u16::from_ne_bytes([header[2], header[3]]) & NLA_TYPE_MASK;
        if length < 4 || length > self.rest.len() {
            let found = self.rest.len();
            self.rest = &[];
            return Some(Err(format!(
                "expected an attribute (kind {kind}) of 4 to {found} bytes, found a length of {length}"
            )));
        }
        let value = &self.rest[4..length];
        self.rest = self
            .rest
            .get(length.next_multiple_of(4)..)
            .unwrap_or_default();
        Some(Ok((kind, value)))
    }
}

fn attributes(block: &[u8]) -> Attributes<'_> {
    Attributes { rest: block }
}

fn fixed<const N: usize>(name: &str, value: &[u8]) -> Result<[u8; N], String> {
    value
        .try_into()
        .map_err(|_| format!("expected {name} to hold {N} bytes, found {}", value.len()))
}

/// Parses the payload (after the netlink header) of one `IPCTNL_MSG_CT_NEW` dump message.
/// Attributes the analysis does not use are skipped; the original tuple is required.
pub fn parse_flow(payload: &[u8]) -> Result<Flow, String> {
    let block = payload.get(NFGENMSG_LEN..).ok_or_else(|| {
        format!(
            "expected a {NFGENMSG_LEN}-byte nfgenmsg, found {} bytes",
            payload.len()
        )
    })?;
    let mut original = None;
    let mut reply = None;
    let mut status = 0;
    let mut tcp_state = None;
    let mut id = None;
    let mut timeout = None;
    let mut zone = None;
    for attribute in attributes(block) {
        let (kind, value) = attribute?;
        match kind {
            CTA_TUPLE_ORIG => original = Some(parse_tuple("CTA_TUPLE_ORIG", value)?),
            CTA_TUPLE_REPLY => reply = Some(parse_tuple("CTA_TUPLE_REPLY", value)?),
            CTA_STATUS => status = u32::from_be_bytes(fixed("CTA_STATUS", value)?),
            CTA_PROTOINFO => tcp_state = parse_tcp_state(value)?,
            CTA_ID => id = Some(u32::from_be_bytes(fixed("CTA_ID", value)?)),
            CTA_TIMEOUT => timeout = Some(u32::from_be_bytes(fixed("CTA_TIMEOUT", value)?)),
            CTA_ZONE => zone = Some(u16::from_be_bytes(fixed("CTA_ZONE", value)?)),
            _ => {}
        }
    }
    let original = original.ok_or("expected a CTA_TUPLE_ORIG attribute")?;
    Ok(Flow {
        original,
        reply,
        status,
        tcp_state,
        id,
        timeout,
        zone,
    })
}

fn parse_tuple(name: &str, block: &[u8]) -> Result<Tuple, String> {
    let mut source = None;
    let mut destination = None;
    let mut protocol = None;
    let mut source_port = None;
    let mut destination_port = None;
    for attribute in attributes(block) {
        let (kind, value) = attribute.map_err(|e| format!("{name}: {e}"))?;
        match kind {
            CTA_TUPLE_IP => {
                for attribute in attributes(value) {
                    let (kind, value) = attribute.map_err(|e| format!("{name}: {e}"))?;
                    let v4 = |field: &str| {
                        fixed::<4>(field, value).map(|b| IpAddr::V4(Ipv4Addr::from(b)))
                    };
                    let v6 = |field: &str| {
                        fixed::<16>(field, value).map(|b| IpAddr::V6(Ipv6Addr::from(b)))
                    };
                    match kind {
                        CTA_IP_V4_SRC => source = Some(v4("CTA_IP_V4_SRC")?),
                        CTA_IP_V4_DST => destination = Some(v4("CTA_IP_V4_DST")?),
                        CTA_IP_V6_SRC => source = Some(v6("CTA_IP_V6_SRC")?),
                        CTA_IP_V6_DST => destination = Some(v6("CTA_IP_V6_DST")?),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for attribute in attributes(value) {
                    let (kind, value) = attribute.map_err(|e| format!("{name}: {e}"))?;
                    let port = |field: &str| fixed::<2>(field, value).map(u16::from_be_bytes);
                    match kind {
                        CTA_PROTO_NUM => {
                            protocol = Some(Protocol(fixed::<1>("CTA_PROTO_NUM", value)?[0]));
                        }
                        CTA_PROTO_SRC_PORT => source_port = Some(port("CTA_PROTO_SRC_PORT")?),
                        CTA_PROTO_DST_PORT => {
                            destination_port = Some(port("CTA_PROTO_DST_PORT")?);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let missing = |what: &str| format!("{name}: expected {what}");
    let protocol = protocol.ok_or_else(|| missing("CTA_PROTO_NUM"))?;
    let (source_port, destination_port) = if protocol.has_ports() {
        (
            Some(source_port.ok_or_else(|| missing("CTA_PROTO_SRC_PORT"))?),
            Some(destination_port.ok_or_else(|| missing("CTA_PROTO_DST_PORT"))?),
        )
    } else {
        (None, None)
    };
    Ok(Tuple {
        source: source.ok_or_else(|| missing("CTA_IP_V4_SRC or CTA_IP_V6_SRC"))?,
        destination: destination.ok_or_else(|| missing("CTA_IP_V4_DST or CTA_IP_V6_DST"))?,
        protocol,
        source_port,
        destination_port,
    })
}

/// The TCP state inside `CTA_PROTOINFO`, when it is a TCP one.
fn parse_tcp_state(block: &[u8]) -> Result<Option<u8>, String> {
    for attribute in attributes(block) {
        let (kind, value) = attribute.map_err(|e| format!("CTA_PROTOINFO: {e}"))?;
        if kind != CTA_PROTOINFO_TCP {
            continue;
        }
        for attribute in attributes(value) {
            let (kind, value) = attribute.map_err(|e| format!("CTA_PROTOINFO_TCP: {e}"))?;
            if kind == CTA_PROTOINFO_TCP_STATE {
                return Ok(Some(fixed::<1>("CTA_PROTOINFO_TCP_STATE", value)?[0]));
            }
        }
    }
    Ok(None)
}

/// The addresses of one `RTM_NEWADDR` message (payload after the netlink header): the
/// local address (`IFA_LOCAL`, else `IFA_ADDRESS`, which is the peer on point-to-point
/// links when `IFA_LOCAL` is present) and the broadcast address, if any.
pub fn parse_address(payload: &[u8]) -> Result<Vec<IpAddr>, String> {
    let header = payload.first_chunk::<IFADDRMSG_LEN>().ok_or_else(|| {
        format!(
            "expected an {IFADDRMSG_LEN}-byte ifaddrmsg, found {} bytes",
            payload.len()
        )
    })?;
    let family = i32::from(header[0]);
    let address = |name: &str, value: &[u8]| -> Result<IpAddr, String> {
        match family {
            libc::AF_INET => fixed::<4>(name, value).map(|b| IpAddr::V4(b.into())),
            libc::AF_INET6 => fixed::<16>(name, value).map(|b| IpAddr::V6(b.into())),
            other => Err(format!(
                "expected family AF_INET or AF_INET6 for {name}, found {other}"
            )),
        }
    };
    let mut local = None;
    let mut peer_or_local = None;
    let mut found = Vec::new();
    for attribute in attributes(&payload[IFADDRMSG_LEN..]) {
        let (kind, value) = attribute?;
        match kind {
            IFA_LOCAL => local = Some(address("IFA_LOCAL", value)?),
            IFA_ADDRESS => peer_or_local = Some(address("IFA_ADDRESS", value)?),
            IFA_BROADCAST => found.push(address("IFA_BROADCAST", value)?),
            _ => {}
        }
    }
    found.extend(local.or(peer_or_local));
    Ok(found)
}

/// Where a flow goes, seen from this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Its original destination is a local address.
    TerminatesLocally,
    /// Only its source is local: a connection this host opened.
    Outgoing,
    /// Neither end is local: routed through this host.
    Forwarded,
}

/// The addresses at which this namespace receives traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalAddresses {
    addresses: HashSet<IpAddr, BuildHasherDefault<KeyHasher>>,
}

impl LocalAddresses {
    pub fn new(addresses: impl IntoIterator<Item = IpAddr>) -> Self {
        LocalAddresses {
            addresses: addresses.into_iter().collect(),
        }
    }

    /// Whether traffic to `address` is delivered to this host. The whole loopback range
    /// counts (the kernel routes 127/8 locally though `lo` carries only 127.0.0.1), and
    /// so do multicast and limited broadcast.
    pub fn contains(&self, address: &IpAddr) -> bool {
        address.is_loopback()
            || address.is_multicast()
            || *address == IpAddr::V4(Ipv4Addr::BROADCAST)
            || self.addresses.contains(address)
    }

    /// Where `tuple` goes, seen from this host.
    pub fn direction(&self, tuple: &Tuple) -> Direction {
        if self.contains(&tuple.destination) {
            Direction::TerminatesLocally
        } else if self.contains(&tuple.source) {
            Direction::Outgoing
        } else {
            Direction::Forwarded
        }
    }
}

/// The table entries of one (protocol, destination port).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortUsage {
    pub proto: Protocol,
    pub port: u16,
    /// Flows whose original destination port this is.
    pub entries: u64,
    /// Of those, flows that terminate on this host.
    pub local_entries: u64,
    /// Of those, flows routed through this host; and routed flows whose replies come
    /// to this port.
    pub forwarded_entries: u64,
    /// NAT'd flows to this port, DNAT'd onto it, or whose replies come to it.
    pub nat_entries: u64,
    /// Whether any flow here is NAT'd or forwarded (a NOTRACK rule would break it).
    pub nat_or_forwarded: bool,
    /// Whether flows to this port terminate on this host (it is a local service).
    pub terminates_locally: bool,
}

/// How many TCP flows are in one state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TcpStateCount {
    /// conntrack's name (`ESTABLISHED`, `TIME_WAIT`, …), `UNKNOWN` without protoinfo.
    pub state: &'static str,
    pub entries: u64,
}

/// One of the busiest source addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SourceCount {
    pub address: IpAddr,
    /// Entries from this address; may exceed the truth by `overcount` (0 when exact).
    pub entries: u64,
    pub overcount: u64,
}

/// What fills the table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableBreakdown {
    /// Entries in the dump.
    pub total: u64,
    /// Every port with entries, busiest first.
    pub ports: Vec<PortUsage>,
    /// TCP states with entries, commonest first.
    pub tcp_states: Vec<TcpStateCount>,
    /// The busiest sources, busiest first.
    pub top_sources: Vec<SourceCount>,
    /// The kernel flagged every attempt's dump as interrupted (`NLM_F_DUMP_INTR`): the
    /// table changed while it was read, so entries may be missed or counted twice.
    pub dump_interrupted: bool,
}

// include/uapi/linux/netfilter/nf_conntrack_tcp.h: enum tcp_conntrack; the last slot
// counts TCP flows without a state attribute.
const TCP_STATE_NAMES: [&str; 11] = [
    "NONE",
    "SYN_SENT",
    "SYN_RECV",
    "ESTABLISHED",
    "FIN_WAIT",
    "CLOSE_WAIT",
    "LAST_ACK",
    "TIME_WAIT",
    "CLOSE",
    "SYN_SENT2",
    "UNKNOWN",
];

#[derive(Debug, Clone, Copy, Default)]
struct PortCounters {
    entries: u64,
    local: u64,
    forwarded: u64,
    nat: u64,
}

/// A fast multiply-rotate hasher (FxHash's scheme) for the aggregation's small keys:
/// SipHash cost more than all the rest of the per-entry work. Keys come from traffic, so
/// collisions could be forced, but the maps it serves are bounded (at most 65,536 ports
/// per protocol, and the top-sources slots), so that costs probes, never unbounded time.
#[derive(Debug, Clone, Copy, Default)]
struct KeyHasher(u64);

impl KeyHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, value: u8) {
        self.add(u64::from(value));
    }

    fn write_u16(&mut self, value: u16) {
        self.add(u64::from(value));
    }

    fn write_u32(&mut self, value: u32) {
        self.add(u64::from(value));
    }

    fn write_u64(&mut self, value: u64) {
        self.add(value);
    }

    fn write_usize(&mut self, value: usize) {
        self.add(value as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type KeyMap<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;

/// The busiest sources in bounded memory (the Space-Saving summary): exact while there
/// are no more distinct sources than slots; beyond that each count may be over by at most
/// the count it took its slot over from, which is kept as `overcount`.
#[derive(Debug, Clone)]
struct TopSources {
    slots: usize,
    counts: KeyMap<IpAddr, (u64, u64)>,
}

impl TopSources {
    fn new(slots: usize) -> Self {
        TopSources {
            slots: slots.max(1),
            counts: KeyMap::default(),
        }
    }

    fn add(&mut self, address: IpAddr) {
        if let Some((count, _)) = self.counts.get_mut(&address) {
            *count += 1;
        } else if self.counts.len() < self.slots {
            self.counts.insert(address, (1, 0));
        } else {
            // Take over the smallest slot: O(slots), only on a source not yet summarized.
            let (&smallest, &(count, _)) = self
                .counts
                .iter()
                .min_by_key(|(_, (count, _))| *count)
                .expect("slots is at least 1");
            self.counts.remove(&smallest);
            self.counts.insert(address, (count + 1, count));
        }
    }

    fn top(&self, n: usize) -> Vec<SourceCount> {
        let mut sources: Vec<SourceCount> = self
            .counts
            .iter()
            .map(|(&address, &(entries, overcount))| SourceCount {
                address,
                entries,
                overcount,
            })
            .collect();
        sources.sort_by(|a, b| b.entries.cmp(&a.entries).then(a.address.cmp(&b.address)));
        sources.truncate(n);
        sources
    }
}

/// Folds flows into a [`TableBreakdown`] one at a time.
#[derive(Debug, Clone)]
pub struct TableAggregator {
    local: LocalAddresses,
    total: u64,
    ports: KeyMap<(Protocol, u16), PortCounters>,
    tcp_states: [u64; TCP_STATE_NAMES.len()],
    sources: TopSources,
    top_sources: usize,
}

impl TableAggregator {
    /// An empty aggregate judging directions against `local`, keeping the `top_sources`
    /// busiest sources.
    pub fn new(local: LocalAddresses, top_sources: usize) -> Self {
        TableAggregator {
            local,
            total: 0,
            ports: KeyMap::default(),
            tcp_states: [0; TCP_STATE_NAMES.len()],
            // Spare slots make the summary exact for tables with a few dominant sources.
            sources: TopSources::new(top_sources.saturating_mul(8).max(64)),
            top_sources,
        }
    }

    pub fn add(&mut self, flow: &Flow) {
        let original = &flow.original;
        self.total += 1;
        self.sources.add(original.source);
        if original.protocol == Protocol::TCP {
            let unknown = TCP_STATE_NAMES.len() - 1;
            let slot = flow
                .tcp_state
                .map_or(unknown, |s| usize::from(s).min(unknown));
            self.tcp_states[slot] += 1;
        }
        let Some(port) = original.destination_port else {
            return;
        };
        let nat = flow.is_nat();
        let counters = self.ports.entry((original.protocol, port)).or_default();
        counters.entries += 1;
        let direction = self.local.direction(original);
        match direction {
            Direction::TerminatesLocally => counters.local += 1,
            Direction::Forwarded => counters.forwarded += 1,
            Direction::Outgoing => {}
        }
        if nat {
            counters.nat += 1;
        } else if direction != Direction::Forwarded {
            return;
        }
        // Replies are matched by the port they are addressed to (the client's, or the one
        // SNAT chose) when they come in through prerouting or go out via lo: mark it, so
        // NOTRACK there does not untrack them and break the translation or forwarding.
        let reply = flow.reply.unwrap_or_else(|| original.inverted());
        if let Some(answered) = reply.destination_port
            && answered != port
            && (!self.local.contains(&reply.source) || self.local.contains(&reply.destination))
        {
            let marked = self.ports.entry((original.protocol, answered)).or_default();
            if nat {
                marked.nat += 1;
            } else {
                marked.forwarded += 1;
            }
        }
        if !nat {
            return;
        }
        // A DNAT'd flow is answered from the port it was translated to: mark that port,
        // when it is a local one, so NOTRACK on it is not offered.
        if let Some(reply) = &flow.reply
            && let Some(translated) = reply.source_port
            && translated != port
            && self.local.contains(&reply.source)
        {
            self.ports
                .entry((original.protocol, translated))
                .or_default()
                .nat += 1;
        }
    }

    pub fn finish(self) -> TableBreakdown {
        let mut ports: Vec<PortUsage> = self
            .ports
            .iter()
            .filter(|(_, c)| c.entries > 0)
            .map(|(&(proto, port), c)| PortUsage {
                proto,
                port,
                entries: c.entries,
                local_entries: c.local,
                forwarded_entries: c.forwarded,
                nat_entries: c.nat,
                nat_or_forwarded: c.nat > 0 || c.forwarded > 0,
                terminates_locally: c.local > 0,
            })
            .collect();
        // Unstable: (proto, port) is unique, so the order is the same, without the stable
        // sort's scratch copy of every port (2.5 MiB at 64,000 ports) on top of the map.
        ports.sort_unstable_by(|a, b| {
            b.entries
                .cmp(&a.entries)
                .then(a.proto.cmp(&b.proto))
                .then(a.port.cmp(&b.port))
        });
        let mut tcp_states: Vec<TcpStateCount> = TCP_STATE_NAMES
            .iter()
            .zip(self.tcp_states)
            .filter(|(_, entries)| *entries > 0)
            .map(|(&state, entries)| TcpStateCount { state, entries })
            .collect();
        tcp_states.sort_by_key(|s| std::cmp::Reverse(s.entries));
        TableBreakdown {
            total: self.total,
            ports,
            tcp_states,
            top_sources: self.sources.top(self.top_sources),
            dump_interrupted: false,
        }
    }
}

/// The state of one dump reply, fed datagram by datagram: skips messages of other
/// sequence numbers, hands data messages on, and notes the end and `NLM_F_DUMP_INTR`.
#[derive(Debug, Clone)]
pub struct DumpReplies {
    sequence_number: u32,
    finished: bool,
    interrupted: bool,
}

impl DumpReplies {
    pub fn new(sequence_number: u32) -> Self {
        DumpReplies {
            sequence_number,
            finished: false,
            interrupted: false,
        }
    }

    /// Whether `NLMSG_DONE` has been seen.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Whether the kernel flagged any message of this dump as interrupted.
    pub fn interrupted(&self) -> bool {
        self.interrupted
    }

    /// Takes in one datagram, calling `data` on each data message of this dump.
    pub fn feed(
        &mut self,
        datagram: &[u8],
        mut data: impl FnMut(&RawMessage<'_>) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut messages = RawMessages::new(datagram);
        while !self.finished {
            let Some(message) = messages.next() else {
                break;
            };
            let message = message?;
            if message.sequence_number != self.sequence_number {
                continue;
            }
            self.interrupted |= message.dump_interrupted();
            match message.control()? {
                Control::Done => self.finished = true,
                Control::Ack => return Err("expected NLMSG_DONE, found an ACK".into()),
                Control::Refused(errno) => return Err(errno_message(errno)),
                Control::Noop => {}
                Control::Data => data(&message)?,
            }
        }
        Ok(())
    }
}

/// The bytes of a dump request: netlink header, then a 4-byte family header (nfgenmsg or
/// the start of ifaddrmsg) for AF_UNSPEC, padded with zeros to `body_len`.
fn dump_request(message_type: u16, body_len: usize, sequence_number: u32) -> Vec<u8> {
    let length = 16 + body_len;
    let mut bytes = Vec::with_capacity(length);
    bytes.extend((length as u32).to_ne_bytes());
    bytes.extend(message_type.to_ne_bytes());
    bytes.extend((NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    bytes.extend(sequence_number.to_ne_bytes());
    bytes.extend(0u32.to_ne_bytes()); // port id: the kernel fills it in
    bytes.resize(length, 0);
    bytes
}

/// `IPCTNL_MSG_CT_GET` as a dump of every family.
pub fn table_dump_request(sequence_number: u32) -> Vec<u8> {
    dump_request(
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
        NFGENMSG_LEN,
        sequence_number,
    )
}

/// `RTM_GETADDR` as a dump of every family and interface.
pub fn address_dump_request(sequence_number: u32) -> Vec<u8> {
    dump_request(RTM_GETADDR, IFADDRMSG_LEN, sequence_number)
}

/// Feeds one table dump datagram into `aggregator`.
pub fn aggregate_datagram(
    replies: &mut DumpReplies,
    aggregator: &mut TableAggregator,
    datagram: &[u8],
) -> Result<(), String> {
    flows_in_datagram(replies, datagram, |flow| aggregator.add(flow))
}

/// Feeds one table dump datagram, handing each flow in it to `each`.
pub fn flows_in_datagram(
    replies: &mut DumpReplies,
    datagram: &[u8],
    mut each: impl FnMut(&Flow),
) -> Result<(), String> {
    const DATA_TYPE: u16 = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW;
    replies.feed(datagram, |message| {
        if message.message_type != DATA_TYPE {
            return Err(format!(
                "expected message type {DATA_TYPE:#06x} (IPCTNL_MSG_CT_NEW), found {:#06x}",
                message.message_type
            ));
        }
        each(&parse_flow(message.payload)?);
        Ok(())
    })
}

/// Feeds one address dump datagram into `addresses`.
pub fn collect_addresses(
    replies: &mut DumpReplies,
    addresses: &mut Vec<IpAddr>,
    datagram: &[u8],
) -> Result<(), String> {
    replies.feed(datagram, |message| {
        if message.message_type != RTM_NEWADDR {
            return Err(format!(
                "expected message type {RTM_NEWADDR} (RTM_NEWADDR), found {}",
                message.message_type
            ));
        }
        addresses.extend(parse_address(message.payload)?);
        Ok(())
    })
}

/// Why one dump attempt failed.
enum DumpFailure {
    /// ENOBUFS: the receive queue overflowed and replies were lost; worth a retry.
    QueueOverflow,
    Failed(String),
}

/// Runs one dump on `socket`, feeding each datagram to `feed`, until `NLMSG_DONE`.
/// Returns whether the kernel flagged the dump as interrupted.
fn run_dump(
    socket: &mut NetlinkSocket,
    request: fn(u32) -> Vec<u8>,
    mut feed: impl FnMut(&mut DumpReplies, &[u8]) -> Result<(), String>,
) -> Result<bool, DumpFailure> {
    let sequence_number = socket.send(request).map_err(DumpFailure::Failed)?;
    let mut replies = DumpReplies::new(sequence_number);
    while !replies.finished() {
        let datagram = socket.receive().map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                DumpFailure::QueueOverflow
            } else {
                DumpFailure::Failed(receive_error_message(&e))
            }
        })?;
        feed(&mut replies, datagram).map_err(DumpFailure::Failed)?;
    }
    Ok(replies.interrupted())
}

/// Reads the table breakdown of the network namespace it was opened in. Open it inside a
/// namespace with [`crate::netns::run_in`], read it from anywhere.
#[derive(Debug)]
pub struct TableReader {
    conntrack: NetlinkSocket,
    route: NetlinkSocket,
}

impl TableReader {
    /// Opens a ctnetlink socket (only if that loads no kernel module) and a route socket in
    /// the calling thread's network namespace.
    pub fn open() -> Result<Self, ObserveError> {
        let conntrack = NetlinkSocket::open_ctnetlink()?;
        conntrack
            .set_receive_queue(RECEIVE_QUEUE_BYTES)
            .map_err(table_error)?;
        let route = NetlinkSocket::open(netlink_sys::protocols::NETLINK_ROUTE).map_err(|m| {
            ObserveError::Netlink {
                channel: ADDRESS_CHANNEL.into(),
                message: m,
            }
        })?;
        Ok(TableReader { conntrack, route })
    }

    /// The namespace's local addresses.
    pub fn local_addresses(&mut self) -> Result<LocalAddresses, ObserveError> {
        let failed = |message: String| ObserveError::Netlink {
            channel: ADDRESS_CHANNEL.into(),
            message,
        };
        for _ in 0..DUMP_ATTEMPTS {
            let mut addresses = Vec::new();
            let outcome = run_dump(
                &mut self.route,
                address_dump_request,
                |replies, datagram| collect_addresses(replies, &mut addresses, datagram),
            );
            match outcome {
                Ok(false) => return Ok(LocalAddresses::new(addresses)),
                // Addresses changed under the dump: read them again.
                Ok(true) | Err(DumpFailure::QueueOverflow) => {}
                Err(DumpFailure::Failed(message)) => return Err(failed(message)),
            }
        }
        Err(failed(format!(
            "the address dump was interrupted or overflowed {DUMP_ATTEMPTS} times in a row"
        )))
    }

    /// Dumps the table and aggregates it as it streams, keeping the `top_sources`
    /// busiest sources. A dump the kernel flags as interrupted is restarted; if every
    /// attempt is, the last one is returned with `dump_interrupted` set.
    pub fn read(&mut self, top_sources: usize) -> Result<TableBreakdown, ObserveError> {
        let local = self.local_addresses()?;
        let (aggregator, interrupted) = stream_table(
            &mut self.conntrack,
            || TableAggregator::new(local.clone(), top_sources),
            TableAggregator::add,
        )?;
        Ok(TableBreakdown {
            dump_interrupted: interrupted,
            ..aggregator.finish()
        })
    }
}

/// Streams the table of `socket`'s namespace through a sink made by `start`, one `add` per
/// flow. The dump is received on a reader thread (`pipeline`); `start` and `add` run on the
/// calling thread. A dump the kernel flags as interrupted, or that overflowed the receive
/// queue, is restarted with a fresh sink; if every attempt is interrupted, the last sink is
/// returned with `true`.
pub fn stream_table<S>(
    socket: &mut NetlinkSocket,
    mut start: impl FnMut() -> S,
    mut add: impl FnMut(&mut S, &Flow),
) -> Result<(S, bool), ObserveError> {
    let mut last_interrupted = None;
    for _ in 0..DUMP_ATTEMPTS {
        let mut sink = start();
        let outcome = pipeline::run(socket, table_dump_request, |replies, d| {
            flows_in_datagram(replies, d, |flow| add(&mut sink, flow))
        });
        match outcome {
            Ok(false) => return Ok((sink, false)),
            Ok(true) => last_interrupted = Some(sink),
            Err(DumpFailure::QueueOverflow) => {}
            Err(DumpFailure::Failed(message)) => return Err(table_error(message)),
        }
    }
    match last_interrupted {
        Some(sink) => Ok((sink, true)),
        None => Err(table_error(format!(
            "the receive queue overflowed (ENOBUFS) on {DUMP_ATTEMPTS} attempts in a row"
        ))),
    }
}

fn table_error(message: String) -> ObserveError {
    ObserveError::Netlink {
        channel: TABLE_CHANNEL.into(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CT_DUMP_REQUEST: &[u8] =
        include_bytes!("../../../tests/fixtures/table/ct_dump.request.bin");
    const CT_DUMP_REPLY: &[u8] = include_bytes!("../../../tests/fixtures/table/ct_dump.reply.bin");
    const GETADDR_REQUEST: &[u8] =
        include_bytes!("../../../tests/fixtures/table/getaddr.request.bin");
    const GETADDR_REPLY: &[u8] = include_bytes!("../../../tests/fixtures/table/getaddr.reply.bin");
    const CONNTRACK_L: &str = include_str!("../../../tests/fixtures/table/conntrack-L.txt");

    /// The first message of the captured table dump, field by field: the DNAT'd flow.
    #[rustfmt::skip]
    const DNAT_MESSAGE: [u8; 164] = [
        // nlmsghdr
        0xa4, 0x00, 0x00, 0x00, // length 164
        0x00, 0x01,             // type: NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW
        0x02, 0x00,             // flags: NLM_F_MULTI
        0x01, 0x00, 0x00, 0x00, // sequence number 1
        0xe5, 0x1d, 0x00, 0x00, // port id of the capturing socket
        // nfgenmsg
        0x02, 0x00, 0x00, 0x00, // family AF_INET, NFNETLINK_V0, res_id 0
        0x34, 0x00, 0x01, 0x80, // CTA_TUPLE_ORIG (nested), 52 bytes
        0x14, 0x00, 0x01, 0x80, //   CTA_TUPLE_IP (nested), 20 bytes
        0x08, 0x00, 0x01, 0x00, 0x7f, 0x00, 0x00, 0x01, // CTA_IP_V4_SRC 127.0.0.1
        0x08, 0x00, 0x02, 0x00, 0x7f, 0x00, 0x00, 0x01, // CTA_IP_V4_DST 127.0.0.1
        0x1c, 0x00, 0x02, 0x80, //   CTA_TUPLE_PROTO (nested), 28 bytes
        0x05, 0x00, 0x01, 0x00, 0x11, 0x00, 0x00, 0x00, // CTA_PROTO_NUM 17 (udp), padded
        0x06, 0x00, 0x02, 0x00, 0x9c, 0x44, 0x00, 0x00, // CTA_PROTO_SRC_PORT 40004, padded
        0x06, 0x00, 0x03, 0x00, 0x27, 0x0f, 0x00, 0x00, // CTA_PROTO_DST_PORT 9999, padded
        0x34, 0x00, 0x02, 0x80, // CTA_TUPLE_REPLY (nested), 52 bytes
        0x14, 0x00, 0x01, 0x80, //   CTA_TUPLE_IP
        0x08, 0x00, 0x01, 0x00, 0x7f, 0x00, 0x00, 0x01, // CTA_IP_V4_SRC 127.0.0.1
        0x08, 0x00, 0x02, 0x00, 0x7f, 0x00, 0x00, 0x01, // CTA_IP_V4_DST 127.0.0.1
        0x1c, 0x00, 0x02, 0x80, //   CTA_TUPLE_PROTO
        0x05, 0x00, 0x01, 0x00, 0x11, 0x00, 0x00, 0x00, // CTA_PROTO_NUM 17
        0x06, 0x00, 0x02, 0x00, 0x1e, 0x61, 0x00, 0x00, // CTA_PROTO_SRC_PORT 7777: DNAT'd
        0x06, 0x00, 0x03, 0x00, 0x9c, 0x44, 0x00, 0x00, // CTA_PROTO_DST_PORT 40004
        0x08, 0x00, 0x03, 0x00, 0x00, 0x00, 0x01, 0xa8, // CTA_STATUS: CONFIRMED, DST_NAT, *_NAT_DONE
        0x08, 0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, // CTA_MARK 0
        0x08, 0x00, 0x0c, 0x00, 0xfc, 0x47, 0x70, 0xfc, // CTA_ID
        0x08, 0x00, 0x0b, 0x00, 0x00, 0x00, 0x00, 0x01, // CTA_USE 1
        0x08, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0x1d, // CTA_TIMEOUT 29 s
    ];

    /// The first message of the captured address dump: 127.0.0.1/8 on lo.
    #[rustfmt::skip]
    const LOOPBACK_ADDRESS: [u8; 76] = [
        0x4c, 0x00, 0x00, 0x00, // length 76
        0x14, 0x00,             // type RTM_NEWADDR
        0x02, 0x00,             // flags: NLM_F_MULTI
        0x01, 0x00, 0x00, 0x00, // sequence number 1
        0xe5, 0x1d, 0x00, 0x00, // port id
        // ifaddrmsg: AF_INET, prefix 8, IFA_F_PERMANENT, scope host, ifindex 1
        0x02, 0x08, 0x80, 0xfe, 0x01, 0x00, 0x00, 0x00,
        0x08, 0x00, 0x01, 0x00, 0x7f, 0x00, 0x00, 0x01, // IFA_ADDRESS 127.0.0.1
        0x08, 0x00, 0x02, 0x00, 0x7f, 0x00, 0x00, 0x01, // IFA_LOCAL 127.0.0.1
        0x07, 0x00, 0x03, 0x00, 0x6c, 0x6f, 0x00, 0x00, // IFA_LABEL "lo"
        0x08, 0x00, 0x08, 0x00, 0x80, 0x00, 0x00, 0x00, // IFA_FLAGS
        0x14, 0x00, 0x06, 0x00, 0xff, 0xff, 0xff, 0xff, // IFA_CACHEINFO (16 bytes)
        0xff, 0xff, 0xff, 0xff, 0xbd, 0xce, 0x01, 0x00,
        0xbd, 0xce, 0x01, 0x00,
    ];

    fn captured_addresses() -> LocalAddresses {
        let mut replies = DumpReplies::new(1);
        let mut addresses = Vec::new();
        collect_addresses(&mut replies, &mut addresses, GETADDR_REPLY).unwrap();
        assert!(replies.finished());
        LocalAddresses::new(addresses)
    }

    fn aggregate(local: LocalAddresses, bytes: &[u8]) -> Result<TableBreakdown, String> {
        let mut replies = DumpReplies::new(1);
        let mut aggregator = TableAggregator::new(local, 10);
        aggregate_datagram(&mut replies, &mut aggregator, bytes)?;
        if !replies.finished() {
            return Err("no NLMSG_DONE".into());
        }
        Ok(aggregator.finish())
    }

    fn usage(table: &TableBreakdown, proto: Protocol, port: u16) -> &PortUsage {
        table
            .ports
            .iter()
            .find(|p| p.proto == proto && p.port == port)
            .unwrap_or_else(|| panic!("{port}/{proto} in {table:?}"))
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    #[test]
    fn requests_match_the_captured_bytes() {
        assert_eq!(table_dump_request(1), CT_DUMP_REQUEST);
        assert_eq!(address_dump_request(1), GETADDR_REQUEST);
    }

    #[test]
    fn captures_are_annotated_field_by_field() {
        assert_eq!(&CT_DUMP_REPLY[..164], DNAT_MESSAGE);
        assert_eq!(&GETADDR_REPLY[..76], LOOPBACK_ADDRESS);
    }

    #[test]
    fn parses_the_dnat_flow() {
        let flow = parse_flow(&DNAT_MESSAGE[16..]).unwrap();
        let localhost = v4(127, 0, 0, 1);
        let original = Tuple {
            source: localhost,
            destination: localhost,
            protocol: Protocol::UDP,
            source_port: Some(40004),
            destination_port: Some(9999),
        };
        assert_eq!(flow.original, original);
        let reply = flow.reply.unwrap();
        assert_eq!(reply.source_port, Some(7777));
        assert_eq!(reply.destination_port, Some(40004));
        assert_eq!(flow.status, 0x1a8);
        assert_eq!(flow.tcp_state, None);
        assert_eq!(flow.id, Some(0xfc47_70fc));
        assert_eq!(flow.timeout, Some(29));
        assert_eq!(flow.zone, None);
        assert!(flow.is_nat());
    }

    #[test]
    fn parses_the_captured_addresses() {
        let local = captured_addresses();
        let expected = LocalAddresses::new([
            v4(127, 0, 0, 1),
            v4(192, 0, 2, 1),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ]);
        assert_eq!(local, expected);
        assert!(local.contains(&v4(127, 1, 2, 3)), "all of 127/8 is local");
        assert!(!local.contains(&v4(192, 0, 2, 2)));
    }

    #[test]
    fn breaks_down_the_captured_dump() {
        let table = aggregate(captured_addresses(), CT_DUMP_REPLY).unwrap();
        assert_eq!(table.total, 5);
        assert!(!table.dump_interrupted);
        let mdns = usage(&table, Protocol::UDP, 5353);
        assert_eq!(
            (mdns.entries, mdns.local_entries, mdns.nat_entries),
            (3, 3, 0)
        );
        assert!(mdns.terminates_locally && !mdns.nat_or_forwarded);
        let dnat = usage(&table, Protocol::UDP, 9999);
        assert_eq!((dnat.entries, dnat.nat_entries), (1, 1));
        assert!(dnat.nat_or_forwarded);
        let web = usage(&table, Protocol::TCP, 8080);
        assert_eq!((web.entries, web.local_entries), (1, 1));
        // The DNAT target holds no entry of its own, so it is not listed.
        assert_eq!(table.ports.len(), 3);
        assert_eq!(table.ports[0].port, 5353);
        assert_eq!(
            table.tcp_states,
            [TcpStateCount {
                state: "ESTABLISHED",
                entries: 1
            }]
        );
        let sources: Vec<(IpAddr, u64)> = table
            .top_sources
            .iter()
            .map(|s| (s.address, s.entries))
            .collect();
        assert_eq!(
            sources,
            [
                (v4(127, 0, 0, 1), 3),
                (v4(192, 0, 2, 1), 1),
                (IpAddr::V6(Ipv6Addr::LOCALHOST), 1)
            ]
        );
    }

    #[test]
    fn captured_dump_agrees_with_conntrack_tool() {
        let table = aggregate(captured_addresses(), CT_DUMP_REPLY).unwrap();
        let mut tool: HashMap<(String, u16), u64> = HashMap::new();
        for line in CONNTRACK_L.lines() {
            let proto = line.split_whitespace().next().unwrap().to_string();
            let dport = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("dport="))
                .unwrap()
                .parse()
                .unwrap();
            *tool.entry((proto, dport)).or_default() += 1;
        }
        let ours: HashMap<(String, u16), u64> = table
            .ports
            .iter()
            .map(|p| ((p.proto.to_string(), p.port), p.entries))
            .collect();
        assert_eq!(ours, tool);
        assert_eq!(table.total, CONNTRACK_L.lines().count() as u64);
    }

    #[test]
    fn dnat_marks_the_translated_local_port() {
        let mut flow = parse_flow(&DNAT_MESSAGE[16..]).unwrap();
        let mut aggregator = TableAggregator::new(LocalAddresses::default(), 3);
        aggregator.add(&flow);
        // A direct flow to the DNAT target: that port shows the NAT'd flow too.
        flow.original.destination_port = Some(7777);
        flow.reply = Some(flow.original.inverted());
        flow.status = 0;
        aggregator.add(&flow);
        let table = aggregator.finish();
        let target = usage(&table, Protocol::UDP, 7777);
        assert_eq!((target.entries, target.nat_entries), (1, 1));
    }

    #[test]
    fn replies_mark_the_port_they_arrive_on() {
        let here = v4(192, 0, 2, 1);
        let local = LocalAddresses::new([here]);
        let udp = |source, source_port, destination, destination_port| Tuple {
            source,
            destination,
            protocol: Protocol::UDP,
            source_port: Some(source_port),
            destination_port: Some(destination_port),
        };
        let flow = |original: Tuple, reply: Tuple, status| Flow {
            original,
            reply: Some(reply),
            status,
            tcp_state: None,
            id: None,
            timeout: None,
            zone: None,
        };
        let (lan, server) = (v4(10, 0, 0, 5), v4(198, 51, 100, 7));
        let mut aggregator = TableAggregator::new(local, 3);
        // The local service on 51820.
        aggregator.add(&flow(
            udp(server, 40000, here, 51820),
            udp(here, 51820, server, 40000),
            0,
        ));
        // A LAN client masqueraded with its source port kept: replies arrive on 51820.
        aggregator.add(&flow(
            udp(lan, 51820, server, 53),
            udp(server, 53, here, 51820),
            IPS_SRC_NAT,
        ));
        // A routed LAN client's replies arrive on 4500.
        aggregator.add(&flow(
            udp(server, 4500, here, 4500),
            udp(here, 4500, server, 4500),
            0,
        ));
        let routed = udp(lan, 4500, server, 443);
        aggregator.add(&flow(routed, routed.inverted(), 0));
        let table = aggregator.finish();
        let wireguard = usage(&table, Protocol::UDP, 51820);
        assert_eq!((wireguard.entries, wireguard.nat_entries), (1, 1));
        assert!(wireguard.nat_or_forwarded);
        let ipsec = usage(&table, Protocol::UDP, 4500);
        assert_eq!((ipsec.entries, ipsec.forwarded_entries), (1, 1));
        assert!(ipsec.nat_or_forwarded);
    }

    #[test]
    fn directions() {
        let local = LocalAddresses::new([v4(192, 0, 2, 1)]);
        let tuple = |source, destination| Tuple {
            source,
            destination,
            protocol: Protocol::TCP,
            source_port: Some(1),
            destination_port: Some(2),
        };
        let (here, there, elsewhere) = (v4(192, 0, 2, 1), v4(198, 51, 100, 7), v4(203, 0, 113, 9));
        assert_eq!(
            local.direction(&tuple(there, here)),
            Direction::TerminatesLocally
        );
        assert_eq!(local.direction(&tuple(here, there)), Direction::Outgoing);
        assert_eq!(
            local.direction(&tuple(there, elsewhere)),
            Direction::Forwarded
        );
        assert_eq!(
            local.direction(&tuple(there, v4(224, 0, 0, 251))),
            Direction::TerminatesLocally
        );

        let mut aggregator = TableAggregator::new(local, 3);
        for (source, destination) in [(there, here), (here, there), (there, elsewhere)] {
            let original = tuple(source, destination);
            aggregator.add(&Flow {
                original,
                reply: Some(original.inverted()),
                status: 0,
                tcp_state: Some(7),
                id: None,
                timeout: None,
                zone: None,
            });
        }
        let table = aggregator.finish();
        let port = usage(&table, Protocol::TCP, 2);
        assert_eq!(
            (port.entries, port.local_entries, port.forwarded_entries),
            (3, 1, 1)
        );
        assert!(port.nat_or_forwarded && port.terminates_locally);
        assert_eq!(table.tcp_states[0].state, "TIME_WAIT");
    }

    #[test]
    fn top_sources_stay_bounded_and_say_how_far_off_they_may_be() {
        // A source with more than total/slots entries is always kept (Space-Saving).
        let mut sources = TopSources::new(4);
        for i in 0..1000u32 {
            if i % 5 < 3 {
                sources.add(v4(10, 0, 0, 1));
            } else {
                sources.add(IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i)));
            }
        }
        assert_eq!(sources.counts.len(), 4);
        let top = sources.top(4);
        assert_eq!(top[0].address, v4(10, 0, 0, 1));
        assert_eq!((top[0].entries, top[0].overcount), (600, 0));
        for other in &top[1..] {
            assert!(
                other.overcount > 0 && other.entries - other.overcount <= 1,
                "{other:?}"
            );
        }
    }

    #[test]
    fn interrupted_dump_is_noticed() {
        let mut bytes = CT_DUMP_REPLY.to_vec();
        bytes[6] |= NLM_F_DUMP_INTR_LOW_BYTE;
        let mut replies = DumpReplies::new(1);
        let mut aggregator = TableAggregator::new(LocalAddresses::default(), 1);
        aggregate_datagram(&mut replies, &mut aggregator, &bytes).unwrap();
        assert!(replies.finished() && replies.interrupted());
    }
    const NLM_F_DUMP_INTR_LOW_BYTE: u8 = super::super::ctnetlink::NLM_F_DUMP_INTR as u8;

    #[test]
    fn kernel_errors_and_damage_are_named() {
        // NLMSG_ERROR -EPERM instead of the dump.
        let mut error = vec![0x24, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        error.extend((-libc::EPERM).to_ne_bytes());
        error.extend(&CT_DUMP_REQUEST[..16]);
        let message = aggregate(LocalAddresses::default(), &error).unwrap_err();
        assert!(message.contains("CAP_NET_ADMIN"), "{message}");

        let mut no_original = DNAT_MESSAGE;
        no_original[22] = 0x09; // CTA_TUPLE_ORIG becomes an unknown attribute
        let message = parse_flow(&no_original[16..]).unwrap_err();
        assert_eq!(message, "expected a CTA_TUPLE_ORIG attribute");

        let mut short_port = DNAT_MESSAGE;
        short_port[56] = 0x05; // CTA_PROTO_SRC_PORT of 1 byte
        let message = parse_flow(&short_port[16..]).unwrap_err();
        assert!(
            message.contains("CTA_PROTO_SRC_PORT to hold 2 bytes"),
            "{message}"
        );

        let mut overlong = DNAT_MESSAGE;
        overlong[20] = 0xff; // CTA_TUPLE_ORIG claims more than the message holds
        let message = parse_flow(&overlong[16..]).unwrap_err();
        assert!(message.contains("found a length of 255"), "{message}");

        let mut wrong_type = CT_DUMP_REPLY.to_vec();
        wrong_type[4] = 0x02; // IPCTNL_MSG_CT_DELETE
        let message = aggregate(LocalAddresses::default(), &wrong_type).unwrap_err();
        assert!(message.contains("IPCTNL_MSG_CT_NEW"), "{message}");

        let cut = &CT_DUMP_REPLY[..100];
        let message = aggregate(LocalAddresses::default(), cut).unwrap_err();
        assert!(message.contains("netlink message header"), "{message}");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_flow(&bytes);
            let _ = parse_address(&bytes);
            let _ = aggregate(LocalAddresses::default(), &bytes);
            let mut replies = DumpReplies::new(1);
            let _ = collect_addresses(&mut replies, &mut Vec::new(), &bytes);
        }

        // Random bytes rarely get past the first header; damaging the captures reaches the
        // nested attribute parsers too.
        #[test]
        fn damaged_captures_never_panic(
            position in 0usize..936,
            value in any::<u8>(),
            cut in 0usize..936,
        ) {
            for capture in [CT_DUMP_REPLY, GETADDR_REPLY] {
                let mut bytes = capture.to_vec();
                if let Some(byte) = bytes.get_mut(position) {
                    *byte = value;
                }
                bytes.truncate(cut.max(position + 1));
                let _ = aggregate(captured_addresses(), &bytes);
                let mut replies = DumpReplies::new(1);
                let _ = collect_addresses(&mut replies, &mut Vec::new(), &bytes);
            }
        }
    }
}
