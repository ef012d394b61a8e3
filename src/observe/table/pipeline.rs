/*!
A table dump received on one thread and parsed on another, so that the kernel's work and
ours overlap.

The kernel formats a ctnetlink dump inside `recvmsg`: each receive copies one datagram out,
then fills the next (`netlink_dump`). On a single thread the kernel's formatting and our
parsing therefore take turns, and a dump costs their sum. [`run`] leaves the receiving to a
scoped reader thread and keeps the parsing on the calling thread (so the sink needs not be
`Send`); with a second CPU free, a dump takes about as long as the kernel alone needs.

The reader receives several datagrams into each of a few reused chunks and hands a chunk
over only when it is full: handing over every 32 KiB datagram alone woke the parser once
per datagram, and the wake-ups cost about as much kernel time as the overlap saved. Each
receive is a single `recv` offering [`DATAGRAM_ROOM`] bytes, more than the kernel ever puts
in a dump datagram, rather than a peek at the size followed by the read, which copied every
datagram twice. Memory is fixed: [`CHUNKS`] × [`CHUNK_BYTES`].

The reader follows the framing only (sequence number, `NLMSG_DONE`, kernel errors) to know
where the dump ends; the parser runs its own [`DumpReplies`] over the same datagrams for the
data, exactly as a single-threaded read would.
*/

use super::{DumpFailure, DumpReplies};
use crate::observe::ctnetlink::{NetlinkSocket, receive_error_message};
use std::ops::Range;
use std::sync::mpsc;

/// Chunks in flight: one being filled, one being parsed, one spare so neither side waits
/// on the other's scheduling.
const CHUNKS: usize = 3;
/// Bytes per chunk: room for at least six 32 KiB dump datagrams.
const CHUNK_BYTES: usize = 256 * 1024;
/// The room each receive offers. The kernel sizes dump datagrams from the largest room a
/// receive offered, up to 32 KiB, so a dump datagram always fits; twice that is margin.
const DATAGRAM_ROOM: usize = 64 * 1024;

/// Datagrams received back to back, with where each one lies.
struct Chunk {
    bytes: Vec<u8>,
    datagrams: Vec<Range<usize>>,
}

impl Chunk {
    fn new() -> Self {
        Chunk {
            bytes: vec![0; CHUNK_BYTES],
            datagrams: Vec::new(),
        }
    }
}

/// Runs one dump on `socket`, feeding each datagram to `feed` on the calling thread while a
/// reader thread receives the next ones, until `NLMSG_DONE`. Returns whether the kernel
/// flagged the dump as interrupted.
pub(super) fn run(
    socket: &mut NetlinkSocket,
    request: fn(u32) -> Vec<u8>,
    mut feed: impl FnMut(&mut DumpReplies, &[u8]) -> Result<(), String>,
) -> Result<bool, DumpFailure> {
    let sequence_number = socket.send(request).map_err(DumpFailure::Failed)?;
    std::thread::scope(move |scope| {
        // Our ends of both channels live in this closure: returning early drops them, which
        // stops a reader waiting on either before the scope joins it.
        let (full_sender, full) = mpsc::sync_channel(CHUNKS);
        let (empty, empty_receiver) = mpsc::channel();
        for _ in 0..CHUNKS {
            // The receiver is alive: it is only moved to the reader below.
            let _ = empty.send(Chunk::new());
        }
        std::thread::Builder::new()
            .name("ctguard-dump".into())
            .spawn_scoped(scope, move || {
                receive_chunks(socket, sequence_number, &empty_receiver, &full_sender);
            })
            .map_err(|e| DumpFailure::Failed(format!("cannot start the dump reader: {e}")))?;
        let mut replies = DumpReplies::new(sequence_number);
        while !replies.finished() {
            let chunk = full.recv().map_err(|_| {
                DumpFailure::Failed("the dump reader stopped before NLMSG_DONE".into())
            })??;
            for datagram in &chunk.datagrams {
                feed(&mut replies, &chunk.bytes[datagram.clone()]).map_err(DumpFailure::Failed)?;
            }
            // The reader is gone once it has seen the end; the chunk is not needed then.
            let _ = empty.send(chunk);
        }
        Ok(replies.interrupted())
    })
}

/// The reader thread: fills the chunks `empty` gives it and sends them to `full` until the
/// dump ends, an error (sent on as such) stops it, or the parser hangs up.
fn receive_chunks(
    socket: &mut NetlinkSocket,
    sequence_number: u32,
    empty: &mpsc::Receiver<Chunk>,
    full: &mpsc::SyncSender<Result<Chunk, DumpFailure>>,
) {
    let mut replies = DumpReplies::new(sequence_number);
    while !replies.finished() {
        let Ok(chunk) = empty.recv() else {
            return;
        };
        let filled = fill(socket, &mut replies, chunk);
        let failed = filled.is_err();
        if full.send(filled).is_err() || failed {
            return;
        }
    }
}

/// Receives datagrams into `chunk` until it has no room for another or the dump has ended.
fn fill(
    socket: &mut NetlinkSocket,
    replies: &mut DumpReplies,
    mut chunk: Chunk,
) -> Result<Chunk, DumpFailure> {
    chunk.datagrams.clear();
    let mut used = 0;
    while !replies.finished() && chunk.bytes.len() - used >= DATAGRAM_ROOM {
        let room = &mut chunk.bytes[used..used + DATAGRAM_ROOM];
        let size = socket.receive_into(room).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                DumpFailure::QueueOverflow
            } else {
                DumpFailure::Failed(receive_error_message(&e))
            }
        })?;
        replies
            .feed(&room[..size], |_| Ok(()))
            .map_err(DumpFailure::Failed)?;
        chunk.datagrams.push(used..used + size);
        used += size;
    }
    Ok(chunk)
}

#[cfg(test)]
mod tests {
    use super::super::{address_dump_request, collect_addresses, run_dump};
    use super::*;

    // The host's own address dump: a dump any user may run, without a lab.
    fn route_socket() -> NetlinkSocket {
        NetlinkSocket::open(netlink_sys::protocols::NETLINK_ROUTE).unwrap()
    }

    fn addresses(outcome: Result<bool, DumpFailure>, found: Vec<std::net::IpAddr>) -> Vec<String> {
        match outcome {
            Ok(_) => {}
            Err(DumpFailure::QueueOverflow) => panic!("queue overflow"),
            Err(DumpFailure::Failed(message)) => panic!("{message}"),
        }
        let mut found: Vec<String> = found.iter().map(|a| a.to_string()).collect();
        found.sort();
        found
    }

    #[test]
    fn reads_what_a_single_thread_reads() {
        let mut socket = route_socket();
        let mut serial = Vec::new();
        let outcome = run_dump(&mut socket, address_dump_request, |replies, datagram| {
            collect_addresses(replies, &mut serial, datagram)
        });
        let serial = addresses(outcome, serial);
        let mut pipelined = Vec::new();
        let outcome = run(&mut socket, address_dump_request, |replies, datagram| {
            collect_addresses(replies, &mut pipelined, datagram)
        });
        let pipelined = addresses(outcome, pipelined);
        assert!(serial.iter().any(|a| a == "127.0.0.1"), "{serial:?}");
        assert_eq!(pipelined, serial);
    }

    #[test]
    fn a_parse_error_stops_the_reader_and_the_socket_stays_usable() {
        let mut socket = route_socket();
        let outcome = run(&mut socket, address_dump_request, |_, _| {
            Err("rejected by the test".to_string())
        });
        match outcome {
            Err(DumpFailure::Failed(message)) => assert_eq!(message, "rejected by the test"),
            _ => panic!("expected the parser's error"),
        }
        let mut found = Vec::new();
        let outcome = run(&mut socket, address_dump_request, |replies, datagram| {
            collect_addresses(replies, &mut found, datagram)
        });
        assert!(!addresses(outcome, found).is_empty());
    }
}
