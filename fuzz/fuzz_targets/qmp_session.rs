//! One QMP connection (`hvmdm_toolstack::qmp::Session`) with a tiny dispatcher, fed a byte stream
//! built from raw junk, QMP-shaped fragments, well-formed commands with odd arguments and ids, and
//! oversized values (past `MAX_MESSAGE`), cut into chunks at arbitrary points; some chunks carry a
//! file descriptor (SCM_RIGHTS as the server would pass it).
//!
//! Checks beyond "no panic/hang/leak":
//! - every batch of output is a sequence of complete `\r\n`-terminated lines, each one JSON object
//!   with exactly one of `QMP` (greeting, first line only), `return`, `error` or `event`;
//! - output stays bounded: at most 4 KiB + 128 bytes per input byte, and no unanswered input
//!   remains once all output has been taken;
//! - after the junk, a terminator derived from the decoder's resync rules (close an open escape,
//!   string and every open bracket, or end a bare token) followed by
//!   `{"execute":"query-version","id":"fuzz-sentinel"}` is answered, last, with the version (or,
//!   before negotiation, `CommandNotFound`);
//! - no file descriptor outlives the session.
#![no_main]

use std::os::fd::OwnedFd;

use arbitrary::Arbitrary;
use hvmdm_toolstack::qmp::{Args, Dispatcher, FdStore, QmpError, Session, Version, MAX_MESSAGE};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};

struct Tiny {
    fds: FdStore,
    running: bool,
}

impl Dispatcher for Tiny {
    fn commands(&self) -> &[&str] {
        &["query-status", "stop", "cont", "echo", "fail"]
    }
    fn execute(&mut self, cmd: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        let r = match cmd {
            "query-status" => {
                json!({"status": if self.running {"running"} else {"paused"}, "running": self.running})
            }
            "stop" => {
                self.running = false;
                json!({})
            }
            "cont" => {
                self.running = a.opt_bool("force")?.unwrap_or(true);
                json!({})
            }
            // Whatever the client sent comes back: escaping of arbitrary strings/numbers.
            "echo" => return Ok(Value::Object(args.clone())),
            "fail" => return Err(QmpError::generic(a.opt_str("why")?.unwrap_or("failed").to_string())),
            _ => return Err(QmpError::command_not_found(cmd)),
        };
        a.finish()?;
        Ok(r)
    }
    fn fds(&mut self) -> &mut FdStore {
        &mut self.fds
    }
}

const COMMANDS: [&str; 16] = [
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "add-fd",
    "remove-fd",
    "query-fdsets",
    "getfd",
    "closefd",
    "query-status",
    "stop",
    "cont",
    "echo",
    "fail",
    "xen-save-devices-state",
    "",
    "query-version\u{0}",
];
const KEYS: [&str; 10] =
    ["fdset-id", "fd", "opaque", "fdname", "enable", "force", "why", "x", "id", "execute"];
const FRAGMENTS: [&str; 16] = [
    "{",
    "}",
    "[",
    "]",
    "\"",
    "\\",
    "\\\"",
    "{\"execute\":",
    "\"arguments\":{",
    ",\"id\":",
    "\r\n",
    "\"\\u0000\\ud800\"",
    "1e99999",
    "-0.0",
    "true false null",
    "\u{feff}",
];

#[derive(Arbitrary, Debug)]
enum ArgVal {
    Int(i64),
    Uint(u64),
    Float(f64),
    Str(String),
    Bool(bool),
    Null,
    List(Vec<u8>),
    Object(u8),
}

impl ArgVal {
    fn to_value(&self) -> Value {
        match self {
            ArgVal::Int(i) => json!(i),
            ArgVal::Uint(u) => json!(u),
            ArgVal::Float(f) => json!(f),
            ArgVal::Str(s) => json!(s),
            ArgVal::Bool(b) => json!(b),
            ArgVal::Null => Value::Null,
            ArgVal::List(l) => {
                json!(l.iter().take(8).map(|&b| KEYS[usize::from(b) % KEYS.len()]).collect::<Vec<_>>())
            }
            ArgVal::Object(k) => json!({KEYS[usize::from(*k) % KEYS.len()]: {"a": [1, {}]}}),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Id {
    Int(i64),
    Str(String),
    Object,
    Null,
}

#[derive(Arbitrary, Debug)]
enum Piece {
    Raw(Vec<u8>),
    Fragment(u8),
    Command {
        name: u8,
        id: Option<Id>,
        args: Option<Vec<(u8, ArgVal)>>,
        extra_member: bool,
    },
    /// Up to 15 KiB of one byte, or just over `MAX_MESSAGE` (at most once per input).
    Big {
        byte: u8,
        kib: u16,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    negotiate: bool,
    pieces: Vec<Piece>,
    /// Chunk lengths; the rest goes in one chunk.
    splits: Vec<u16>,
    /// Which chunks carry a descriptor.
    fd_mask: u32,
}

/// Mirror of the decoder's lexical state (see `toolstack-glue/src/qmp/decoder.rs`), so the
/// harness can build a terminator that ends whatever the junk left open.
#[derive(Default)]
struct Lexer {
    state: u8, // 0 idle, 1 container, 2 top-level string, 3 bare token
    depth: u64,
    in_str: bool,
    esc: bool,
}

impl Lexer {
    fn push(&mut self, data: &[u8]) {
        for &b in data {
            loop {
                match self.state {
                    0 => match b {
                        b' ' | b'\t' | b'\r' | b'\n' => {}
                        b'{' | b'[' => (self.state, self.depth, self.in_str, self.esc) = (1, 1, false, false),
                        b'"' => (self.state, self.esc) = (2, false),
                        _ => self.state = 3,
                    },
                    1 if self.in_str => {
                        if self.esc {
                            self.esc = false;
                        } else if b == b'\\' {
                            self.esc = true;
                        } else if b == b'"' {
                            self.in_str = false;
                        }
                    }
                    1 => match b {
                        b'"' => self.in_str = true,
                        b'{' | b'[' => self.depth += 1,
                        b'}' | b']' => {
                            self.depth -= 1;
                            if self.depth == 0 {
                                self.state = 0;
                            }
                        }
                        _ => {}
                    },
                    2 => {
                        if self.esc {
                            self.esc = false;
                        } else if b == b'\\' {
                            self.esc = true;
                        } else if b == b'"' {
                            self.state = 0;
                        }
                    }
                    _ => {
                        if matches!(b, b' ' | b'\t' | b'\r' | b'\n' | b'{' | b'[' | b'"') {
                            self.state = 0;
                            continue; // the delimiter starts the next item
                        }
                    }
                }
                break;
            }
        }
    }

    /// Bytes that bring the decoder back to idle.
    fn terminator(&self) -> Vec<u8> {
        let mut t = Vec::new();
        match self.state {
            1 => {
                if self.in_str {
                    if self.esc {
                        t.push(b'x');
                    }
                    t.push(b'"');
                }
                t.resize(t.len() + self.depth as usize, b']');
            }
            2 => {
                if self.esc {
                    t.push(b'x');
                }
                t.push(b'"');
            }
            3 => t.push(b'\n'),
            _ => {}
        }
        t
    }
}

fn build_stream(pieces: &[Piece]) -> Vec<u8> {
    let mut s = Vec::new();
    let mut big_done = false;
    for p in pieces.iter().take(64) {
        match p {
            Piece::Raw(b) => s.extend_from_slice(b),
            Piece::Fragment(i) => {
                s.extend_from_slice(FRAGMENTS[usize::from(*i) % FRAGMENTS.len()].as_bytes())
            }
            Piece::Command { name, id, args, extra_member } => {
                let mut m = Map::new();
                m.insert("execute".into(), json!(COMMANDS[usize::from(*name) % COMMANDS.len()]));
                if let Some(args) = args {
                    let a: Map<String, Value> = args
                        .iter()
                        .take(6)
                        .map(|(k, v)| (KEYS[usize::from(*k) % KEYS.len()].to_string(), v.to_value()))
                        .collect();
                    m.insert("arguments".into(), Value::Object(a));
                }
                match id {
                    Some(Id::Int(i)) => _ = m.insert("id".into(), json!(i)),
                    Some(Id::Str(st)) => _ = m.insert("id".into(), json!(st)),
                    Some(Id::Object) => _ = m.insert("id".into(), json!({"a": [1, 2, {"b": null}]})),
                    Some(Id::Null) => _ = m.insert("id".into(), Value::Null),
                    None => {}
                }
                if *extra_member {
                    m.insert("control".into(), json!({}));
                }
                s.extend_from_slice(Value::Object(m).to_string().as_bytes());
            }
            Piece::Big { byte, kib } if !big_done => {
                big_done = true;
                // Past MAX_MESSAGE only for one in 16 values (it costs ~10 ms with ASan).
                let n = if kib % 64 == 63 {
                    MAX_MESSAGE + usize::from(*kib)
                } else {
                    usize::from(*kib) % 16 * 1024
                };
                // A run of '"' would be ~500k two-byte strings (one error reply each): the session
                // copes, but at ~20 s per input under ASan.
                s.resize(s.len() + n, if *byte == b'"' { b'\'' } else { *byte });
            }
            Piece::Big { .. } => {}
        }
    }
    s
}

/// Checks one batch of output and returns its lines.
fn check_output(out: &[u8], first: bool) -> Vec<Value> {
    if out.is_empty() {
        return Vec::new();
    }
    let text = std::str::from_utf8(out).unwrap_or_else(|e| panic!("output not UTF-8: {e}"));
    assert!(
        text.ends_with("\r\n"),
        "output does not end with CRLF: {:?}",
        &text[text.len().saturating_sub(80)..]
    );
    let mut lines = Vec::new();
    for (i, line) in text.split_terminator("\r\n").enumerate() {
        assert!(!line.contains('\n') && !line.contains('\r'), "bare CR/LF inside a reply: {line:?}");
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {line:?}"));
        let Value::Object(o) = &v else { panic!("reply is not an object: {line:?}") };
        let kinds = ["QMP", "return", "error", "event"].iter().filter(|k| o.contains_key(**k)).count();
        assert_eq!(kinds, 1, "reply must have exactly one of QMP/return/error/event: {line:?}");
        assert_eq!(o.contains_key("QMP"), first && i == 0, "greeting misplaced: {line:?}");
        if let Some(e) = o.get("error") {
            assert!(e["class"].is_string() && e["desc"].is_string(), "malformed error: {line:?}");
        }
        lines.push(v);
    }
    lines
}

fuzz_target!(|input: Input| {
    // The lowest free descriptor number now must be free again afterwards (no fd leaked).
    let probe = std::fs::File::open("/dev/null").map(OwnedFd::from).ok();
    let probe_no = probe.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
    drop(probe);

    {
        let mut d = Tiny { fds: FdStore::new(), running: false };
        let mut s = Session::new(&Version::default());
        let greeting = check_output(&s.take_output(), true);
        assert_eq!(greeting.len(), 1);
        let mut total_in = 0usize;
        let mut total_out = 0usize;
        let mut feed = |s: &mut Session, d: &mut Tiny, chunk: &[u8], fd: bool| {
            let fds: Vec<OwnedFd> = if fd {
                std::fs::File::open("/dev/null").map(OwnedFd::from).into_iter().collect()
            } else {
                Vec::new()
            };
            s.receive(chunk, fds, d);
            total_in += chunk.len();
            let mut rounds = 0;
            loop {
                let out = s.take_output();
                total_out += out.len();
                check_output(&out, false);
                if !s.has_pending_input() {
                    break;
                }
                rounds += 1;
                assert!(rounds < 10_000, "session makes no progress");
                s.process(d);
            }
            assert!(
                total_out <= 4096 + 128 * total_in,
                "{total_out} bytes of output for {total_in} bytes of input"
            );
        };
        if input.negotiate {
            feed(&mut s, &mut d, b"{\"execute\":\"qmp_capabilities\"}", false);
            assert!(s.is_negotiated());
        }
        let stream = build_stream(&input.pieces);
        let mut lexer = Lexer::default();
        let mut rest = &stream[..];
        for (i, &n) in input.splits.iter().enumerate() {
            if rest.is_empty() {
                break;
            }
            let n = usize::from(n) % (rest.len() + 1);
            let (chunk, tail) = rest.split_at(n);
            lexer.push(chunk);
            feed(&mut s, &mut d, chunk, input.fd_mask >> (i % 32) & 1 != 0);
            rest = tail;
        }
        lexer.push(rest);
        feed(&mut s, &mut d, rest, false);

        let term = lexer.terminator();
        assert!(term.len() <= stream.len() + 2, "terminator longer than the junk");
        let sentinel = b"{\"execute\":\"query-version\",\"id\":\"fuzz-sentinel\"}";
        let mut tail = term;
        tail.extend_from_slice(sentinel);
        s.receive(&tail, Vec::new(), &mut d);
        let out = s.take_output();
        let lines = check_output(&out, false);
        assert!(!s.has_pending_input(), "input left unanswered after the sentinel");
        let last = lines
            .last()
            .unwrap_or_else(|| panic!("no reply to the sentinel (after {} junk bytes)", stream.len()));
        assert_eq!(last["id"], json!("fuzz-sentinel"), "last reply is not the sentinel's: {last}");
        if s.is_negotiated() {
            assert_eq!(last["return"]["qemu"]["major"], json!(7), "sentinel reply: {last}");
        } else {
            assert_eq!(last["error"]["class"], json!("CommandNotFound"), "sentinel reply: {last}");
        }
        assert!(lines.len() <= 2, "terminator produced {} replies", lines.len() - 1);
    }

    if let Some(no) = probe_no {
        let again = std::fs::File::open("/dev/null").map(OwnedFd::from).expect("reopen /dev/null");
        assert_eq!(std::os::fd::AsRawFd::as_raw_fd(&again), no, "a file descriptor leaked");
    }
});
