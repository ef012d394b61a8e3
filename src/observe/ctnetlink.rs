/*!
ctnetlink statistics: the kernel's conntrack counters over netlink, the second source
beside `/proc/net/stat/nf_conntrack`.

Two requests to the `NFNL_SUBSYS_CTNETLINK` subsystem of a `NETLINK_NETFILTER` socket:

- `IPCTNL_MSG_CT_GET_STATS_CPU`, a dump (`NLM_F_REQUEST|NLM_F_DUMP`): one message per
  possible CPU (nfgenmsg `res_id` = CPU number) carrying big-endian u32 `CTA_STATS_*`
  counters, then `NLMSG_DONE`.
- `IPCTNL_MSG_CT_GET_STATS`, a plain request: one message with `CTA_STATS_GLOBAL_ENTRIES`
  (the namespace's entry count) and `CTA_STATS_GLOBAL_MAX_ENTRIES` (`nf_conntrack_max`).
  It is sent with `NLM_F_ACK`, not as a dump: the kernel answers it with a single message
  and no `NLMSG_DONE`, so the ACK is the only thing that tells us the reply is complete.

Parsing is pure and total: [`Replies`] takes the reply datagrams of one request (several
netlink messages per datagram, `NLMSG_ERROR`, `NLMSG_DONE`) and keeps the stats bodies;
[`parse_stats_cpu`] and [`parse_stats`] turn those into typed values. The netlink and
nfgenmsg headers and the attribute walk come from `netlink-packet-core` and
`netlink-packet-netfilter`; that crate does not model the stats messages, so they arrive
as `ConntrackMessage::Other` with raw attributes, which this module interprets. Unknown
attributes are ignored (the kernel adds counters over time); malformed input is an
[`ObserveError::Netlink`] naming the channel and what was expected.

Two pieces are shared with the other netlink readers ([`super::table`]): [`RawMessages`]
frames a datagram into [`RawMessage`]s and [`RawMessage::control`] tells how each one ends
(or fails) its reply; [`NetlinkSocket`] is the transport, a small synchronous socket on
`netlink-sys` with a receive timeout and one reused receive buffer.

[`CtnetlinkStats`] reads the stats over that transport rather than an async `netlink-proto`
connection: the query runs once per poll and answers in microseconds, a blocking socket needs no runtime or background task,
and it can be opened on the short-lived thread that [`crate::netns::run_in`] runs inside a
namespace and then be moved to and used from any other thread (async callers wrap
[`CtnetlinkStats::read`] in `spawn_blocking`).

Reading never makes the kernel load a module: on a kernel with loadable modules, opening
the socket or addressing the ctnetlink subsystem would autoload `nfnetlink` /
`nf_conntrack_netlink`, so [`NetlinkSocket::open_ctnetlink`] first checks that
`nf_conntrack_netlink` is already loaded or built in, and refuses otherwise.
*/

use super::{ConntrackStats, ObserveError};
use netlink_packet_core::{
    DefaultNla, NLA_TYPE_MASK, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, Nla,
};
use netlink_packet_netfilter::conntrack::ConntrackMessage;
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use std::io;
use std::path::Path;
use std::time::Duration;

// include/uapi/linux/netfilter/nfnetlink_conntrack.h: enum cntl_msg_types.
const IPCTNL_MSG_CT_GET_STATS_CPU: u8 = 4;
const IPCTNL_MSG_CT_GET_STATS: u8 = 5;
// include/uapi/linux/netfilter/nfnetlink.h
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const NFNETLINK_V0: u8 = 0;

// enum ctattr_stats_cpu. SEARCHED, NEW, DELETE and DELETE_LIST (1, 3, 6, 7) are "no longer
// used": ctguard has no counter for them and treats them as unknown.
const CTA_STATS_FOUND: u16 = 2;
const CTA_STATS_INVALID: u16 = 4;
const CTA_STATS_IGNORE: u16 = 5;
const CTA_STATS_INSERT: u16 = 8;
const CTA_STATS_INSERT_FAILED: u16 = 9;
const CTA_STATS_DROP: u16 = 10;
const CTA_STATS_EARLY_DROP: u16 = 11;
const CTA_STATS_ERROR: u16 = 12;
const CTA_STATS_SEARCH_RESTART: u16 = 13;
const CTA_STATS_CLASH_RESOLVE: u16 = 14;
const CTA_STATS_CHAIN_TOOLONG: u16 = 15;

// enum ctattr_stats_global.
const CTA_STATS_GLOBAL_ENTRIES: u16 = 1;
const CTA_STATS_GLOBAL_MAX_ENTRIES: u16 = 2;

/// How long one reply datagram may take before the read gives up (the kernel answers
/// these requests synchronously; this only bounds a wedged socket).
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// The counters of one CPU, as `IPCTNL_MSG_CT_GET_STATS_CPU` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuStats {
    /// The CPU number (nfgenmsg `res_id`).
    pub cpu: u16,
    pub counters: ConntrackStats,
    /// Inserts refused because a hash chain grew too long (`CTA_STATS_CHAIN_TOOLONG`,
    /// kernels ≥ 5.15); a sign of too few buckets. Not in [`ConntrackStats`].
    pub chain_toolong: u64,
}

/// The table's size, as `IPCTNL_MSG_CT_GET_STATS` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GlobalStats {
    /// Entries in this namespace's table.
    pub entries: u64,
    /// `nf_conntrack_max`.
    pub max_entries: u64,
}

/// One ctnetlink reading: every CPU's counters, their sum, and the table size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtnetlinkReading {
    pub per_cpu: Vec<CpuStats>,
    /// `per_cpu` summed.
    pub total: ConntrackStats,
    /// `chain_toolong` summed over CPUs.
    pub chain_toolong: u64,
    pub global: GlobalStats,
}

impl CtnetlinkReading {
    pub fn new(per_cpu: Vec<CpuStats>, global: GlobalStats) -> Self {
        let mut total = ConntrackStats::default();
        let mut chain_toolong = 0u64;
        for cpu in &per_cpu {
            add_counters(&mut total, &cpu.counters);
            chain_toolong = chain_toolong.saturating_add(cpu.chain_toolong);
        }
        CtnetlinkReading {
            per_cpu,
            total,
            chain_toolong,
            global,
        }
    }
}

fn add_counters(total: &mut ConntrackStats, cpu: &ConntrackStats) {
    let sum = |a: &mut u64, b: u64| *a = a.saturating_add(b);
    sum(&mut total.found, cpu.found);
    sum(&mut total.invalid, cpu.invalid);
    sum(&mut total.ignore, cpu.ignore);
    sum(&mut total.insert, cpu.insert);
    sum(&mut total.insert_failed, cpu.insert_failed);
    sum(&mut total.drop, cpu.drop);
    sum(&mut total.early_drop, cpu.early_drop);
    sum(&mut total.icmp_error, cpu.icmp_error);
    sum(&mut total.search_restart, cpu.search_restart);
    sum(&mut total.clash_resolve, cpu.clash_resolve);
}

/// The two stats requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    /// `IPCTNL_MSG_CT_GET_STATS_CPU`, a dump ended by `NLMSG_DONE`.
    StatsCpu,
    /// `IPCTNL_MSG_CT_GET_STATS`, one message ended by the requested ACK.
    Stats,
}

impl Query {
    /// The name errors use for this request's channel.
    pub fn channel(self) -> &'static str {
        match self {
            Query::StatsCpu => "ctnetlink stats_cpu",
            Query::Stats => "ctnetlink stats",
        }
    }

    fn message_type(self) -> u8 {
        match self {
            Query::StatsCpu => IPCTNL_MSG_CT_GET_STATS_CPU,
            Query::Stats => IPCTNL_MSG_CT_GET_STATS,
        }
    }

    /// The netlink message type of the request and of its replies.
    fn netlink_type(self) -> u16 {
        (NFNL_SUBSYS_CTNETLINK << 8) | u16::from(self.message_type())
    }

    fn flags(self) -> u16 {
        match self {
            Query::StatsCpu => NLM_F_REQUEST | NLM_F_DUMP,
            Query::Stats => NLM_F_REQUEST | NLM_F_ACK,
        }
    }

    /// The request's bytes, ready to send.
    pub fn request(self, sequence_number: u32) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.flags = self.flags();
        header.sequence_number = sequence_number;
        let mut message = NetlinkMessage::new(
            header,
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::Unspec, NFNETLINK_V0, 0),
                ConntrackMessage::Other {
                    message_type: self.message_type(),
                    attributes: Vec::new(),
                },
            )),
        );
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        bytes
    }
}

/// The body of one stats reply message: nfgenmsg `res_id` and the raw attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsBody {
    pub res_id: u16,
    pub attributes: Vec<DefaultNla>,
}

/// Collects the replies to one request, fed datagram by datagram as the socket delivers
/// them, until the end the request asked for (`NLMSG_DONE` or the ACK).
#[derive(Debug)]
pub struct Replies {
    query: Query,
    sequence_number: u32,
    bodies: Vec<StatsBody>,
    finished: bool,
}

impl Replies {
    pub fn new(query: Query, sequence_number: u32) -> Self {
        Replies {
            query,
            sequence_number,
            bodies: Vec::new(),
            finished: false,
        }
    }

    /// Whether the end of the reply has been seen.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// The stats bodies collected so far.
    pub fn bodies(&self) -> &[StatsBody] {
        &self.bodies
    }

    /// Takes in one datagram: any number of netlink messages, each padded to 4 bytes.
    /// Messages for another sequence number (left over from an abandoned read) are skipped;
    /// so is anything after the end.
    pub fn feed(&mut self, datagram: &[u8]) -> Result<(), ObserveError> {
        let mut messages = RawMessages::new(datagram);
        while !self.finished {
            let Some(message) = messages.next() else {
                break;
            };
            let message = message.map_err(|e| self.error(e))?;
            if message.sequence_number != self.sequence_number {
                continue;
            }
            match message.control().map_err(|e| self.error(e))? {
                Control::Ack if self.query == Query::Stats => self.finished = true,
                Control::Ack => {
                    return Err(self.error("expected NLMSG_DONE, found an ACK".into()));
                }
                Control::Done if self.query == Query::StatsCpu => self.finished = true,
                Control::Done => {
                    return Err(self.error("expected an ACK, found NLMSG_DONE".into()));
                }
                Control::Refused(errno) => return Err(self.error(errno_message(errno))),
                Control::Noop => {}
                Control::Data => self.take(message)?,
            }
        }
        Ok(())
    }

    /// Keeps the body of one stats message.
    fn take(&mut self, raw: RawMessage<'_>) -> Result<(), ObserveError> {
        let message = NetlinkMessage::<NetfilterMessage>::deserialize(raw.bytes)
            .map_err(|e| self.error(format!("expected a ctnetlink stats message: {e}")))?;
        match message.payload {
            NetlinkPayload::InnerMessage(NetfilterMessage {
                header,
                inner:
                    NetfilterMessageInner::Conntrack(ConntrackMessage::Other {
                        message_type,
                        attributes,
                    }),
                ..
            }) if message_type == self.query.message_type() => {
                self.bodies.push(StatsBody {
                    res_id: header.res_id,
                    attributes,
                });
            }
            _ => {
                return Err(self.error(format!(
                    "expected message type {:#06x}, found {:#06x}",
                    self.query.netlink_type(),
                    raw.message_type
                )));
            }
        }
        Ok(())
    }

    fn error(&self, message: String) -> ObserveError {
        netlink_error(self.query, message)
    }
}

// include/uapi/linux/netlink.h: control message types and the dump-interrupted flag.
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;
/// Set on a dump message when the kernel's data changed while the dump ran, so the dump
/// may have skipped or repeated entries.
pub const NLM_F_DUMP_INTR: u16 = 0x10;
const NLMSG_HEADER_LEN: usize = 16;

/// One netlink message framed out of a datagram, header fields decoded, nothing else.
/// Shared by every netlink reader here: the stats replies, the table dump and the
/// address dump all frame and end their replies the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawMessage<'a> {
    pub message_type: u16,
    pub flags: u16,
    pub sequence_number: u32,
    /// What follows the 16-byte header, up to the message's declared length.
    pub payload: &'a [u8],
    /// The whole message, header included.
    pub bytes: &'a [u8],
}

/// What a message means for the reply it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// A message of the request's own family, to be parsed by the caller.
    Data,
    /// `NLMSG_DONE` with status 0: the dump is complete.
    Done,
    /// `NLMSG_ERROR` with code 0: the requested ACK.
    Ack,
    /// `NLMSG_ERROR` or `NLMSG_DONE` carrying this (positive) errno.
    Refused(i32),
    /// `NLMSG_NOOP`: nothing.
    Noop,
}

impl RawMessage<'_> {
    /// Classifies the message; a control message too short to hold its status, and
    /// `NLMSG_OVERRUN`, are errors.
    pub fn control(&self) -> Result<Control, String> {
        let status = || -> Result<i32, String> {
            let bytes = self.payload.first_chunk::<4>().ok_or_else(|| {
                format!(
                    "expected a 4-byte status in message type {}, found {} bytes",
                    self.message_type,
                    self.payload.len()
                )
            })?;
            Ok(i32::from_ne_bytes(*bytes))
        };
        // The kernel sends negative errnos; a positive one would be a kernel bug, kept as is.
        let refused =
            |code: i32| Control::Refused(code.checked_neg().filter(|e| *e > 0).unwrap_or(code));
        Ok(match self.message_type {
            NLMSG_NOOP => Control::Noop,
            NLMSG_ERROR => match status()? {
                0 => Control::Ack,
                code => refused(code),
            },
            NLMSG_DONE => match status()? {
                0 => Control::Done,
                code => refused(code),
            },
            NLMSG_OVERRUN => return Err("the kernel reported NLMSG_OVERRUN".into()),
            _ => Control::Data,
        })
    }

    /// Whether the kernel flagged this dump message as possibly inconsistent.
    pub fn dump_interrupted(&self) -> bool {
        self.flags & NLM_F_DUMP_INTR != 0
    }
}

/// The netlink messages of one datagram, in order; a header that does not fit is an
/// error, after which iteration stops.
#[derive(Debug, Clone)]
pub struct RawMessages<'a> {
    rest: &'a [u8],
}

impl<'a> RawMessages<'a> {
    pub fn new(datagram: &'a [u8]) -> Self {
        RawMessages { rest: datagram }
    }
}

impl<'a> Iterator for RawMessages<'a> {
    type Item = Result<RawMessage<'a>, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let rest = std::mem::take(&mut self.rest);
        let Some(header) = rest.first_chunk::<NLMSG_HEADER_LEN>() else {
            return Some(Err(format!(
                "expected a netlink message header of {NLMSG_HEADER_LEN} bytes, found {} bytes",
                rest.len()
            )));
        };
        let field16 = |at: usize| u16::from_ne_bytes([header[at], header[at + 1]]);
        let field32 = |at: usize| {
            u32::from_ne_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let length = field32(0) as usize;
        if length < NLMSG_HEADER_LEN || length > rest.len() {
            return Some(Err(format!(
                "expected a netlink message header with a length of {NLMSG_HEADER_LEN} to {} bytes, found {length}",
                rest.len()
            )));
        }
        self.rest = rest.get(length.next_multiple_of(4)..).unwrap_or_default();
        Some(Ok(RawMessage {
            message_type: field16(4),
            flags: field16(6),
            sequence_number: field32(8),
            payload: &rest[NLMSG_HEADER_LEN..length],
            bytes: &rest[..length],
        }))
    }
}

fn netlink_error(query: Query, message: String) -> ObserveError {
    ObserveError::Netlink {
        channel: query.channel().into(),
        message,
    }
}

/// What a kernel error (an errno from `NLMSG_ERROR`/`NLMSG_DONE`) means for ctnetlink.
pub fn errno_message(errno: i32) -> String {
    let text = io::Error::from_raw_os_error(errno);
    let hint = match errno {
        libc::EPERM => ": ctnetlink needs CAP_NET_ADMIN in the socket's network namespace",
        libc::EINVAL | libc::EOPNOTSUPP => ": is nf_conntrack_netlink present in this kernel?",
        _ => "",
    };
    format!("the kernel refused the request (errno {errno}, {text}){hint}")
}

/// The per-CPU counters from the bodies of an `IPCTNL_MSG_CT_GET_STATS_CPU` dump.
/// Counters a message lacks stay 0; a dump with no message at all is an error.
pub fn parse_stats_cpu(bodies: &[StatsBody]) -> Result<Vec<CpuStats>, ObserveError> {
    let query = Query::StatsCpu;
    if bodies.is_empty() {
        return Err(netlink_error(
            query,
            "expected at least one per-CPU message before NLMSG_DONE, found none".into(),
        ));
    }
    bodies
        .iter()
        .map(|body| {
            let mut cpu = CpuStats {
                cpu: body.res_id,
                ..CpuStats::default()
            };
            for nla in &body.attributes {
                if let Some((name, counter)) = cpu_counter(&mut cpu, nla.kind() & NLA_TYPE_MASK) {
                    *counter = u64::from(be32(query, name, nla)?);
                }
            }
            Ok(cpu)
        })
        .collect()
}

/// The counter a per-CPU attribute sets, with the attribute's name for errors.
fn cpu_counter(cpu: &mut CpuStats, kind: u16) -> Option<(&'static str, &mut u64)> {
    let c = &mut cpu.counters;
    Some(match kind {
        CTA_STATS_FOUND => ("CTA_STATS_FOUND", &mut c.found),
        CTA_STATS_INVALID => ("CTA_STATS_INVALID", &mut c.invalid),
        CTA_STATS_IGNORE => ("CTA_STATS_IGNORE", &mut c.ignore),
        CTA_STATS_INSERT => ("CTA_STATS_INSERT", &mut c.insert),
        CTA_STATS_INSERT_FAILED => ("CTA_STATS_INSERT_FAILED", &mut c.insert_failed),
        CTA_STATS_DROP => ("CTA_STATS_DROP", &mut c.drop),
        CTA_STATS_EARLY_DROP => ("CTA_STATS_EARLY_DROP", &mut c.early_drop),
        CTA_STATS_ERROR => ("CTA_STATS_ERROR", &mut c.icmp_error),
        CTA_STATS_SEARCH_RESTART => ("CTA_STATS_SEARCH_RESTART", &mut c.search_restart),
        CTA_STATS_CLASH_RESOLVE => ("CTA_STATS_CLASH_RESOLVE", &mut c.clash_resolve),
        CTA_STATS_CHAIN_TOOLONG => ("CTA_STATS_CHAIN_TOOLONG", &mut cpu.chain_toolong),
        _ => return None,
    })
}

/// The table size from the body of an `IPCTNL_MSG_CT_GET_STATS` reply; both attributes
/// are required.
pub fn parse_stats(bodies: &[StatsBody]) -> Result<GlobalStats, ObserveError> {
    let query = Query::Stats;
    let [body] = bodies else {
        return Err(netlink_error(
            query,
            format!("expected exactly one stats message, found {}", bodies.len()),
        ));
    };
    let mut entries = None;
    let mut max_entries = None;
    for nla in &body.attributes {
        match nla.kind() & NLA_TYPE_MASK {
            CTA_STATS_GLOBAL_ENTRIES => {
                entries = Some(be32(query, "CTA_STATS_GLOBAL_ENTRIES", nla)?);
            }
            CTA_STATS_GLOBAL_MAX_ENTRIES => {
                max_entries = Some(be32(query, "CTA_STATS_GLOBAL_MAX_ENTRIES", nla)?);
            }
            _ => {}
        }
    }
    let required = |value: Option<u32>, name: &str| {
        value
            .map(u64::from)
            .ok_or_else(|| netlink_error(query, format!("expected a {name} attribute")))
    };
    Ok(GlobalStats {
        entries: required(entries, "CTA_STATS_GLOBAL_ENTRIES")?,
        max_entries: required(max_entries, "CTA_STATS_GLOBAL_MAX_ENTRIES")?,
    })
}

/// A big-endian u32 attribute value.
fn be32(query: Query, name: &str, nla: &DefaultNla) -> Result<u32, ObserveError> {
    let mut value = [0u8; 4];
    if nla.value_len() != value.len() {
        return Err(netlink_error(
            query,
            format!(
                "expected {name} to hold a 4-byte big-endian u32, found {} bytes",
                nla.value_len()
            ),
        ));
    }
    nla.emit_value(&mut value);
    Ok(u32::from_be_bytes(value))
}

/// Parses a whole reply stream (datagrams as received, concatenated) to `query`.
fn collect(
    query: Query,
    sequence_number: u32,
    bytes: &[u8],
) -> Result<Vec<StatsBody>, ObserveError> {
    let mut replies = Replies::new(query, sequence_number);
    replies.feed(bytes)?;
    if !replies.finished() {
        let end = match query {
            Query::StatsCpu => "NLMSG_DONE",
            Query::Stats => "an ACK",
        };
        return Err(netlink_error(
            query,
            format!("expected the reply to end with {end}"),
        ));
    }
    Ok(replies.bodies)
}

/// Parses the complete reply stream to an `IPCTNL_MSG_CT_GET_STATS_CPU` dump.
pub fn parse_stats_cpu_reply(
    sequence_number: u32,
    bytes: &[u8],
) -> Result<Vec<CpuStats>, ObserveError> {
    parse_stats_cpu(&collect(Query::StatsCpu, sequence_number, bytes)?)
}

/// Parses the complete reply stream to an `IPCTNL_MSG_CT_GET_STATS` request.
pub fn parse_stats_reply(sequence_number: u32, bytes: &[u8]) -> Result<GlobalStats, ObserveError> {
    parse_stats(&collect(Query::Stats, sequence_number, bytes)?)
}

/// Whether the kernel can answer ctnetlink without loading a module, from the text of
/// `/proc/modules` (absent on kernels without loadable modules) and of
/// `/lib/modules/$(uname -r)/modules.builtin`. Returns why not, when it cannot.
pub fn ctnetlink_available(
    proc_modules: Option<&str>,
    modules_builtin: Option<&str>,
) -> Result<(), String> {
    let Some(loaded) = proc_modules else {
        // No module loading in this kernel: whatever is there is built in, and nothing
        // can be loaded behind our back.
        return Ok(());
    };
    let is_loaded = loaded
        .lines()
        .any(|line| line.split_whitespace().next() == Some("nf_conntrack_netlink"));
    let is_builtin = modules_builtin.is_some_and(|text| {
        text.lines()
            .any(|line| line.trim_end().ends_with("/nf_conntrack_netlink.ko"))
    });
    if is_loaded || is_builtin {
        Ok(())
    } else {
        Err(
            "nf_conntrack_netlink is neither loaded (/proc/modules) nor built in \
             (modules.builtin); ctguard does not make the kernel load modules"
                .into(),
        )
    }
}

/// A synchronous netlink socket bound to the network namespace of the thread that opened
/// it, with one reused receive buffer. The transport under every netlink reader here.
#[derive(Debug)]
pub struct NetlinkSocket {
    socket: Socket,
    sequence_number: u32,
    buffer: Vec<u8>,
}

/// The receive buffer's starting size: above the 32 KiB the kernel caps dump datagrams
/// at, so a dump is received in one `recv` per datagram and the buffer never grows.
const RECEIVE_BUFFER_BYTES: usize = 64 * 1024;

impl NetlinkSocket {
    /// Opens a `NETLINK_NETFILTER` socket in the calling thread's network namespace,
    /// after checking that doing so loads no kernel module.
    pub fn open_ctnetlink() -> Result<Self, ObserveError> {
        const CHANNEL: &str = "ctnetlink";
        let failed = |message: String| ObserveError::Netlink {
            channel: CHANNEL.into(),
            message,
        };
        if !Path::new("/proc/sys/net/netfilter").exists() {
            return Err(failed(
                "/proc/sys/net/netfilter is missing: no connection tracking in this kernel".into(),
            ));
        }
        let proc_modules = std::fs::read_to_string("/proc/modules").ok();
        let modules_builtin = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .and_then(|release| {
                std::fs::read_to_string(format!("/lib/modules/{}/modules.builtin", release.trim()))
                    .ok()
            });
        ctnetlink_available(proc_modules.as_deref(), modules_builtin.as_deref()).map_err(failed)?;
        NetlinkSocket::open(NETLINK_NETFILTER).map_err(failed)
    }

    /// Opens a socket of any netlink `protocol` in the calling thread's namespace, with
    /// the reply timeout set. Errors say which step failed.
    pub fn open(protocol: isize) -> Result<Self, String> {
        let mut socket = Socket::new(protocol)
            .map_err(|e| format!("cannot open a netlink socket (protocol {protocol}): {e}"))?;
        socket
            .bind_auto()
            .map_err(|e| format!("cannot bind the netlink socket: {e}"))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| format!("cannot connect to the kernel: {e}"))?;
        let timeout = nix::sys::time::TimeVal::new(REPLY_TIMEOUT.as_secs() as _, 0);
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
            .map_err(|e| format!("cannot set the receive timeout: {e}"))?;
        Ok(NetlinkSocket {
            socket,
            sequence_number: 0,
            buffer: vec![0; RECEIVE_BUFFER_BYTES],
        })
    }

    /// Raises the kernel's receive queue limit to `bytes`: past `net.core.rmem_max` when
    /// we may (SO_RCVBUFFORCE needs CAP_NET_ADMIN), else as far as rmem_max allows.
    pub fn set_receive_queue(&self, bytes: usize) -> Result<(), String> {
        use nix::sys::socket::{setsockopt, sockopt};
        setsockopt(&self.socket, sockopt::RcvBufForce, &bytes)
            .or_else(|_| setsockopt(&self.socket, sockopt::RcvBuf, &bytes))
            .map_err(|e| format!("cannot set SO_RCVBUF to {bytes}: {e}"))
    }

    /// Discards stale replies, then sends `request` under a fresh sequence number, which
    /// it returns. `request` builds the bytes for a sequence number.
    pub fn send(&mut self, request: impl FnOnce(u32) -> Vec<u8>) -> Result<u32, String> {
        self.drain()?;
        self.sequence_number = self.sequence_number.wrapping_add(1);
        self.socket
            .send(&request(self.sequence_number), 0)
            .map_err(|e| format!("cannot send the request: {e}"))?;
        Ok(self.sequence_number)
    }

    /// Discards whatever an earlier, failed read left queued. A dump the kernel has not
    /// finished only moves on when we receive, and a new dump request on a socket with a
    /// dump still running fails with EBUSY; receiving the leftovers lets it finish.
    pub fn drain(&mut self) -> Result<(), String> {
        // Bounded so a misbehaving kernel cannot keep us here; an abandoned dump of the
        // largest tables takes far fewer datagrams.
        for _ in 0..1 << 20 {
            let discarded =
                retry_interrupted(|| self.socket.recv(&mut &mut [0u8; 0][..], libc::MSG_DONTWAIT));
            match discarded {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(format!("cannot discard stale replies: {e}")),
            }
        }
        Err("expected the socket to run empty, but stale replies kept coming".into())
    }

    /// Receives one whole datagram into the reused buffer, however large: it peeks at the
    /// datagram's size with the whole buffer offered (so the kernel sizes dump datagrams
    /// to it) and grows the buffer in the rare case it is too small.
    pub fn receive(&mut self) -> io::Result<&[u8]> {
        loop {
            let size = retry_interrupted(|| {
                self.socket
                    .recv(&mut &mut self.buffer[..], libc::MSG_PEEK | libc::MSG_TRUNC)
            })?;
            if size <= self.buffer.len() {
                break;
            }
            self.buffer.resize(size, 0);
        }
        let received = retry_interrupted(|| self.socket.recv(&mut &mut self.buffer[..], 0))?;
        Ok(&self.buffer[..received])
    }

    /// Receives one datagram into `room` with a single `recv`, for readers that know how
    /// large their datagrams can be (a dump's are at most 32 KiB) and offer more: it saves
    /// [`NetlinkSocket::receive`]'s peek, which copies each datagram twice. A datagram
    /// larger than `room` is an error, since its tail is lost.
    pub fn receive_into(&mut self, room: &mut [u8]) -> io::Result<usize> {
        let offered = room.len();
        let size = retry_interrupted(|| self.socket.recv(&mut &mut room[..], libc::MSG_TRUNC))?;
        if size > offered {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("expected a datagram of at most {offered} bytes, found {size} bytes"),
            ));
        }
        Ok(size)
    }
}

/// How a receive error reads in a report.
pub fn receive_error_message(e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::WouldBlock {
        format!("no reply within {} s", REPLY_TIMEOUT.as_secs())
    } else {
        format!("cannot receive the reply: {e}")
    }
}

/// An open ctnetlink socket for reading the stats of the network namespace it was opened
/// in. Open it inside a namespace with [`crate::netns::run_in`], read it from anywhere.
#[derive(Debug)]
pub struct CtnetlinkStats {
    socket: NetlinkSocket,
}

impl CtnetlinkStats {
    /// Opens a `NETLINK_NETFILTER` socket in the calling thread's network namespace,
    /// after checking that doing so loads no kernel module.
    pub fn open() -> Result<Self, ObserveError> {
        Ok(CtnetlinkStats {
            socket: NetlinkSocket::open_ctnetlink()?,
        })
    }

    /// Asks the kernel for the per-CPU counters and the table size.
    pub fn read(&mut self) -> Result<CtnetlinkReading, ObserveError> {
        let per_cpu = parse_stats_cpu(&self.exchange(Query::StatsCpu)?)?;
        let global = parse_stats(&self.exchange(Query::Stats)?)?;
        Ok(CtnetlinkReading::new(per_cpu, global))
    }

    /// Sends one request and collects its replies.
    fn exchange(&mut self, query: Query) -> Result<Vec<StatsBody>, ObserveError> {
        let failed = |message: String| netlink_error(query, message);
        let sequence_number = self.socket.send(|seq| query.request(seq)).map_err(failed)?;
        let mut replies = Replies::new(query, sequence_number);
        while !replies.finished() {
            let datagram = self
                .socket
                .receive()
                .map_err(|e| failed(receive_error_message(&e)))?;
            replies.feed(datagram)?;
        }
        Ok(replies.bodies)
    }
}

fn retry_interrupted<T>(mut call: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STATS_CPU_REQUEST: &[u8] =
        include_bytes!("../../tests/fixtures/ctnetlink/stats_cpu.request.bin");
    const STATS_CPU_REPLY: &[u8] =
        include_bytes!("../../tests/fixtures/ctnetlink/stats_cpu.reply.bin");
    const STATS_REQUEST: &[u8] = include_bytes!("../../tests/fixtures/ctnetlink/stats.request.bin");
    const STATS_REPLY: &[u8] = include_bytes!("../../tests/fixtures/ctnetlink/stats.reply.bin");
    const STATS_CPU_EPERM: &[u8] =
        include_bytes!("../../tests/fixtures/ctnetlink/stats_cpu.eperm.reply.bin");
    const CONNTRACK_S: &str = include_str!("../../tests/fixtures/ctnetlink/conntrack-S.txt");

    /// The first message of the captured per-CPU dump, field by field.
    #[rustfmt::skip]
    const CPU0_MESSAGE: [u8; 100] = [
        // nlmsghdr
        0x64, 0x00, 0x00, 0x00, // length 100
        0x04, 0x01,             // type: NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET_STATS_CPU
        0x02, 0x00,             // flags: NLM_F_MULTI
        0x01, 0x00, 0x00, 0x00, // sequence number 1
        0x68, 0x2a, 0x00, 0x00, // port id of the capturing socket
        // nfgenmsg
        0x00,                   // family AF_UNSPEC
        0x00,                   // version NFNETLINK_V0
        0x00, 0x00,             // res_id: cpu 0 (big endian)
        // NLAs: length 8, kind, big-endian u32
        0x08, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, // CTA_STATS_FOUND 0
        0x08, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, // CTA_STATS_INVALID 0
        0x08, 0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, // CTA_STATS_INSERT 0
        0x08, 0x00, 0x09, 0x00, 0x00, 0x00, 0x00, 0x00, // CTA_STATS_INSERT_FAILED 0
        0x08, 0x00, 0x0a, 0x00, 0x00, 0x00, 0x0a, 0x89, // CTA_STATS_DROP 2697
        0x08, 0x00, 0x0b, 0x00, 0x00, 0x00, 0x00, 0x5b, // CTA_STATS_EARLY_DROP 91
        0x08, 0x00, 0x0c, 0x00, 0x00, 0x00, 0x00, 0x00, // CTA_STATS_ERROR 0
        0x08, 0x00, 0x0d, 0x00, 0x00, 0x00, 0x00, 0x00, // CTA_STATS_SEARCH_RESTART 0
        0x08, 0x00, 0x0e, 0x00, 0x00, 0x00, 0x00, 0x00, // CTA_STATS_CLASH_RESOLVE 0
        0x08, 0x00, 0x0f, 0x00, 0x00, 0x00, 0x00, 0x00, // CTA_STATS_CHAIN_TOOLONG 0
    ];

    /// The end of the captured per-CPU dump.
    #[rustfmt::skip]
    const DONE_MESSAGE: [u8; 20] = [
        0x14, 0x00, 0x00, 0x00, // length 20
        0x03, 0x00,             // type NLMSG_DONE
        0x02, 0x00,             // flags: NLM_F_MULTI
        0x01, 0x00, 0x00, 0x00, // sequence number 1
        0x68, 0x2a, 0x00, 0x00, // port id
        0x00, 0x00, 0x00, 0x00, // dump status 0
    ];

    /// The whole captured reply to the global request.
    #[rustfmt::skip]
    const GLOBAL_REPLY: [u8; 72] = [
        // the stats message
        0x24, 0x00, 0x00, 0x00, // length 36
        0x05, 0x01,             // type: NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET_STATS
        0x02, 0x00,             // flags: NLM_F_MULTI (set by the kernel even here)
        0x02, 0x00, 0x00, 0x00, // sequence number 2
        0x68, 0x2a, 0x00, 0x00, // port id
        0x00, 0x00, 0x00, 0x00, // nfgenmsg: AF_UNSPEC, NFNETLINK_V0, res_id 0
        0x08, 0x00, 0x01, 0x00, 0x00, 0x00, 0x02, 0x00, // CTA_STATS_GLOBAL_ENTRIES 512
        0x08, 0x00, 0x02, 0x00, 0x00, 0x00, 0x02, 0x00, // CTA_STATS_GLOBAL_MAX_ENTRIES 512
        // the ACK
        0x24, 0x00, 0x00, 0x00, // length 36
        0x02, 0x00,             // type NLMSG_ERROR
        0x00, 0x01,             // flags: NLM_F_CAPPED (only the request's header follows)
        0x02, 0x00, 0x00, 0x00, // sequence number 2
        0x68, 0x2a, 0x00, 0x00, // port id
        0x00, 0x00, 0x00, 0x00, // error code 0: ACK
        0x14, 0x00, 0x00, 0x00, 0x05, 0x01, 0x05, 0x00, // the request's header:
        0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //   length, type, flags, seq, port
    ];

    /// A requests's bytes, field by field.
    #[rustfmt::skip]
    fn annotated_request(message_type: u8, flags: u16, sequence_number: u8) -> Vec<u8> {
        let [flags_low, flags_high] = flags.to_le_bytes();
        vec![
            0x14, 0x00, 0x00, 0x00,               // length 20
            message_type, 0x01,                   // type: NFNL_SUBSYS_CTNETLINK << 8 | message
            flags_low, flags_high,                // flags
            sequence_number, 0x00, 0x00, 0x00,    // sequence number
            0x00, 0x00, 0x00, 0x00,               // port id: the kernel fills it in
            0x00, 0x00, 0x00, 0x00,               // nfgenmsg: AF_UNSPEC, NFNETLINK_V0, res_id 0
        ]
    }

    /// One netlink message built by hand: header, nfgenmsg with `res_id`, attributes.
    fn message(kind: u16, flags: u16, seq: u32, res_id: u16, nlas: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = vec![0, NFNETLINK_V0];
        body.extend(res_id.to_be_bytes());
        for (nla_kind, value) in nlas {
            body.extend((value.len() as u16 + 4).to_ne_bytes());
            body.extend(nla_kind.to_ne_bytes());
            body.extend(*value);
            body.resize(body.len().next_multiple_of(4), 0);
        }
        let mut bytes = Vec::new();
        bytes.extend((16 + body.len() as u32).to_ne_bytes());
        bytes.extend(kind.to_ne_bytes());
        bytes.extend(flags.to_ne_bytes());
        bytes.extend(seq.to_ne_bytes());
        bytes.extend(0u32.to_ne_bytes());
        bytes.extend(body);
        bytes
    }

    fn channel_and_message(error: ObserveError) -> (String, String) {
        match error {
            ObserveError::Netlink { channel, message } => (channel, message),
            other => panic!("expected a netlink error, found {other:?}"),
        }
    }

    #[test]
    fn requests_match_the_captured_bytes() {
        assert_eq!(Query::StatsCpu.request(1), STATS_CPU_REQUEST);
        assert_eq!(Query::Stats.request(2), STATS_REQUEST);
        assert_eq!(annotated_request(4, 0x0301, 1), STATS_CPU_REQUEST);
        assert_eq!(annotated_request(5, 0x0005, 2), STATS_REQUEST);
    }

    #[test]
    fn captured_dump_is_annotated_field_by_field() {
        assert_eq!(&STATS_CPU_REPLY[..100], CPU0_MESSAGE);
        assert_eq!(&STATS_CPU_REPLY[STATS_CPU_REPLY.len() - 20..], DONE_MESSAGE);
        assert_eq!(STATS_REPLY, GLOBAL_REPLY);
    }

    #[test]
    fn parses_the_captured_per_cpu_dump() {
        let cpus = parse_stats_cpu_reply(1, STATS_CPU_REPLY).unwrap();
        let cpu0 = CpuStats {
            cpu: 0,
            counters: ConntrackStats {
                drop: 2697,
                early_drop: 91,
                ..ConntrackStats::default()
            },
            chain_toolong: 0,
        };
        let cpu1 = CpuStats {
            cpu: 1,
            ..CpuStats::default()
        };
        assert_eq!(cpus, [cpu0, cpu1]);
    }

    #[test]
    fn parses_the_captured_global_reply() {
        let global = parse_stats_reply(2, STATS_REPLY).unwrap();
        assert_eq!(
            global,
            GlobalStats {
                entries: 512,
                max_entries: 512
            }
        );
    }

    #[test]
    fn captured_dump_agrees_with_conntrack_tool() {
        let cpus = parse_stats_cpu_reply(1, STATS_CPU_REPLY).unwrap();
        for (line, cpu) in CONNTRACK_S.lines().zip(&cpus) {
            let field = |name: &str| -> u64 {
                line.split_whitespace()
                    .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
                    .unwrap_or_else(|| panic!("{name} in {line:?}"))
                    .parse()
                    .unwrap()
            };
            assert_eq!(u64::from(cpu.cpu), field("cpu"));
            let c = &cpu.counters;
            let pairs = [
                ("found", c.found),
                ("invalid", c.invalid),
                ("insert", c.insert),
                ("insert_failed", c.insert_failed),
                ("drop", c.drop),
                ("early_drop", c.early_drop),
                ("error", c.icmp_error),
                ("search_restart", c.search_restart),
                ("clash_resolve", c.clash_resolve),
                ("chaintoolong", cpu.chain_toolong),
            ];
            for (name, value) in pairs {
                assert_eq!(value, field(name), "{name} on cpu {}", cpu.cpu);
            }
        }
        assert_eq!(CONNTRACK_S.lines().count(), cpus.len());
    }

    #[test]
    fn reading_sums_the_cpus() {
        let cpus = parse_stats_cpu_reply(1, STATS_CPU_REPLY).unwrap();
        let mut doubled = cpus.clone();
        doubled.extend(cpus.iter().map(|c| CpuStats {
            cpu: c.cpu + 2,
            chain_toolong: 3,
            ..*c
        }));
        let reading = CtnetlinkReading::new(doubled, GlobalStats::default());
        assert_eq!(reading.total.drop, 2 * 2697);
        assert_eq!(reading.total.early_drop, 2 * 91);
        assert_eq!(reading.chain_toolong, 6);
        assert_eq!(reading.per_cpu.len(), 4);
    }

    #[test]
    fn eperm_names_the_missing_capability() {
        let error = parse_stats_cpu_reply(1, STATS_CPU_EPERM).unwrap_err();
        let (channel, message) = channel_and_message(error);
        assert_eq!(channel, "ctnetlink stats_cpu");
        assert!(message.contains("errno 1"), "{message}");
        assert!(message.contains("CAP_NET_ADMIN"), "{message}");
    }

    #[test]
    fn counters_arrive_datagram_by_datagram() {
        let mut replies = Replies::new(Query::StatsCpu, 1);
        replies.feed(&STATS_CPU_REPLY[..100]).unwrap();
        assert!(!replies.finished());
        replies.feed(&STATS_CPU_REPLY[100..200]).unwrap();
        assert!(!replies.finished());
        replies.feed(&STATS_CPU_REPLY[200..]).unwrap();
        assert!(replies.finished());
        assert_eq!(replies.bodies().len(), 2);
    }

    #[test]
    fn skips_messages_of_an_earlier_request() {
        let stale = message(0x0104, 2, 7, 0, &[(CTA_STATS_DROP, &[0, 0, 0, 9])]);
        let mut stream = stale;
        stream.extend(STATS_CPU_REPLY);
        let cpus = parse_stats_cpu_reply(1, &stream).unwrap();
        assert_eq!(cpus[0].counters.drop, 2697);
    }

    #[test]
    fn ignores_unknown_and_retired_attributes() {
        let nlas: [(u16, &[u8]); 4] = [
            (1, &[0, 0, 0, 5]), // CTA_STATS_SEARCHED, no longer used
            (0x40, &[1, 2, 3]), // unknown, odd length
            (CTA_STATS_IGNORE, &[0, 0, 1, 0]),
            (CTA_STATS_DROP, &[0, 0, 0, 7]),
        ];
        let mut stream = message(0x0104, 2, 1, 3, &nlas);
        stream.extend(&DONE_MESSAGE);
        let cpus = parse_stats_cpu_reply(1, &stream).unwrap();
        let expected = ConntrackStats {
            ignore: 256,
            drop: 7,
            ..ConntrackStats::default()
        };
        assert_eq!(cpus[0].cpu, 3);
        assert_eq!(cpus[0].counters, expected);
    }

    #[test]
    fn short_counter_is_an_error_naming_it() {
        let mut stream = message(0x0104, 2, 1, 0, &[(CTA_STATS_DROP, &[0, 9])]);
        stream.extend(&DONE_MESSAGE);
        let (channel, message) =
            channel_and_message(parse_stats_cpu_reply(1, &stream).unwrap_err());
        assert_eq!(channel, "ctnetlink stats_cpu");
        assert!(message.contains("CTA_STATS_DROP"), "{message}");
        assert!(message.contains("found 2 bytes"), "{message}");
    }

    #[test]
    fn attribute_running_past_its_message_is_an_error() {
        let mut stream = CPU0_MESSAGE.to_vec();
        stream[20] = 0x60; // the first NLA claims 96 bytes; only 80 remain in the message
        stream.extend(&DONE_MESSAGE);
        let (channel, message) =
            channel_and_message(parse_stats_cpu_reply(1, &stream).unwrap_err());
        assert_eq!(channel, "ctnetlink stats_cpu");
        assert!(
            message.contains("expected a ctnetlink stats message"),
            "{message}"
        );
    }

    #[test]
    fn truncated_stream_is_an_error() {
        let cut = &STATS_CPU_REPLY[..150];
        let (_, message) = channel_and_message(parse_stats_cpu_reply(1, cut).unwrap_err());
        assert!(
            message.contains("expected a netlink message header"),
            "{message}"
        );

        let without_done = &STATS_CPU_REPLY[..200];
        let (_, message) = channel_and_message(parse_stats_cpu_reply(1, without_done).unwrap_err());
        assert!(message.contains("NLMSG_DONE"), "{message}");

        let without_ack = &STATS_REPLY[..36];
        let (channel, message) =
            channel_and_message(parse_stats_reply(2, without_ack).unwrap_err());
        assert_eq!(channel, "ctnetlink stats");
        assert!(message.contains("an ACK"), "{message}");
    }

    #[test]
    fn wrong_message_type_is_an_error() {
        let mut stream = STATS_REPLY.to_vec();
        stream[8] = 1; // sequence number of the stats message: as if answering the dump
        let (channel, message) =
            channel_and_message(parse_stats_cpu_reply(1, &stream).unwrap_err());
        assert_eq!(channel, "ctnetlink stats_cpu");
        assert!(
            message.contains("expected message type 0x0104, found 0x0105"),
            "{message}"
        );
    }

    #[test]
    fn empty_dump_is_an_error() {
        let (_, message) =
            channel_and_message(parse_stats_cpu_reply(1, &DONE_MESSAGE).unwrap_err());
        assert!(
            message.contains("at least one per-CPU message"),
            "{message}"
        );
    }

    #[test]
    fn failed_dump_reports_the_errno() {
        let mut done = DONE_MESSAGE;
        done[16..20].copy_from_slice(&(-libc::EINTR).to_ne_bytes());
        let (_, message) = channel_and_message(parse_stats_cpu_reply(1, &done).unwrap_err());
        assert!(
            message.contains(&format!("errno {}", libc::EINTR)),
            "{message}"
        );
    }

    #[test]
    fn global_reply_needs_both_attributes() {
        let mut stream = message(
            0x0105,
            2,
            2,
            0,
            &[(CTA_STATS_GLOBAL_ENTRIES, &[0, 0, 0, 1])],
        );
        stream.extend(&GLOBAL_REPLY[36..]);
        let (_, message) = channel_and_message(parse_stats_reply(2, &stream).unwrap_err());
        assert!(
            message.contains("CTA_STATS_GLOBAL_MAX_ENTRIES"),
            "{message}"
        );
    }

    #[test]
    fn module_check() {
        assert!(ctnetlink_available(None, None).is_ok());
        let loaded = "nfnetlink 20480 1 nf_conntrack_netlink, Live 0x0\n\
                      nf_conntrack_netlink 57344 0 - Live 0x0\n";
        assert!(ctnetlink_available(Some(loaded), None).is_ok());
        let builtin = "kernel/net/netfilter/nfnetlink.ko\n\
                       kernel/net/netfilter/nf_conntrack_netlink.ko\n";
        assert!(ctnetlink_available(Some(""), Some(builtin)).is_ok());
        let only_user = "nfnetlink 20480 1 nf_conntrack_netlink, Live 0x0\n";
        let refused = ctnetlink_available(Some(only_user), Some("")).unwrap_err();
        assert!(refused.contains("nf_conntrack_netlink"), "{refused}");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_stats_cpu_reply(1, &bytes);
            let _ = parse_stats_reply(2, &bytes);
        }

        // Random bytes rarely get past the first header; damaging the captured replies
        // reaches the attribute and payload parsers too.
        #[test]
        fn damaged_captures_never_panic(
            position in 0usize..220,
            value in any::<u8>(),
            cut in 0usize..220,
        ) {
            for (capture, seq) in [(STATS_CPU_REPLY, 1), (STATS_REPLY, 2), (STATS_CPU_EPERM, 1)] {
                let mut bytes = capture.to_vec();
                if let Some(byte) = bytes.get_mut(position) {
                    *byte = value;
                }
                bytes.truncate(cut.max(position + 1));
                let _ = parse_stats_cpu_reply(seq, &bytes);
                let _ = parse_stats_reply(seq, &bytes);
            }
        }
    }
}
