/*!
`/dev/kmsg` records and what they mean for conntrack (pure: no I/O here).

A `/dev/kmsg` read returns exactly one record:

```text
PRIO,SEQ,TIMESTAMP_US,FLAGS[,more fields];MESSAGE\n
 KEY=value\n            (optional dictionary lines, each starting with a space)
```

where `PRIO` is `facility << 3 | level` and non-printable bytes of the message are
escaped as `\xNN`. [`KmsgRecord::parse`] decodes that; [`classify`] maps a message text to
a [`KernelEvent`]. [`kernel_message`] finds the kernel message inside a syslog or `dmesg`
line, so traces recorded from old logs classify the same way as live records.

Formats recognised (see `tests/fixtures/kmsg/` for the captured records):
- table full: `nf_conntrack: table full, dropping packet` (final dot optional), this 6.x
  kernel's `nf_conntrack: nf_conntrack: table full in netns N, dropping packet`, and the
  pre-2.6.20 `ip_conntrack: table full, dropping packet.`;
- `nf_conntrack: expectation table full`;
- `LIMITER: N callbacks suppressed`, where LIMITER is `__ratelimit` (old kernels),
  `net_ratelimit` (this kernel, shared by every `net_*_ratelimited` message) or the name of
  the function owning a private limit;
- SYN flooding, old `possible SYN flooding on port 443. Sending cookies.` and modern
  `TCP: request_sock_TCP: Possible SYN flooding on port 0.0.0.0:80. Sending cookies.`
  (IPv6: `[::]:443`).
*/

use super::KernelEvent;
use serde::{Deserialize, Serialize};

/// One decoded `/dev/kmsg` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsgRecord {
    /// Syslog facility (`PRIO >> 3`): 0 for the kernel itself.
    pub facility: u32,
    /// Syslog level (`PRIO & 7`): 4 is warning.
    pub level: u8,
    /// The record's sequence number; consecutive records differ by one.
    pub seq: u64,
    /// Microseconds since boot (monotonic clock) when the record was logged.
    pub timestamp_us: u64,
    /// The message, `\xNN` escapes undone (invalid UTF-8 replaced).
    pub message: String,
    /// Dictionary lines (`SUBSYSTEM=net`, `DEVICE=+acpi:...`), in order, unescaped.
    pub dictionary: Vec<(String, String)>,
}

/// Why bytes are not a `/dev/kmsg` record: what was expected and what was there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected {expected}, found {found:?}")]
pub struct KmsgError {
    pub expected: &'static str,
    pub found: String,
}

impl KmsgError {
    fn new(expected: &'static str, found: &[u8]) -> Self {
        // Enough of the offending bytes to recognise them, never a whole flood of them.
        const SHOWN: usize = 80;
        KmsgError {
            expected,
            found: String::from_utf8_lossy(&found[..found.len().min(SHOWN)]).into_owned(),
        }
    }
}

/// A classified record: what the kernel said, and where it sits in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KmsgEvent {
    pub seq: u64,
    pub timestamp_us: u64,
    pub event: KernelEvent,
}

impl KmsgRecord {
    /// Decodes one record as returned by one `read(2)` of `/dev/kmsg`.
    pub fn parse(bytes: &[u8]) -> Result<KmsgRecord, KmsgError> {
        if bytes.is_empty() {
            return Err(KmsgError::new(
                "a record `PRIO,SEQ,TIMESTAMP,FLAGS;MESSAGE`",
                bytes,
            ));
        }
        let semicolon = bytes.iter().position(|&b| b == b';').ok_or_else(|| {
            KmsgError::new("a `;` ending the header `PRIO,SEQ,TIMESTAMP,FLAGS`", bytes)
        })?;
        let (header, rest) = (&bytes[..semicolon], &bytes[semicolon + 1..]);
        let mut fields = header.split(|&b| b == b',');
        let prio = number_field(
            fields.next(),
            "a decimal PRIO as the first header field",
            header,
        )?;
        let seq = number_field(
            fields.next(),
            "a decimal SEQ as the second header field",
            header,
        )?;
        let timestamp_us = number_field(
            fields.next(),
            "a decimal TIMESTAMP (microseconds) as the third header field",
            header,
        )?;
        // FLAGS is `-` or `c`/`+` (continuation lines); nothing here depends on it, but a
        // header without it is not the documented format.
        if fields.next().is_none_or(<[u8]>::is_empty) {
            return Err(KmsgError::new(
                "a FLAGS field after `PRIO,SEQ,TIMESTAMP`",
                header,
            ));
        }
        let level = (prio & 7) as u8; // three bits always fit
        let facility = u32::try_from(prio >> 3)
            .map_err(|_| KmsgError::new("a PRIO that fits facility << 3 | level", header))?;

        let mut lines = rest
            .strip_suffix(b"\n")
            .unwrap_or(rest)
            .split(|&b| b == b'\n');
        let message = unescape(lines.next().unwrap_or_default());
        let mut dictionary = Vec::new();
        for line in lines {
            let entry = line
                .strip_prefix(b" ")
                .ok_or_else(|| KmsgError::new("dictionary lines starting with a space", line))?;
            let entry = unescape(entry);
            let (key, value) = entry.split_once('=').unwrap_or((&entry, ""));
            dictionary.push((key.to_owned(), value.to_owned()));
        }
        Ok(KmsgRecord {
            facility,
            level,
            seq,
            timestamp_us,
            message,
            dictionary,
        })
    }

    /// The record as an event, when its message is one ctguard cares about.
    pub fn event(&self) -> Option<KmsgEvent> {
        classify(&self.message).map(|event| KmsgEvent {
            seq: self.seq,
            timestamp_us: self.timestamp_us,
            event,
        })
    }
}

fn number_field(
    field: Option<&[u8]>,
    expected: &'static str,
    header: &[u8],
) -> Result<u64, KmsgError> {
    let field = field.ok_or_else(|| KmsgError::new(expected, header))?;
    if field.is_empty() || !field.iter().all(u8::is_ascii_digit) {
        return Err(KmsgError::new(expected, field));
    }
    // All ASCII digits, so only overflow can fail.
    std::str::from_utf8(field)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| KmsgError::new(expected, field))
}

/// Undoes the kernel's `\xNN` escaping; anything else (including a lone `\`) stays as is.
fn unescape(escaped: &[u8]) -> String {
    let mut bytes = Vec::with_capacity(escaped.len());
    let mut i = 0;
    while i < escaped.len() {
        if let [b'\\', b'x', hi, lo, ..] = escaped[i..]
            && let (Some(hi), Some(lo)) = (hex_digit(hi), hex_digit(lo))
        {
            bytes.push(hi << 4 | lo);
            i += 4;
        } else {
            bytes.push(escaped[i]);
            i += 1;
        }
    }
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn hex_digit(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// The kernel message inside a log line: after `kernel: ` (syslog, journal), without a
/// leading `[seconds.micros]` stamp (`dmesg`). A line that is neither is returned trimmed,
/// so bare messages pass through unchanged.
pub fn kernel_message(line: &str) -> &str {
    let message = match line.find(" kernel: ") {
        Some(at) => &line[at + " kernel: ".len()..],
        None => line,
    };
    let message = message.trim();
    if let Some(inside) = message.strip_prefix('[')
        && let Some((stamp, after)) = inside.split_once(']')
        && !stamp.trim().is_empty()
        && stamp
            .trim()
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.')
    {
        return after.trim_start();
    }
    message
}

/// What a kernel message means for conntrack, or `None` for everything else. Matching is
/// ASCII case-insensitive (old write-ups quote the messages capitalised) and ignores
/// anything after the recognised text (logs get annotated, truncated lines keep their
/// meaning).
pub fn classify(message: &str) -> Option<KernelEvent> {
    let message = message.trim_start();
    if let Some(rest) = strip_conntrack_tag(message) {
        // 6.x prints the tag twice: pr_fmt adds one to a message that already has it.
        let rest = strip_conntrack_tag(rest).unwrap_or(rest);
        if let Some(rest) = strip_prefix_ci(rest, "table full") {
            return table_full(rest);
        }
        if strip_prefix_ci(rest, "expectation table full").is_some() {
            return Some(KernelEvent::ExpectationTableFull);
        }
    }
    if let Some(event) = callbacks_suppressed(message) {
        return Some(event);
    }
    syn_flood(message)
}

/// Classifies a syslog / `dmesg` / bare line: [`classify`] of its [`kernel_message`].
pub fn classify_line(line: &str) -> Option<KernelEvent> {
    classify(kernel_message(line))
}

fn strip_conntrack_tag(message: &str) -> Option<&str> {
    strip_prefix_ci(message, "nf_conntrack: ")
        .or_else(|| strip_prefix_ci(message, "ip_conntrack: "))
}

/// After `table full`: `, dropping packet` or ` in netns N, dropping packet`.
fn table_full(rest: &str) -> Option<KernelEvent> {
    if strip_prefix_ci(rest, ", dropping packet").is_some() {
        return Some(KernelEvent::TableFull { netns: None });
    }
    let rest = strip_prefix_ci(rest, " in netns ")?;
    let digits = leading_digits(rest);
    strip_prefix_ci(&rest[digits.len()..], ", dropping packet")?;
    Some(KernelEvent::TableFull {
        netns: digits.parse().ok(),
    })
}

/// `LIMITER: N callbacks suppressed`, LIMITER one word of `[A-Za-z0-9_.-]`.
fn callbacks_suppressed(message: &str) -> Option<KernelEvent> {
    let (limiter, rest) = message.split_once(": ")?;
    if limiter.is_empty()
        || !limiter
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return None;
    }
    let digits = leading_digits(rest);
    strip_prefix_ci(&rest[digits.len()..], " callbacks suppressed")?;
    Some(KernelEvent::CallbacksSuppressed {
        limiter: limiter.to_owned(),
        count: digits.parse().ok()?,
    })
}

/// `... SYN flooding on port P. ...` where P is `443`, `0.0.0.0:80` or `[::]:443`.
fn syn_flood(message: &str) -> Option<KernelEvent> {
    const PHRASE: &str = "syn flooding on port ";
    let at = message
        .as_bytes()
        .windows(PHRASE.len())
        .position(|w| w.eq_ignore_ascii_case(PHRASE.as_bytes()))?;
    let target = message[at + PHRASE.len()..].split_whitespace().next()?;
    let target = target.trim_end_matches('.');
    let port = target.rsplit(':').next()?;
    Some(KernelEvent::SynFlood {
        port: port.parse().ok()?,
    })
}

fn strip_prefix_ci<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.as_bytes().get(..prefix.len())?;
    // `prefix` is ASCII, so a match ends on a char boundary.
    head.eq_ignore_ascii_case(prefix.as_bytes())
        .then(|| &text[prefix.len()..])
}

fn leading_digits(text: &str) -> &str {
    let end = text.bytes().take_while(u8::is_ascii_digit).count();
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kmsg");

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{FIXTURES}/{name}");
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// Splits concatenated reads back into records: a record ends at a newline that is not
    /// followed by a dictionary line (the kernel escapes newlines inside messages).
    fn split_records(bytes: &[u8]) -> Vec<&[u8]> {
        let mut records = Vec::new();
        let mut start = 0;
        for (i, &b) in bytes.iter().enumerate() {
            if b == b'\n' && bytes.get(i + 1) != Some(&b' ') {
                records.push(&bytes[start..=i]);
                start = i + 1;
            }
        }
        assert_eq!(start, bytes.len(), "fixture ends mid-record");
        records
    }

    const THIS_KERNEL_NETNS: u64 = 4026532177;

    #[test]
    fn parses_captured_table_full_records() {
        let bytes = fixture("table_full.bin");
        let records: Vec<KmsgRecord> = split_records(&bytes)
            .into_iter()
            .map(|r| KmsgRecord::parse(r).unwrap())
            .collect();
        assert_eq!(records.len(), 22);
        let first = &records[0];
        assert_eq!(
            (first.facility, first.level, first.seq, first.timestamp_us),
            (0, 4, 376, 423_430_778)
        );
        assert_eq!(first.message, "net_ratelimit: 1537 callbacks suppressed");
        assert!(first.dictionary.is_empty());
        for pair in records.windows(2) {
            assert_eq!(
                pair[1].seq,
                pair[0].seq + 1,
                "captured records are consecutive"
            );
        }

        let events: Vec<KernelEvent> = records.iter().map(|r| r.event().unwrap().event).collect();
        let full = KernelEvent::TableFull {
            netns: Some(THIS_KERNEL_NETNS),
        };
        assert_eq!(events.iter().filter(|e| **e == full).count(), 20);
        assert_eq!(
            events[11],
            KernelEvent::CallbacksSuppressed {
                limiter: "net_ratelimit".into(),
                count: 3495
            }
        );
    }

    #[test]
    fn parses_captured_syn_flood_records() {
        let bytes = fixture("syn_flood.bin");
        let events: Vec<KmsgEvent> = split_records(&bytes)
            .into_iter()
            .map(|r| KmsgRecord::parse(r).unwrap().event().unwrap())
            .collect();
        assert_eq!(
            events,
            vec![
                KmsgEvent {
                    seq: 553,
                    timestamp_us: 735_354_522,
                    event: KernelEvent::SynFlood { port: 8080 }
                },
                KmsgEvent {
                    seq: 554,
                    timestamp_us: 735_556_392,
                    event: KernelEvent::SynFlood { port: 8443 }
                },
            ]
        );
    }

    #[test]
    fn parses_dictionary_lines() {
        let record = KmsgRecord::parse(&fixture("dict_record.bin")).unwrap();
        assert_eq!(
            (record.level, record.seq, record.timestamp_us),
            (6, 193, 294_235)
        );
        assert!(
            record
                .message
                .starts_with("acpi PNP0A08:00: _OSC: OS supports")
        );
        assert_eq!(
            record.dictionary,
            vec![
                ("SUBSYSTEM".to_owned(), "acpi".to_owned()),
                ("DEVICE".to_owned(), "+acpi:PNP0A08:00".to_owned())
            ]
        );
        assert_eq!(record.event(), None);
    }

    #[test]
    fn unescapes_messages_and_dictionary() {
        let record = KmsgRecord::parse(
            b"12,7,99,-,caller=T1;tab\\x09here \\x5cx41 \\xzz \\xc3\\xa9\\xff\n KEY=a\\x3db\n",
        )
        .unwrap();
        assert_eq!((record.facility, record.level), (1, 4));
        assert_eq!(record.message, "tab\there \\x41 \\xzz \u{e9}\u{fffd}");
        assert_eq!(
            record.dictionary,
            vec![("KEY".to_owned(), "a=b".to_owned())]
        );
    }

    #[test]
    fn malformed_records_say_what_was_expected() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "a record"),
            (b"4,376,4234", "a `;` ending the header"),
            (b"x,1,2,-;m\n", "a decimal PRIO"),
            (b"4,,2,-;m\n", "a decimal SEQ"),
            (b"4,1,-2,-;m\n", "a decimal TIMESTAMP"),
            (b"4,1;m\n", "a decimal TIMESTAMP"),
            (b"4,1,2;m\n", "a FLAGS field"),
            (b"4,1,2,;m\n", "a FLAGS field"),
            (b"4,99999999999999999999,2,-;m\n", "a decimal SEQ"),
            (b"4,1,2,-;m\nnot a dictionary\n", "dictionary lines"),
        ];
        for (bytes, expected) in cases {
            let err = KmsgRecord::parse(bytes).unwrap_err();
            assert!(
                err.to_string().starts_with(&format!("expected {expected}")),
                "{:?}: {err}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn table_full_in_every_format() {
        let cases = [
            ("nf_conntrack: table full, dropping packet", None),
            ("nf_conntrack: table full, dropping packet.", None),
            ("ip_conntrack: table full, dropping packet.", None),
            (
                "nf_conntrack: nf_conntrack: table full in netns 4026532177, dropping packet",
                Some(THIS_KERNEL_NETNS),
            ),
            (
                "nf_conntrack: table full in netns 4026531840, dropping packet",
                Some(4026531840),
            ),
            // Seed 002 quotes it capitalised.
            ("Ip_conntrack: Table full, dropping Packet", None),
        ];
        for (message, netns) in cases {
            assert_eq!(
                classify(message),
                Some(KernelEvent::TableFull { netns }),
                "{message}"
            );
        }
    }

    #[test]
    fn other_conntrack_and_tcp_messages() {
        let cases = [
            (
                "nf_conntrack: expectation table full",
                KernelEvent::ExpectationTableFull,
            ),
            (
                "__ratelimit: 83 callbacks suppressed",
                KernelEvent::CallbacksSuppressed {
                    limiter: "__ratelimit".into(),
                    count: 83,
                },
            ),
            (
                "nf_conntrack: 12 callbacks suppressed",
                KernelEvent::CallbacksSuppressed {
                    limiter: "nf_conntrack".into(),
                    count: 12,
                },
            ),
            (
                "possible SYN flooding on port 443. Sending cookies.",
                KernelEvent::SynFlood { port: 443 },
            ),
            (
                "TCP: request_sock_TCP: Possible SYN flooding on port 0.0.0.0:80. Sending cookies.",
                KernelEvent::SynFlood { port: 80 },
            ),
            (
                "TCP: request_sock_TCPv6: Possible SYN flooding on port [::]:443. Sending cookies.",
                KernelEvent::SynFlood { port: 443 },
            ),
            (
                "TCP: request_sock_TCP: Possible SYN flooding on port 8080. Sending cookies.  Check SNMP counters.",
                KernelEvent::SynFlood { port: 8080 },
            ),
        ];
        for (message, event) in cases {
            assert_eq!(classify(message), Some(event), "{message}");
        }
    }

    #[test]
    fn unrelated_and_near_miss_messages_are_not_events() {
        for message in [
            "",
            "Linux version 6.18.44-fc-v669",
            "nf_conntrack: default automatic helper assignment has been turned off",
            "nf_conntrack: table full in netns 12",
            "nf_conntrack: table full in netns , dropping",
            "a b: 3 callbacks suppressed",
            "net_ratelimit: many callbacks suppressed",
            "possible SYN flooding on port 70000. Sending cookies.",
            "possible SYN flooding on port ",
        ] {
            assert_eq!(classify(message), None, "{message:?}");
        }
    }

    #[test]
    fn seed_003_syslog_lines() {
        let text = String::from_utf8(fixture("seed003_syslog.txt")).unwrap();
        let events: Vec<Option<KernelEvent>> = text.lines().map(classify_line).collect();
        assert_eq!(text.lines().count(), 29);
        // The write-up annotated this line; the count still reads.
        assert_eq!(
            events[0],
            Some(KernelEvent::CallbacksSuppressed {
                limiter: "__ratelimit".into(),
                count: 16523
            })
        );
        assert!(
            events[1..11]
                .iter()
                .all(|e| *e == Some(KernelEvent::TableFull { netns: None }))
        );
        let syn = events
            .iter()
            .flatten()
            .filter(|e| **e == KernelEvent::SynFlood { port: 443 });
        // Seven, the last one cut short mid-sentence in the seed.
        assert_eq!(syn.count(), 7);
        // cron and sshd lines are not kernel events.
        assert_eq!(events.iter().flatten().count(), 1 + 10 + 7);
    }

    #[test]
    fn seed_001_dmesg_lines() {
        let text = String::from_utf8(fixture("seed001_dmesg.txt")).unwrap();
        let events: Vec<KernelEvent> = text.lines().map(|l| classify_line(l).unwrap()).collect();
        assert_eq!(events.len(), 13);
        assert!(
            events[..12]
                .iter()
                .all(|e| *e == KernelEvent::TableFull { netns: None })
        );
        assert_eq!(
            events[12],
            KernelEvent::CallbacksSuppressed {
                limiter: "__ratelimit".into(),
                count: 83
            }
        );
    }

    #[test]
    fn kernel_message_strips_syslog_and_dmesg_framing() {
        let cases = [
            (
                "Apr 10 12:48:35 bj-xx kernel: [95129.138806] nf_conntrack: table full, dropping packet.",
                "nf_conntrack: table full, dropping packet.",
            ),
            (
                "Apr 10 12:48:35 host kernel: nf_conntrack: x",
                "nf_conntrack: x",
            ),
            ("[ 1737157.057528] nf_conntrack: x", "nf_conntrack: x"),
            // Seed 004 quotes the bare message.
            (
                "ip_conntrack: table full, dropping packet",
                "ip_conntrack: table full, dropping packet",
            ),
            (
                "[Firmware Bug]: TSC doesn't count",
                "[Firmware Bug]: TSC doesn't count",
            ),
            ("[]", "[]"),
        ];
        for (line, message) in cases {
            assert_eq!(kernel_message(line), message, "{line}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(record) = KmsgRecord::parse(&bytes) {
                let _ = record.event();
            }
            let text = String::from_utf8_lossy(&bytes);
            let _ = classify(&text);
            let _ = classify_line(&text);
        }

        #[test]
        fn record_shaped_bytes_never_panic(
            header in "[0-9,x-]{0,30}",
            message in "(\\\\x[0-9a-fA-F]{0,2}|[ -~]|\n ?){0,60}",
        ) {
            let bytes = format!("{header};{message}");
            if let Ok(record) = KmsgRecord::parse(bytes.as_bytes()) {
                let _ = record.event();
            }
        }

        #[test]
        fn classifier_never_panics_near_known_messages(
            prefix in "(nf_conntrack: |ip_conntrack: |TCP: |[a-z_]{0,8}: )*",
            body in "(table full|expectation table full| in netns |[0-9]{0,25}|, dropping packet| callbacks suppressed|possible SYN flooding on port |[\\[\\]:.]|[^\\x00]){0,8}",
        ) {
            let _ = classify(&format!("{prefix}{body}"));
        }
    }
}
