/*!
Eviction: deleting dead conntrack entries over ctnetlink, in bounded batches, for
immediate relief when the table is full. The policy's opt-in `evict` stage.

One round ([`Evictor::evict`]) is a selection, then the deletions:

1. **Select** ([`Evictor::select`]): one `IPCTNL_MSG_CT_GET` table dump, streamed through
   the table analysis' parser ([`crate::observe::table::stream_table`]); [`judge`] rules
   on each entry and at most `batch` victims are kept, so memory is bounded by the batch,
   not the table. Nothing is deleted while the dump runs on the socket.
2. **Delete** ([`Evictor::delete`]), victim by victim: an `IPCTNL_MSG_CT_GET` of its
   original tuple, [`judge`] again on the entry as it is now, and only if it still
   qualifies (and has the same `CTA_ID`) an `IPCTNL_MSG_CT_DELETE`
   (`NLM_F_REQUEST|NLM_F_ACK`) naming the tuple *and* `CTA_ID`. So a victim a packet
   revived since the dump, or whose tuple a new connection reused, is not hit (counted as
   `revived`), and one gone meanwhile is answered `ENOENT` ("already gone"). The id alone
   is not enough: the kernel derives it from the entry's address and tuple
   (`nf_ct_get_id`), and a new entry for the same tuple allocated in the freed slot gets
   the same id — seen on this kernel in an idle namespace. The lookup narrows that window
   to the microseconds between it and the delete. A delete without a tuple would flush
   the whole table; [`delete_request`] always carries one.

What may go ([`judge`]):
- TCP entries in a requested state (`syn_sent`, `syn_recv`, `fin_wait`, `close_wait`,
  `last_ack`, `time_wait`, `close`); `unreplied` UDP/UDP-Lite entries (no
  `IPS_SEEN_REPLY`). Other protocols are left alone: ICMP tuples carry id/type/code that
  the flow parser does not keep, and the rest have timers of their own.
- Never an `IPS_ASSURED` entry in `ESTABLISHED` (checked first, whatever states were
  asked for: the report counts them as `skipped_assured`), never a NAT'd entry (deleting
  one drops its translation mid-flow), never one without a `CTA_ID`.
- Only entries at least `min_age` old, by an estimate: conntrack keeps no creation time
  (unless `nf_conntrack_timestamp` is on), but every packet re-arms an entry's timer with
  its state's timeout sysctl, so `timeout − CTA_TIMEOUT` is how long the entry has been
  idle in its state — what "dead for at least min_age" means ([`estimated_age`]). The
  timeouts are this namespace's, re-read every round. The estimate can be up to 1 s high
  (`CTA_TIMEOUT` is whole seconds, rounded down); a sysctl lowered since the timer was
  armed makes it low (the entry waits for a later round: safe); a sysctl raised since,
  or an nftables `ct timeout` policy shorter than the sysctl, makes it high. TCP's
  retransmission caps only shorten timers above 5 minutes, which no dead state has by
  default. With `min_age` 0 the estimate is not needed.

Eviction cannot be undone: the entries it deletes are gone, and the connections they
tracked are over (their next packet, if any, starts a new entry). It is therefore the one
action ctguard does not journal for rollback; the daemon logs each round's report instead.
*/

use crate::knob::TimeoutKnob;
use crate::observe::ObserveError;
use crate::observe::ctnetlink::{
    Control, NetlinkSocket, RawMessages, errno_message, receive_error_message,
};
use crate::observe::sysctl::SysctlSource;
use crate::observe::table::{
    CTA_ID, CTA_IP_V4_DST, CTA_IP_V4_SRC, CTA_IP_V6_DST, CTA_IP_V6_SRC, CTA_PROTO_DST_PORT,
    CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_TUPLE_IP, CTA_TUPLE_ORIG, CTA_TUPLE_PROTO, CTA_ZONE,
    Flow, NFGENMSG_LEN, NFNL_SUBSYS_CTNETLINK, NLM_F_REQUEST, Protocol, RECEIVE_QUEUE_BYTES,
    parse_flow, stream_table,
};
use crate::policy::EvictState;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

// include/uapi/linux/netfilter/nfnetlink_conntrack.h: enum cntl_msg_types.
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
// include/uapi/linux/netlink.h
const NLM_F_ACK: u16 = 0x4;
const NLA_F_NESTED: u16 = 0x8000;
// include/uapi/linux/netfilter/nf_conntrack_common.h: enum ip_conntrack_status.
const IPS_SEEN_REPLY: u32 = 1 << 1;
const IPS_ASSURED: u32 = 1 << 2;
// include/uapi/linux/netfilter/nf_conntrack_tcp.h: enum tcp_conntrack.
const TCP_CONNTRACK_SYN_SENT: u8 = 1;
const TCP_CONNTRACK_SYN_RECV: u8 = 2;
const TCP_CONNTRACK_ESTABLISHED: u8 = 3;
const TCP_CONNTRACK_FIN_WAIT: u8 = 4;
const TCP_CONNTRACK_CLOSE_WAIT: u8 = 5;
const TCP_CONNTRACK_LAST_ACK: u8 = 6;
const TCP_CONNTRACK_TIME_WAIT: u8 = 7;
const TCP_CONNTRACK_CLOSE: u8 = 8;
// include/uapi/linux/in.h
const IPPROTO_UDPLITE: u8 = 136;
// include/linux/socket.h: the nfgenmsg family of a delete must be the tuple's.
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

const DELETE_CHANNEL: &str = "ctnetlink delete";

/// What one eviction round found and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EvictReport {
    /// Entries in the dump.
    pub examined: u64,
    /// Entries eligible for deletion (may exceed the batch).
    pub matched: u64,
    /// Entries in a requested state but younger than `min_age` (or of unknown age).
    pub too_young: u64,
    /// NAT'd entries in a requested state, left alone.
    pub skipped_nat: u64,
    /// Assured ESTABLISHED TCP entries seen, which eviction never touches.
    pub skipped_assured: u64,
    /// Entries the kernel deleted.
    pub deleted: u64,
    /// Victims gone before their turn came (expired, or deleted by someone else).
    pub already_gone: u64,
    /// Victims that no longer qualified when their turn came (a packet revived them, or
    /// their tuple was reused by a new entry): left alone.
    pub revived: u64,
}

impl fmt::Display for EvictReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "examined {}, matched {}, deleted {}, already gone {}; left alone: {} revived, \
             {} too young, {} NAT'd, {} assured established",
            self.examined,
            self.matched,
            self.deleted,
            self.already_gone,
            self.revived,
            self.too_young,
            self.skipped_nat,
            self.skipped_assured
        )
    }
}

/// Why a round failed.
#[derive(Debug, thiserror::Error)]
pub enum EvictError {
    /// No ctnetlink here (or the namespace cannot be entered): eviction is not possible.
    #[error("eviction unavailable: {0}")]
    Unavailable(String),
    /// The table dump or the timeout sysctls could not be read; nothing was deleted.
    #[error(transparent)]
    Observe(#[from] ObserveError),
    /// A delete failed; the victims before it were handled as `report` says.
    #[error("{DELETE_CHANNEL}: {message} (so far: {report})")]
    Delete {
        message: String,
        /// The kernel's errno, when it refused.
        errno: Option<i32>,
        report: EvictReport,
    },
}

impl EvictError {
    /// Whether the environment rules eviction out (the engine tries another stage).
    pub fn is_not_permitted(&self) -> bool {
        match self {
            EvictError::Unavailable(_) => true,
            EvictError::Delete { errno, .. } => *errno == Some(libc::EPERM),
            EvictError::Observe(_) => false,
        }
    }
}

/// What [`judge`] makes of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// An assured ESTABLISHED TCP connection: never deleted.
    AssuredEstablished,
    /// Not in a requested state (or carries no `CTA_ID` to delete it by).
    Other,
    /// In a requested state but NAT'd: left alone.
    Nat,
    /// In a requested state but not yet `min_age` old, or of unknown age.
    TooYoung,
    /// May be deleted.
    Evict,
}

/// Which entries a round may delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Criteria {
    pub states: Vec<EvictState>,
    pub min_age: Duration,
}

/// The dead state an entry is in, if any, with the timeout sysctl that armed its timer.
pub fn dead_state(flow: &Flow) -> Option<(EvictState, TimeoutKnob)> {
    let protocol = flow.original.protocol;
    if protocol == Protocol::TCP {
        return Some(match flow.tcp_state? {
            TCP_CONNTRACK_SYN_SENT => (EvictState::SynSent, TimeoutKnob::SynSent),
            TCP_CONNTRACK_SYN_RECV => (EvictState::SynRecv, TimeoutKnob::SynRecv),
            TCP_CONNTRACK_FIN_WAIT => (EvictState::FinWait, TimeoutKnob::FinWait),
            TCP_CONNTRACK_CLOSE_WAIT => (EvictState::CloseWait, TimeoutKnob::CloseWait),
            TCP_CONNTRACK_LAST_ACK => (EvictState::LastAck, TimeoutKnob::LastAck),
            TCP_CONNTRACK_TIME_WAIT => (EvictState::TimeWait, TimeoutKnob::TimeWait),
            TCP_CONNTRACK_CLOSE => (EvictState::Close, TimeoutKnob::Close),
            _ => return None,
        });
    }
    // UDP-Lite shares UDP's timeouts; an unreplied entry's timer is the short one.
    let udp = protocol == Protocol::UDP || protocol.0 == IPPROTO_UDPLITE;
    (udp && flow.status & IPS_SEEN_REPLY == 0).then_some((EvictState::Unreplied, TimeoutKnob::Udp))
}

/// How long an entry has been idle in its state: its state's timeout (seconds) minus the
/// seconds its timer has left (`CTA_TIMEOUT`); `None` when either is unknown. Saturates at
/// 0 when the timer has more left than the timeout (the sysctl was lowered since).
pub fn estimated_age(state_timeout: Option<u64>, remaining: Option<u32>) -> Option<Duration> {
    let elapsed = state_timeout?.saturating_sub(u64::from(remaining?));
    Some(Duration::from_secs(elapsed))
}

/// Rules on one entry. `timeouts` are the namespace's state timeouts in seconds.
pub fn judge(flow: &Flow, criteria: &Criteria, timeouts: &BTreeMap<TimeoutKnob, u64>) -> Verdict {
    // First, whatever was asked: a live, assured connection is never evicted.
    if flow.original.protocol == Protocol::TCP
        && flow.tcp_state == Some(TCP_CONNTRACK_ESTABLISHED)
        && flow.status & IPS_ASSURED != 0
    {
        return Verdict::AssuredEstablished;
    }
    let Some((state, knob)) = dead_state(flow) else {
        return Verdict::Other;
    };
    if !criteria.states.contains(&state) || flow.id.is_none() {
        return Verdict::Other;
    }
    if flow.is_nat() {
        return Verdict::Nat;
    }
    if criteria.min_age.is_zero() {
        return Verdict::Evict;
    }
    match estimated_age(timeouts.get(&knob).copied(), flow.timeout) {
        Some(age) if age >= criteria.min_age => Verdict::Evict,
        _ => Verdict::TooYoung,
    }
}

/// An entry picked for deletion: what its delete request names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Victim {
    pub source: IpAddr,
    pub destination: IpAddr,
    pub protocol: u8,
    pub source_port: u16,
    pub destination_port: u16,
    pub zone: Option<u16>,
    pub id: u32,
}

impl Victim {
    /// The victim for `flow`, when its original tuple can be named in a delete: ports,
    /// addresses of one family, and an id.
    pub fn of(flow: &Flow) -> Option<Victim> {
        let tuple = &flow.original;
        if tuple.source.is_ipv4() != tuple.destination.is_ipv4() {
            return None;
        }
        Some(Victim {
            source: tuple.source,
            destination: tuple.destination,
            protocol: tuple.protocol.0,
            source_port: tuple.source_port?,
            destination_port: tuple.destination_port?,
            zone: flow.zone,
            id: flow.id?,
        })
    }
}

/// Appends one attribute (header, value, padding to 4 bytes).
fn put_attribute(bytes: &mut Vec<u8>, kind: u16, value: &[u8]) {
    bytes.extend((value.len() as u16 + 4).to_ne_bytes());
    bytes.extend(kind.to_ne_bytes());
    bytes.extend(value);
    bytes.resize(bytes.len().next_multiple_of(4), 0);
}

/// Appends a nested attribute whose contents `fill` writes.
fn put_nested(bytes: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = bytes.len();
    bytes.extend([0; 4]);
    fill(bytes);
    let length = (bytes.len() - start) as u16;
    bytes[start..start + 2].copy_from_slice(&length.to_ne_bytes());
    bytes[start + 2..start + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
}

/// The bytes of `IPCTNL_MSG_CT_DELETE` for `victim`: netlink header (`NLM_F_REQUEST|
/// NLM_F_ACK`), nfgenmsg of the tuple's family, `CTA_TUPLE_ORIG`, `CTA_ZONE` when the entry
/// has one, `CTA_ID`. Always names a tuple: ctnetlink flushes the table on a delete without.
pub fn delete_request(victim: &Victim, sequence_number: u32) -> Vec<u8> {
    request(
        victim,
        sequence_number,
        IPCTNL_MSG_CT_DELETE,
        NLM_F_REQUEST | NLM_F_ACK,
    )
}

/// The bytes of `IPCTNL_MSG_CT_GET` for `victim` (`NLM_F_REQUEST`): the same body as its
/// delete. The kernel answers with the entry (one `IPCTNL_MSG_CT_NEW`) or `ENOENT`; it does
/// not match on `CTA_ID` here, the caller compares it.
pub fn lookup_request(victim: &Victim, sequence_number: u32) -> Vec<u8> {
    request(victim, sequence_number, IPCTNL_MSG_CT_GET, NLM_F_REQUEST)
}

fn request(victim: &Victim, sequence_number: u32, message_type: u16, flags: u16) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(96);
    bytes.extend([0; 4]); // length, set below
    bytes.extend(((NFNL_SUBSYS_CTNETLINK << 8) | message_type).to_ne_bytes());
    bytes.extend(flags.to_ne_bytes());
    bytes.extend(sequence_number.to_ne_bytes());
    bytes.extend(0u32.to_ne_bytes()); // port id: the kernel fills it in
    let family = if victim.source.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    };
    bytes.extend([family, 0, 0, 0]); // NFNETLINK_V0, res_id 0
    debug_assert_eq!(bytes.len(), 16 + NFGENMSG_LEN);
    put_nested(&mut bytes, CTA_TUPLE_ORIG, |b| {
        put_nested(b, CTA_TUPLE_IP, |b| {
            match (victim.source, victim.destination) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    put_attribute(b, CTA_IP_V4_SRC, &s.octets());
                    put_attribute(b, CTA_IP_V4_DST, &d.octets());
                }
                (s, d) => {
                    put_attribute(b, CTA_IP_V6_SRC, &ipv6_octets(s));
                    put_attribute(b, CTA_IP_V6_DST, &ipv6_octets(d));
                }
            }
        });
        put_nested(b, CTA_TUPLE_PROTO, |b| {
            put_attribute(b, CTA_PROTO_NUM, &[victim.protocol]);
            put_attribute(b, CTA_PROTO_SRC_PORT, &victim.source_port.to_be_bytes());
            put_attribute(
                b,
                CTA_PROTO_DST_PORT,
                &victim.destination_port.to_be_bytes(),
            );
        });
    });
    if let Some(zone) = victim.zone {
        put_attribute(&mut bytes, CTA_ZONE, &zone.to_be_bytes());
    }
    put_attribute(&mut bytes, CTA_ID, &victim.id.to_be_bytes());
    let length = bytes.len() as u32;
    bytes[..4].copy_from_slice(&length.to_ne_bytes());
    bytes
}

fn ipv6_octets(address: IpAddr) -> [u8; 16] {
    match address {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
    }
}

/// How the kernel answered one lookup or delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The ACK of a delete: the entry is gone.
    Ack,
    /// A lookup's entry.
    Entry(Flow),
    /// `ENOENT`: no entry with that tuple (and, for a delete, that id).
    Gone,
    /// Any other errno.
    Refused(i32),
}

/// The answer to the request sent under `sequence_number`, from one received datagram;
/// `None` when the datagram holds only messages of other requests.
pub fn answer(sequence_number: u32, datagram: &[u8]) -> Result<Option<Answer>, String> {
    const ENTRY_TYPE: u16 = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW;
    for message in RawMessages::new(datagram) {
        let message = message?;
        if message.sequence_number != sequence_number {
            continue;
        }
        return match message.control()? {
            Control::Ack => Ok(Some(Answer::Ack)),
            Control::Refused(libc::ENOENT) => Ok(Some(Answer::Gone)),
            Control::Refused(errno) => Ok(Some(Answer::Refused(errno))),
            Control::Data if message.message_type == ENTRY_TYPE => {
                Ok(Some(Answer::Entry(parse_flow(message.payload)?)))
            }
            Control::Noop => continue,
            Control::Done | Control::Data => Err(format!(
                "expected an entry, an ACK or an error, found message type {:#06x}",
                message.message_type
            )),
        };
    }
    Ok(None)
}

/// The outcome of a dump: the counts so far, up to `batch` victims, and what they were
/// judged by (to judge them again before each delete).
#[derive(Debug, Clone)]
pub struct Selection {
    pub report: EvictReport,
    pub victims: Vec<Victim>,
    batch: usize,
    criteria: Criteria,
    /// The namespace's state timeouts (seconds) when the selection was made.
    timeouts: BTreeMap<TimeoutKnob, u64>,
}

impl Selection {
    pub fn new(criteria: Criteria, timeouts: BTreeMap<TimeoutKnob, u64>, batch: u32) -> Self {
        let batch = usize::try_from(batch).unwrap_or(usize::MAX);
        Selection {
            report: EvictReport::default(),
            // Grows with what is found: a large batch on a small table costs nothing.
            victims: Vec::with_capacity(batch.min(1024)),
            batch,
            criteria,
            timeouts,
        }
    }

    /// Whether `flow` may go, by this selection's criteria.
    pub fn judge(&self, flow: &Flow) -> Verdict {
        judge(flow, &self.criteria, &self.timeouts)
    }

    /// Counts one entry and keeps it as a victim if it may go and the batch has room.
    pub fn add(&mut self, flow: &Flow) {
        let verdict = self.judge(flow);
        let report = &mut self.report;
        report.examined += 1;
        match verdict {
            Verdict::AssuredEstablished => report.skipped_assured += 1,
            Verdict::Other => {}
            Verdict::Nat => report.skipped_nat += 1,
            Verdict::TooYoung => report.too_young += 1,
            Verdict::Evict => {
                // Every TCP/UDP entry with an id can be named; the check keeps it so.
                if let Some(victim) = Victim::of(flow) {
                    report.matched += 1;
                    if self.victims.len() < self.batch {
                        self.victims.push(victim);
                    }
                }
            }
        }
    }
}

/// Deletes dead entries in the network namespace it was opened in. Open it inside a
/// namespace with [`crate::netns::run_in`] (or [`Evictor::open_in`]), use it from anywhere.
#[derive(Debug)]
pub struct Evictor {
    socket: NetlinkSocket,
    sysctl: SysctlSource,
}

impl Evictor {
    /// Opens a ctnetlink socket (only if that loads no kernel module) and the conntrack
    /// sysctls in the calling thread's network namespace.
    pub fn open() -> Result<Self, EvictError> {
        let unavailable = |e: ObserveError| EvictError::Unavailable(e.to_string());
        let socket = NetlinkSocket::open_ctnetlink().map_err(unavailable)?;
        socket
            .set_receive_queue(RECEIVE_QUEUE_BYTES)
            .map_err(EvictError::Unavailable)?;
        let sysctl = SysctlSource::open_default().map_err(unavailable)?;
        Ok(Evictor { socket, sysctl })
    }

    /// Opens an evictor in the namespace at `netns`, or in the caller's own.
    pub fn open_in(netns: Option<&Path>) -> Result<Self, EvictError> {
        match netns {
            Some(path) => crate::netns::run_in(path, Evictor::open).map_err(|e| {
                EvictError::Unavailable(format!("entering {}: {e}", path.display()))
            })?,
            None => Evictor::open(),
        }
    }

    /// Dumps the table and picks up to `batch` victims; deletes nothing.
    pub fn select(&mut self, criteria: &Criteria, batch: u32) -> Result<Selection, EvictError> {
        let timeouts = self.sysctl.read()?.timeouts;
        let (selection, _interrupted) = stream_table(
            &mut self.socket,
            || Selection::new(criteria.clone(), timeouts.clone(), batch),
            Selection::add,
        )?;
        Ok(selection)
    }

    /// Deletes the victims of `selection` that still qualify, one lookup and one
    /// acknowledged delete each.
    pub fn delete(&mut self, selection: Selection) -> Result<EvictReport, EvictError> {
        let mut report = selection.report;
        for victim in &selection.victims {
            match self.delete_one(&selection, victim) {
                Ok(Answer::Ack) => report.deleted += 1,
                Ok(Answer::Gone) => report.already_gone += 1,
                // What the lookup found is not (or no longer) a victim.
                Ok(Answer::Entry(_)) => report.revived += 1,
                Ok(Answer::Refused(errno)) => {
                    return Err(EvictError::Delete {
                        message: errno_message(errno),
                        errno: Some(errno),
                        report,
                    });
                }
                Err(message) => {
                    return Err(EvictError::Delete {
                        message,
                        errno: None,
                        report,
                    });
                }
            }
        }
        Ok(report)
    }

    /// One round: [`Evictor::select`], then [`Evictor::delete`].
    pub fn evict(&mut self, criteria: &Criteria, batch: u32) -> Result<EvictReport, EvictError> {
        let selection = self.select(criteria, batch)?;
        self.delete(selection)
    }

    /// Looks `victim` up, and deletes it if it is the same entry and still qualifies.
    /// Answers `Entry` for an entry left alone, else what the kernel answered.
    fn delete_one(&mut self, selection: &Selection, victim: &Victim) -> Result<Answer, String> {
        match self.exchange(|seq| lookup_request(victim, seq))? {
            Answer::Entry(now)
                if now.id == Some(victim.id) && selection.judge(&now) == Verdict::Evict => {}
            Answer::Ack => return Err("expected the entry, found an ACK".into()),
            other => return Ok(other),
        }
        match self.exchange(|seq| delete_request(victim, seq))? {
            Answer::Entry(_) => Err("expected an ACK, found an entry".into()),
            answer => Ok(answer),
        }
    }

    /// Sends one request and waits for its answer.
    fn exchange(&mut self, request: impl FnOnce(u32) -> Vec<u8>) -> Result<Answer, String> {
        let sequence_number = self.socket.send(request)?;
        loop {
            let datagram = self
                .socket
                .receive()
                .map_err(|e| receive_error_message(&e))?;
            if let Some(answer) = answer(sequence_number, datagram)? {
                return Ok(answer);
            }
        }
    }
}

/// One round in the namespace at `netns` (or the caller's own) with a fresh [`Evictor`]:
/// [`Evictor::evict`], or with `delete` false only [`Evictor::select`] (a dry run: the
/// report says what matched, nothing is deleted).
pub fn round(
    netns: Option<&Path>,
    criteria: &Criteria,
    batch: u32,
    delete: bool,
) -> Result<EvictReport, EvictError> {
    let mut evictor = Evictor::open_in(netns)?;
    if delete {
        evictor.evict(criteria, batch)
    } else {
        Ok(evictor.select(criteria, batch)?.report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::table::{Tuple, parse_flow};
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const CONNTRACK_D_REQUEST: &[u8] =
        include_bytes!("../../tests/fixtures/evict/conntrack-D.request.bin");
    const DELETE_REQUEST: &[u8] = include_bytes!("../../tests/fixtures/evict/delete.request.bin");
    const DELETE_ACK: &[u8] = include_bytes!("../../tests/fixtures/evict/delete.ack.bin");
    const DELETE_ENOENT: &[u8] = include_bytes!("../../tests/fixtures/evict/delete.enoent.bin");
    const GET_REQUEST: &[u8] = include_bytes!("../../tests/fixtures/evict/get.request.bin");
    const GET_REPLY: &[u8] = include_bytes!("../../tests/fixtures/evict/get.reply.bin");
    const GET_ENOENT: &[u8] = include_bytes!("../../tests/fixtures/evict/get.enoent.bin");
    const TABLE_DUMP: &[u8] = include_bytes!("../../tests/fixtures/table/ct_dump.reply.bin");

    /// The captured delete of 127.0.0.1:40002 → 127.0.0.1:5353 (UDP), field by field.
    #[rustfmt::skip]
    const ANNOTATED_DELETE: [u8; 80] = [
        // nlmsghdr
        0x50, 0x00, 0x00, 0x00, // length 80
        0x02, 0x01,             // type: NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE
        0x05, 0x00,             // flags: NLM_F_REQUEST | NLM_F_ACK
        0x01, 0x00, 0x00, 0x00, // sequence number 1
        0x00, 0x00, 0x00, 0x00, // port id: the kernel fills it in
        // nfgenmsg
        0x02, 0x00, 0x00, 0x00, // family AF_INET, NFNETLINK_V0, res_id 0
        0x34, 0x00, 0x01, 0x80, // CTA_TUPLE_ORIG (nested), 52 bytes
        0x14, 0x00, 0x01, 0x80, //   CTA_TUPLE_IP (nested), 20 bytes
        0x08, 0x00, 0x01, 0x00, 0x7f, 0x00, 0x00, 0x01, // CTA_IP_V4_SRC 127.0.0.1
        0x08, 0x00, 0x02, 0x00, 0x7f, 0x00, 0x00, 0x01, // CTA_IP_V4_DST 127.0.0.1
        0x1c, 0x00, 0x02, 0x80, //   CTA_TUPLE_PROTO (nested), 28 bytes
        0x05, 0x00, 0x01, 0x00, 0x11, 0x00, 0x00, 0x00, // CTA_PROTO_NUM 17 (udp), padded
        0x06, 0x00, 0x02, 0x00, 0x9c, 0x42, 0x00, 0x00, // CTA_PROTO_SRC_PORT 40002, padded
        0x06, 0x00, 0x03, 0x00, 0x14, 0xe9, 0x00, 0x00, // CTA_PROTO_DST_PORT 5353, padded
        0x08, 0x00, 0x0c, 0x00, 0x84, 0x78, 0xe4, 0x9f, // CTA_ID 2222515359 (big endian)
    ];

    fn captured_victim() -> Victim {
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        Victim {
            source: localhost,
            destination: localhost,
            protocol: 17,
            source_port: 40002,
            destination_port: 5353,
            zone: None,
            id: 2_222_515_359,
        }
    }

    fn flow(protocol: Protocol, status: u32, tcp_state: Option<u8>) -> Flow {
        let original = Tuple {
            source: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
            destination: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            protocol,
            source_port: Some(40000),
            destination_port: Some(443),
        };
        Flow {
            original,
            reply: Some(original.inverted()),
            status,
            tcp_state,
            id: Some(7),
            timeout: Some(100),
            zone: None,
        }
    }

    fn timeouts() -> BTreeMap<TimeoutKnob, u64> {
        BTreeMap::from([
            (TimeoutKnob::TimeWait, 120),
            (TimeoutKnob::Udp, 30),
            (TimeoutKnob::Established, 432_000),
        ])
    }

    fn criteria(states: &[EvictState], min_age_secs: u64) -> Criteria {
        Criteria {
            states: states.to_vec(),
            min_age: Duration::from_secs(min_age_secs),
        }
    }

    const ASSURED_REPLIED: u32 = IPS_ASSURED | IPS_SEEN_REPLY;

    #[test]
    fn request_matches_the_independent_capture_field_by_field() {
        assert_eq!(DELETE_REQUEST, ANNOTATED_DELETE);
        assert_eq!(delete_request(&captured_victim(), 1), DELETE_REQUEST);
        // The lookup differs only in type (IPCTNL_MSG_CT_GET), flags (NLM_F_REQUEST) and seq.
        let mut lookup = ANNOTATED_DELETE;
        lookup[4] = 0x01;
        lookup[6] = 0x01;
        lookup[8] = 3;
        assert_eq!(GET_REQUEST, lookup);
        assert_eq!(lookup_request(&captured_victim(), 3), GET_REQUEST);
    }

    #[test]
    fn tuple_is_the_one_conntrack_tool_sends() {
        // conntrack -D (v1.4.7) deletes 127.0.0.1:40001 → :5353 with the same header and
        // an identical CTA_TUPLE_ORIG; it adds the reply tuple, status, timeout and mark,
        // which the kernel ignores on delete, and no CTA_ID.
        let victim = Victim {
            source_port: 40001,
            ..captured_victim()
        };
        let ours = delete_request(&victim, 1);
        assert_eq!(&ours[4..8], &CONNTRACK_D_REQUEST[4..8], "type and flags");
        assert_eq!(
            &ours[16..72],
            &CONNTRACK_D_REQUEST[16..72],
            "nfgenmsg and tuple"
        );
    }

    #[test]
    fn requests_always_name_a_tuple_and_an_id() {
        let v6 = Victim {
            source: IpAddr::V6(Ipv6Addr::LOCALHOST),
            destination: IpAddr::V6(Ipv6Addr::LOCALHOST),
            zone: Some(3),
            ..captured_victim()
        };
        let bytes = delete_request(&v6, 9);
        assert_eq!(
            bytes.len(),
            u32::from_ne_bytes(bytes[..4].try_into().unwrap()) as usize
        );
        assert_eq!(bytes[16], AF_INET6);
        // CTA_TUPLE_ORIG: 4 + IP (4 + 2 × 20) + PROTO 28 = 76 bytes.
        assert_eq!(&bytes[20..24], &[76, 0, 1, 0x80]);
        assert_eq!(&bytes[96..104], &[6, 0, 18, 0, 0, 3, 0, 0], "CTA_ZONE 3");
        assert_eq!(
            &bytes[104..112],
            &[8, 0, 12, 0, 0x84, 0x78, 0xe4, 0x9f],
            "CTA_ID"
        );
        assert_eq!(bytes.len(), 112);
    }

    #[test]
    fn kernel_answers_are_read() {
        assert_eq!(answer(1, DELETE_ACK), Ok(Some(Answer::Ack)));
        assert_eq!(answer(2, DELETE_ENOENT), Ok(Some(Answer::Gone)));
        assert_eq!(answer(4, GET_ENOENT), Ok(Some(Answer::Gone)));
        assert_eq!(answer(5, DELETE_ACK), Ok(None), "another request's answer");
        let mut eperm = DELETE_ENOENT.to_vec();
        eperm[16..20].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        assert_eq!(answer(2, &eperm), Ok(Some(Answer::Refused(libc::EPERM))));
        let message = answer(1, &DELETE_ACK[..10]).unwrap_err();
        assert!(message.contains("netlink message header"), "{message}");
        let mut stats = GET_REPLY.to_vec();
        stats[4] = 0x05; // IPCTNL_MSG_CT_GET_STATS
        let message = answer(3, &stats).unwrap_err();
        assert!(message.contains("found message type 0x0105"), "{message}");
    }

    #[test]
    fn lookup_answer_is_the_captured_entry() {
        let Ok(Some(Answer::Entry(entry))) = answer(3, GET_REPLY) else {
            panic!("expected an entry in {GET_REPLY:?}");
        };
        assert_eq!(Victim::of(&entry), Some(captured_victim()));
        assert_eq!(entry.status & IPS_SEEN_REPLY, 0);
        assert_eq!(entry.timeout, Some(29));
        let wanted = Selection::new(criteria(&[EvictState::Unreplied], 0), timeouts(), 1);
        assert_eq!(wanted.judge(&entry), Verdict::Evict);
    }

    #[test]
    fn assured_established_is_never_evicted() {
        let every_state = criteria(
            &[
                EvictState::Unreplied,
                EvictState::SynSent,
                EvictState::SynRecv,
                EvictState::FinWait,
                EvictState::CloseWait,
                EvictState::LastAck,
                EvictState::TimeWait,
                EvictState::Close,
            ],
            0,
        );
        let established = flow(
            Protocol::TCP,
            ASSURED_REPLIED,
            Some(TCP_CONNTRACK_ESTABLISHED),
        );
        assert_eq!(
            judge(&established, &every_state, &timeouts()),
            Verdict::AssuredEstablished
        );
        // Not assured yet, still established: no state names it, so it stays too.
        let fresh = flow(
            Protocol::TCP,
            IPS_SEEN_REPLY,
            Some(TCP_CONNTRACK_ESTABLISHED),
        );
        assert_eq!(judge(&fresh, &every_state, &timeouts()), Verdict::Other);
    }

    #[test]
    fn dead_states_are_recognised() {
        let time_wait = flow(
            Protocol::TCP,
            ASSURED_REPLIED,
            Some(TCP_CONNTRACK_TIME_WAIT),
        );
        assert_eq!(
            dead_state(&time_wait),
            Some((EvictState::TimeWait, TimeoutKnob::TimeWait))
        );
        let unreplied = flow(Protocol::UDP, 0, None);
        assert_eq!(
            dead_state(&unreplied),
            Some((EvictState::Unreplied, TimeoutKnob::Udp))
        );
        let lite = flow(Protocol(IPPROTO_UDPLITE), 0, None);
        assert_eq!(dead_state(&lite).map(|d| d.0), Some(EvictState::Unreplied));
        let replied = flow(Protocol::UDP, IPS_SEEN_REPLY, None);
        assert_eq!(dead_state(&replied), None);
        let syn_sent2 = flow(Protocol::TCP, 0, Some(9));
        assert_eq!(dead_state(&syn_sent2), None);
        let stateless_tcp = flow(Protocol::TCP, 0, None);
        assert_eq!(dead_state(&stateless_tcp), None);
        let icmp = Flow {
            original: Tuple {
                protocol: Protocol(1),
                source_port: None,
                destination_port: None,
                ..unreplied.original
            },
            reply: None,
            ..unreplied
        };
        assert_eq!(dead_state(&icmp), None);
    }

    #[test]
    fn selection_follows_state_age_and_nat() {
        let wanted = criteria(&[EvictState::TimeWait, EvictState::Unreplied], 30);
        let t = timeouts();
        let mut time_wait = flow(
            Protocol::TCP,
            ASSURED_REPLIED,
            Some(TCP_CONNTRACK_TIME_WAIT),
        );
        time_wait.timeout = Some(90); // idle 120 − 90 = 30 s
        assert_eq!(judge(&time_wait, &wanted, &t), Verdict::Evict);
        time_wait.timeout = Some(91);
        assert_eq!(judge(&time_wait, &wanted, &t), Verdict::TooYoung);
        time_wait.timeout = None;
        assert_eq!(
            judge(&time_wait, &wanted, &t),
            Verdict::TooYoung,
            "unknown age"
        );
        assert_eq!(
            judge(&time_wait, &criteria(&[EvictState::TimeWait], 0), &t),
            Verdict::Evict
        );

        let udp = flow(Protocol::UDP, 0, None);
        // The UDP timeout is 30 s: an unreplied entry can never be 30 s idle and still here.
        assert_eq!(judge(&udp, &wanted, &t), Verdict::TooYoung);
        assert_eq!(
            judge(&udp, &criteria(&[EvictState::Unreplied], 0), &t),
            Verdict::Evict
        );
        assert_eq!(
            judge(&udp, &criteria(&[EvictState::TimeWait], 0), &t),
            Verdict::Other
        );

        let mut nat = udp;
        nat.reply.as_mut().unwrap().source_port = Some(8443);
        assert_eq!(
            judge(&nat, &criteria(&[EvictState::Unreplied], 0), &t),
            Verdict::Nat
        );
        let mut anonymous = udp;
        anonymous.id = None;
        assert_eq!(
            judge(&anonymous, &criteria(&[EvictState::Unreplied], 0), &t),
            Verdict::Other
        );
    }

    #[test]
    fn age_is_the_timeout_minus_what_is_left() {
        assert_eq!(
            estimated_age(Some(120), Some(20)),
            Some(Duration::from_secs(100))
        );
        assert_eq!(
            estimated_age(Some(30), Some(600)),
            Some(Duration::ZERO),
            "sysctl lowered"
        );
        assert_eq!(estimated_age(None, Some(5)), None);
        assert_eq!(estimated_age(Some(30), None), None);
    }

    #[test]
    fn selection_is_bounded_by_the_batch() {
        let wanted = criteria(&[EvictState::Unreplied], 0);
        let mut selection = Selection::new(wanted, timeouts(), 2);
        let established = flow(
            Protocol::TCP,
            ASSURED_REPLIED,
            Some(TCP_CONNTRACK_ESTABLISHED),
        );
        for port in 0..5 {
            let mut udp = flow(Protocol::UDP, 0, None);
            udp.original.source_port = Some(port);
            udp.reply = Some(udp.original.inverted());
            selection.add(&udp);
            selection.add(&established);
        }
        assert_eq!(selection.victims.len(), 2);
        assert_eq!(selection.victims[1].source_port, 1);
        let report = selection.report;
        assert_eq!(
            (report.examined, report.matched, report.skipped_assured),
            (10, 5, 5)
        );
    }

    #[test]
    fn captured_dump_selects_the_plain_unreplied_flows() {
        // ct_dump.reply.bin: three unreplied UDP flows to 5353 (one over IPv6), one DNAT'd
        // unreplied UDP flow, one established TCP connection.
        let wanted = criteria(&[EvictState::Unreplied, EvictState::TimeWait], 0);
        let mut selection = Selection::new(wanted, timeouts(), 10);
        let mut replies = crate::observe::table::DumpReplies::new(1);
        crate::observe::table::flows_in_datagram(&mut replies, TABLE_DUMP, |flow| {
            selection.add(flow)
        })
        .unwrap();
        let report = selection.report;
        assert_eq!(
            (report.examined, report.matched, report.skipped_nat),
            (5, 3, 1)
        );
        assert!(selection.victims.iter().all(|v| v.destination_port == 5353));
        assert!(selection.victims.iter().any(|v| v.source.is_ipv6()));
        // A victim's request names exactly the tuple the dump showed.
        let first = parse_flow(&TABLE_DUMP[16..164]).unwrap();
        assert!(Victim::of(&first).is_some_and(|v| v.id == first.id.unwrap()));
    }

    proptest! {
        #[test]
        fn arbitrary_answers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = answer(1, &bytes);
        }

        #[test]
        fn damaged_answers_never_panic(position in 0usize..164, value in any::<u8>(), cut in 0usize..164) {
            for capture in [DELETE_ACK, DELETE_ENOENT, GET_REPLY, GET_ENOENT] {
                let mut bytes = capture.to_vec();
                if let Some(byte) = bytes.get_mut(position) {
                    *byte = value;
                }
                bytes.truncate(cut.max(position + 1));
                for seq in 1..=4 {
                    let _ = answer(seq, &bytes);
                }
            }
        }

        // Whatever the victim, the request parses back to its own tuple, zone and id
        // with the table dump's parser (a delete is the dump's message with another type).
        #[test]
        fn requests_parse_back_to_their_victim(
            v4 in any::<bool>(),
            source in any::<[u8; 16]>(),
            destination in any::<[u8; 16]>(),
            tcp in any::<bool>(),
            ports in any::<(u16, u16)>(),
            zone in proptest::option::of(any::<u16>()),
            id in any::<u32>(),
            seq in any::<u32>(),
        ) {
            let address = |b: [u8; 16]| if v4 {
                IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
            } else {
                IpAddr::V6(Ipv6Addr::from(b))
            };
            let victim = Victim {
                source: address(source),
                destination: address(destination),
                protocol: if tcp { 6 } else { 17 },
                source_port: ports.0,
                destination_port: ports.1,
                zone,
                id,
            };
            let bytes = delete_request(&victim, seq);
            let message = RawMessages::new(&bytes).next().unwrap().unwrap();
            prop_assert_eq!(message.sequence_number, seq);
            let flow = parse_flow(message.payload).unwrap();
            prop_assert_eq!(Victim::of(&flow), Some(victim));
        }
    }
}
