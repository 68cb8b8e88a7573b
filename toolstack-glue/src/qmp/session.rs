//! One QMP connection's protocol state: bytes (and SCM_RIGHTS fds) in, reply bytes out.

use super::decoder::{Decoder, Frame};
use super::{Args, Dispatcher, ErrorClass, Event, QmpError, Version};
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::os::fd::OwnedFd;

/// Largest accepted input message (libxl's own receive buffer is 1 MiB too).
pub const MAX_MESSAGE: usize = 1 << 20;
/// Above this much unsent output the session stops executing queued commands (and asks for no
/// more input) until the peer reads; events beyond it are dropped.
pub const OUTPUT_HIGH_WATER: usize = 1 << 20;
/// Descriptors queued without a command to consume them are capped (extra ones are closed).
const MAX_PENDING_FDS: usize = 16;

/// Commands the session answers itself, whatever the dispatcher implements.
pub const BUILTIN_COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "add-fd",
    "remove-fd",
    "query-fdsets",
    "getfd",
    "closefd",
];

pub struct Session {
    version: Version,
    decoder: Decoder,
    frames: VecDeque<Frame>,
    queued_bytes: usize,
    negotiated: bool,
    out: Vec<u8>,
    /// Received descriptors with the stream offset of the byte they arrived with.
    fds: VecDeque<(u64, OwnedFd)>,
}

impl Session {
    /// A new connection; the greeting is already queued as output.
    pub fn new(version: &Version) -> Self {
        Self {
            version: version.clone(),
            decoder: Decoder::new(MAX_MESSAGE),
            frames: VecDeque::new(),
            queued_bytes: 0,
            negotiated: false,
            out: version.greeting(),
            fds: VecDeque::new(),
        }
    }

    /// Whether `qmp_capabilities` has succeeded (command mode).
    pub fn is_negotiated(&self) -> bool {
        self.negotiated
    }

    /// Whether the transport should read more now (backpressure: unanswered input or unsent
    /// output above the limits).
    pub fn wants_input(&self) -> bool {
        self.out.len() < OUTPUT_HIGH_WATER && self.queued_bytes < MAX_MESSAGE
    }

    /// True while received input has not been fully executed (complete or partial messages).
    pub fn has_pending_input(&self) -> bool {
        !self.frames.is_empty()
    }

    /// Unsent output.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// Drops `n` bytes of output that were sent.
    pub fn consume_output(&mut self, n: usize) {
        self.out.drain(..n.min(self.out.len()));
    }

    /// Takes all unsent output.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Feeds received bytes; `fds` arrived with the first of them. Executes every complete
    /// command while output has room.
    pub fn receive(&mut self, data: &[u8], fds: Vec<OwnedFd>, d: &mut dyn Dispatcher) {
        let at = self.decoder.offset();
        for fd in fds {
            if self.fds.len() < MAX_PENDING_FDS {
                self.fds.push_back((at, fd));
            } else {
                log::warn!("qmp: dropping a received file descriptor (too many pending)");
            }
        }
        let mut frames = Vec::new();
        self.decoder.push(data, &mut frames);
        for f in frames {
            if let Frame::Value { bytes, .. } = &f {
                self.queued_bytes += bytes.len();
            }
            self.frames.push_back(f);
        }
        self.process(d);
    }

    /// Executes queued commands while output has room; call again after output drained.
    pub fn process(&mut self, d: &mut dyn Dispatcher) {
        while self.out.len() < OUTPUT_HIGH_WATER {
            let Some(frame) = self.frames.pop_front() else { break };
            let reply = match frame {
                Frame::TooLarge { end } => {
                    self.drop_fds_before(end);
                    log::warn!("qmp: input message over {MAX_MESSAGE} bytes discarded");
                    error_reply(
                        None,
                        &QmpError::generic(format!("JSON parse error, message exceeds {MAX_MESSAGE} bytes")),
                    )
                }
                Frame::Value { bytes, end } => {
                    self.queued_bytes -= bytes.len();
                    let mut fds: VecDeque<OwnedFd> = VecDeque::new();
                    while self.fds.front().is_some_and(|(at, _)| *at < end) {
                        if let Some((_, fd)) = self.fds.pop_front() {
                            fds.push_back(fd);
                        }
                    }
                    // Descriptors the command does not consume are closed here, as QEMU does.
                    self.handle(&bytes, &mut fds, d)
                }
            };
            self.out.extend_from_slice(&reply);
        }
    }

    fn drop_fds_before(&mut self, end: u64) {
        while self.fds.front().is_some_and(|(at, _)| *at < end) {
            self.fds.pop_front();
        }
    }

    /// Queues an event if the session is in command mode and output has room.
    pub fn push_event(&mut self, ev: &Event) -> bool {
        if !self.negotiated || self.out.len() >= OUTPUT_HIGH_WATER {
            return false;
        }
        self.out.extend_from_slice(&ev.encode());
        true
    }

    fn handle(&mut self, bytes: &[u8], fds: &mut VecDeque<OwnedFd>, d: &mut dyn Dispatcher) -> Vec<u8> {
        let value: Value = match serde_json::from_slice(bytes) {
            Ok(v) => v,
            Err(e) => {
                log::warn!("qmp: unparsable input ({e})");
                return error_reply(None, &QmpError::generic(format!("JSON parse error, {e}")));
            }
        };
        let Value::Object(req) = value else {
            return error_reply(None, &QmpError::generic("QMP input must be a JSON object"));
        };
        let id = req.get("id");
        let result = check_request(&req).and_then(|(cmd, args)| self.dispatch(cmd, args, fds, d));
        match result {
            Ok(v) => return_reply(id, &v),
            Err(e) => error_reply(id, &e),
        }
    }

    fn dispatch(
        &mut self,
        cmd: &str,
        args: &Map<String, Value>,
        fds: &mut VecDeque<OwnedFd>,
        d: &mut dyn Dispatcher,
    ) -> Result<Value, QmpError> {
        if !self.negotiated {
            if cmd == "qmp_capabilities" {
                self.capabilities(args)?;
                self.negotiated = true;
                return Ok(json!({}));
            }
            return Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        match cmd {
            "qmp_capabilities" => Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            )),
            "query-version" => {
                Args::new(args).finish()?;
                Ok(self.version.to_value())
            }
            "query-commands" => {
                Args::new(args).finish()?;
                let names = BUILTIN_COMMANDS
                    .iter()
                    .chain(d.commands().iter().filter(|c| !BUILTIN_COMMANDS.contains(c)));
                Ok(Value::Array(names.map(|n| json!({"name": n})).collect()))
            }
            "add-fd" => {
                let mut a = Args::new(args);
                let fdset_id = a.opt_int("fdset-id")?;
                let opaque = a.opt_str("opaque")?.map(str::to_string);
                a.finish()?;
                let fd = fds.pop_front().ok_or_else(no_fd)?;
                let (id, fd) = d.fds().add(fdset_id, fd, opaque)?;
                Ok(json!({"fdset-id": id, "fd": fd}))
            }
            "remove-fd" => {
                let mut a = Args::new(args);
                let fdset_id = a.int("fdset-id")?;
                let fd = a.opt_int("fd")?;
                a.finish()?;
                d.fds().remove(fdset_id, fd)?;
                Ok(json!({}))
            }
            "query-fdsets" => {
                Args::new(args).finish()?;
                Ok(d.fds().query())
            }
            "getfd" => {
                let mut a = Args::new(args);
                let name = a.str("fdname")?;
                a.finish()?;
                let fd = fds.pop_front().ok_or_else(no_fd)?;
                d.fds().set_named(name, fd)?;
                Ok(json!({}))
            }
            "closefd" => {
                let mut a = Args::new(args);
                let name = a.str("fdname")?;
                a.finish()?;
                d.fds().close_named(name)?;
                Ok(json!({}))
            }
            _ if d.commands().contains(&cmd) => d.execute(cmd, args),
            _ => Err(QmpError::command_not_found(cmd)),
        }
    }

    fn capabilities(&self, args: &Map<String, Value>) -> Result<(), QmpError> {
        let mut a = Args::new(args);
        let enable = a.opt_array("enable")?;
        a.finish()?;
        // No capability is offered, so any listed one is refused (the first decides the error).
        if let Some(cap) = enable.and_then(|e| e.first()) {
            return Err(match cap {
                Value::String(s) if s == "oob" => QmpError::generic("Capability oob not available"),
                Value::String(s) => {
                    QmpError::generic(format!("Parameter 'enable[0]' does not accept value '{s}'"))
                }
                _ => QmpError::invalid_parameter_type("enable[0]", "string"),
            });
        }
        Ok(())
    }
}

fn no_fd() -> QmpError {
    QmpError::generic("No file descriptor supplied via SCM_RIGHTS")
}

/// QEMU's `qmp_dispatch_check_obj`: the command name and arguments of a well-formed request.
fn check_request(req: &Map<String, Value>) -> Result<(&str, &Map<String, Value>), QmpError> {
    static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
    let mut cmd = None;
    let mut args = None;
    for (k, v) in req {
        match k.as_str() {
            "execute" => match v {
                Value::String(s) => cmd = Some(s.as_str()),
                _ => return Err(QmpError::generic("QMP input member 'execute' must be a string")),
            },
            "arguments" => match v {
                Value::Object(o) => args = Some(o),
                _ => return Err(QmpError::generic("QMP input member 'arguments' must be an object")),
            },
            "id" => {}
            other => return Err(QmpError::generic(format!("QMP input member '{other}' is unexpected"))),
        }
    }
    let cmd = cmd.ok_or_else(|| QmpError::generic("QMP input lacks member 'execute'"))?;
    Ok((cmd, args.unwrap_or_else(|| EMPTY.get_or_init(Map::new))))
}

fn return_reply(id: Option<&Value>, v: &Value) -> Vec<u8> {
    let mut s = format!("{{\"return\":{v}");
    if let Some(id) = id {
        s.push_str(&format!(",\"id\":{id}"));
    }
    s.push_str("}\r\n");
    s.into_bytes()
}

fn error_reply(id: Option<&Value>, e: &QmpError) -> Vec<u8> {
    let mut s = String::from("{");
    if let Some(id) = id {
        s.push_str(&format!("\"id\":{id},"));
    }
    s.push_str(&format!(
        "\"error\":{{\"class\":\"{}\",\"desc\":{}}}}}\r\n",
        e.class.as_str(),
        Value::String(e.desc.clone())
    ));
    s.into_bytes()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::FdStore;
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    /// A dispatcher with `query-status` and `stop`, recording calls.
    #[derive(Default)]
    pub(crate) struct TestMachine {
        pub(crate) fds: FdStore,
        pub(crate) calls: Vec<String>,
        pub(crate) running: bool,
    }

    impl Dispatcher for TestMachine {
        fn commands(&self) -> &[&str] {
            &["query-status", "stop", "cont", "xen-set-global-dirty-log"]
        }
        fn execute(&mut self, cmd: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
            self.calls.push(cmd.to_string());
            let mut a = Args::new(args);
            let r = match cmd {
                "query-status" => {
                    json!({"status": if self.running {"running"} else {"paused"}, "running": self.running, "singlestep": false})
                }
                "stop" => {
                    self.running = false;
                    json!({})
                }
                "cont" => {
                    self.running = true;
                    json!({})
                }
                "xen-set-global-dirty-log" => {
                    a.bool("enable")?;
                    json!({})
                }
                _ => return Err(QmpError::command_not_found(cmd)),
            };
            a.finish()?;
            Ok(r)
        }
        fn fds(&mut self) -> &mut FdStore {
            &mut self.fds
        }
    }

    fn lines(out: &[u8]) -> Vec<Value> {
        let s = std::str::from_utf8(out).unwrap();
        assert!(s.is_empty() || s.ends_with("\r\n"), "{s:?}");
        s.split_terminator("\r\n").map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn session() -> (Session, TestMachine) {
        (Session::new(&Version::default()), TestMachine::default())
    }

    fn exchange(s: &mut Session, m: &mut TestMachine, input: &str) -> Vec<Value> {
        s.receive(input.as_bytes(), Vec::new(), m);
        lines(&s.take_output())
    }

    fn negotiated() -> (Session, TestMachine) {
        let (mut s, mut m) = session();
        s.take_output();
        let r = exchange(&mut s, &mut m, "{\"execute\":\"qmp_capabilities\",\"id\":1}\r\n");
        assert_eq!(r, vec![json!({"return": {}, "id": 1})]);
        (s, m)
    }

    #[test]
    fn greeting_shape_and_bytes() {
        let (mut s, _) = session();
        let out = s.take_output();
        assert!(out.ends_with(b"}\r\n"));
        let text = std::str::from_utf8(&out).unwrap();
        assert!(!text.contains(": ") && !text.contains(", "), "compact: {text}");
        let g = &lines(&out)[0];
        assert_eq!(g["QMP"]["version"]["qemu"], json!({"major": 7, "minor": 2, "micro": 0}));
        assert!(g["QMP"]["version"]["package"].as_str().unwrap().starts_with("hvmdm"));
        assert_eq!(g["QMP"]["capabilities"], json!([]));
        let v = Version { major: 8, minor: 1, micro: 3, package: "p \"q\"".into() };
        assert_eq!(
            String::from_utf8(v.greeting()).unwrap(),
            "{\"QMP\":{\"version\":{\"qemu\":{\"micro\":3,\"minor\":1,\"major\":8},\"package\":\"p \\\"q\\\"\"},\"capabilities\":[]}}\r\n"
        );
    }

    #[test]
    fn negotiation() {
        let (mut s, mut m) = session();
        s.take_output();
        let r = exchange(
            &mut s,
            &mut m,
            "{\"execute\":\"query-status\",\"id\":1}{\"execute\":\"nonexistent\",\"id\":2}",
        );
        let expect = json!({"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"});
        assert_eq!(r, vec![json!({"id": 1, "error": expect}), json!({"id": 2, "error": expect})]);
        assert!(m.calls.is_empty());
        // Malformed requests keep their own error while negotiating.
        let r = exchange(&mut s, &mut m, "{\"id\":3}");
        assert_eq!(r[0]["error"]["desc"], "QMP input lacks member 'execute'");
        let r = exchange(
            &mut s,
            &mut m,
            "{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\"]},\"id\":4}",
        );
        assert_eq!(r[0]["error"], json!({"class": "GenericError", "desc": "Capability oob not available"}));
        assert!(!s.is_negotiated());
        let r = exchange(
            &mut s,
            &mut m,
            "{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[]},\"id\":5}",
        );
        assert_eq!(r, vec![json!({"return": {}, "id": 5})]);
        assert!(s.is_negotiated());
        let r = exchange(&mut s, &mut m, "{\"execute\":\"qmp_capabilities\",\"id\":6}");
        assert_eq!(r[0]["error"]["class"], "CommandNotFound");
        assert_eq!(r[0]["error"]["desc"], "Capabilities negotiation is already complete, command ignored");
        let r = exchange(&mut s, &mut m, "{\"execute\":\"query-status\",\"id\":7}");
        assert_eq!(r[0]["return"]["status"], "paused");
    }

    #[test]
    fn id_echo_any_value() {
        let (mut s, mut m) = negotiated();
        for id in ["17", "\"abc\"", "{\"x\":[1,null]}", "-1.5", "null", "18446744073709551615"] {
            let r = exchange(&mut s, &mut m, &format!("{{\"id\":{id},\"execute\":\"stop\"}}"));
            assert_eq!(r[0]["id"], serde_json::from_str::<Value>(id).unwrap(), "{id}");
            assert_eq!(r[0]["return"], json!({}));
            let r = exchange(&mut s, &mut m, &format!("{{\"id\":{id},\"execute\":\"bogus\"}}"));
            assert_eq!(r[0]["id"], serde_json::from_str::<Value>(id).unwrap(), "{id}");
        }
        // No id in, no id out.
        let r = exchange(&mut s, &mut m, "{\"execute\":\"stop\"}");
        assert_eq!(r, vec![json!({"return": {}})]);
    }

    #[test]
    fn reply_bytes_are_compact() {
        let (mut s, mut m) = negotiated();
        s.receive(b"{\"execute\":\"stop\",\"id\":9}", Vec::new(), &mut m);
        assert_eq!(s.take_output(), b"{\"return\":{},\"id\":9}\r\n");
        s.receive(b"{\"execute\":\"nope\",\"id\":9}", Vec::new(), &mut m);
        assert_eq!(
            String::from_utf8(s.take_output()).unwrap(),
            "{\"id\":9,\"error\":{\"class\":\"CommandNotFound\",\"desc\":\"The command nope has not been found\"}}\r\n"
        );
    }

    #[test]
    fn split_and_coalesced_input() {
        let (mut s, mut m) = negotiated();
        let msg = "{\"execute\":\"query-status\",\"id\":1}{\"execute\":\"cont\",\"id\":2}\n{\"execute\":\"query-status\",\"id\":3}";
        let mut replies = Vec::new();
        for b in msg.as_bytes() {
            s.receive(std::slice::from_ref(b), Vec::new(), &mut m);
            replies.extend(lines(&s.take_output()));
        }
        assert_eq!(replies.len(), 3);
        assert_eq!(replies[0]["return"]["status"], "paused");
        assert_eq!(replies[2]["return"]["status"], "running");
        assert_eq!(m.calls, vec!["query-status", "cont", "query-status"]);
    }

    #[test]
    fn junk_then_recovery() {
        let (mut s, mut m) = negotiated();
        let r = exchange(&mut s, &mut m, "hello\r\n{\"execute\":\"stop\",\"id\":2}");
        assert_eq!(r.len(), 2);
        assert_eq!(r[0]["error"]["class"], "GenericError");
        assert!(r[0]["error"]["desc"].as_str().unwrap().starts_with("JSON parse error, "));
        assert!(r[0].get("id").is_none());
        assert_eq!(r[1], json!({"return": {}, "id": 2}));
        for (junk, desc) in [
            ("[1,2]", "QMP input must be a JSON object"),
            ("\"str\"", "QMP input must be a JSON object"),
            ("42", "QMP input must be a JSON object"),
            ("{\"execute\":1}", "QMP input member 'execute' must be a string"),
            ("{\"execute\":\"stop\",\"arguments\":[]}", "QMP input member 'arguments' must be an object"),
            ("{\"execute\":\"stop\",\"extra\":1}", "QMP input member 'extra' is unexpected"),
            ("{\"exec-oob\":\"stop\"}", "QMP input member 'exec-oob' is unexpected"),
        ] {
            // A bare token ends at the next delimiter, so finish each with a newline.
            let r = exchange(&mut s, &mut m, &format!("{junk}\r\n"));
            assert_eq!(r.len(), 1, "{junk}");
            assert_eq!(r[0]["error"]["desc"], desc, "{junk}");
        }
        let r = exchange(&mut s, &mut m, "{\"a\":}\u{7f}\u{1}{\"execute\":\"stop\",\"id\":3}");
        assert_eq!(r.last().unwrap(), &json!({"return": {}, "id": 3}));
        // Nesting deeper than serde's limit is an error, not a stack overflow.
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        let r = exchange(&mut s, &mut m, &deep);
        assert_eq!(r[0]["error"]["class"], "GenericError");
        // Invalid UTF-8 inside a string.
        s.receive(b"{\"execute\":\"st\xffop\"}", Vec::new(), &mut m);
        assert_eq!(lines(&s.take_output())[0]["error"]["class"], "GenericError");
    }

    #[test]
    fn oversized_message_is_bounded() {
        let (mut s, mut m) = negotiated();
        s.receive(b"{\"execute\":\"stop\",\"arguments\":{\"x\":\"", Vec::new(), &mut m);
        let chunk = vec![b'a'; 64 * 1024];
        let mut errors = Vec::new();
        for _ in 0..40 {
            s.receive(&chunk, Vec::new(), &mut m);
            errors.extend(lines(&s.take_output()));
            assert!(s.decoder_buffer_len() <= MAX_MESSAGE);
        }
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0]["error"]["desc"],
            format!("JSON parse error, message exceeds {MAX_MESSAGE} bytes")
        );
        let r = exchange(&mut s, &mut m, "\"}}\r\n{\"execute\":\"query-status\",\"id\":5}\r\n");
        assert_eq!(
            r,
            vec![json!({"return": {"status": "paused", "running": false, "singlestep": false}, "id": 5})]
        );
        assert!(m.calls.iter().all(|c| c != "stop"));
    }

    #[test]
    fn argument_errors() {
        let (mut s, mut m) = negotiated();
        let r = exchange(
            &mut s,
            &mut m,
            "{\"execute\":\"xen-set-global-dirty-log\",\"arguments\":{\"enable\":\"yes\"},\"id\":1}",
        );
        assert_eq!(
            r[0]["error"],
            json!({"class": "GenericError", "desc": "Invalid parameter type for 'enable', expected: boolean"})
        );
        let r = exchange(&mut s, &mut m, "{\"execute\":\"xen-set-global-dirty-log\",\"id\":2}");
        assert_eq!(r[0]["error"]["desc"], "Parameter 'enable' is missing");
        let r = exchange(&mut s, &mut m, "{\"execute\":\"stop\",\"arguments\":{\"now\":true},\"id\":3}");
        assert_eq!(r[0]["error"]["desc"], "Parameter 'now' is unexpected");
        let r = exchange(&mut s, &mut m, "{\"execute\":\"query-version\",\"arguments\":{\"x\":1},\"id\":4}");
        assert_eq!(r[0]["error"]["desc"], "Parameter 'x' is unexpected");
        let r =
            exchange(&mut s, &mut m, "{\"execute\":\"add-fd\",\"arguments\":{\"fdset-id\":\"1\"},\"id\":5}");
        assert_eq!(r[0]["error"]["desc"], "Invalid parameter type for 'fdset-id', expected: integer");
        let r = exchange(&mut s, &mut m, "{\"execute\":\"add-fd\",\"id\":6}");
        assert_eq!(r[0]["error"]["desc"], "No file descriptor supplied via SCM_RIGHTS");
    }

    #[test]
    fn builtins() {
        let (mut s, mut m) = negotiated();
        let r = exchange(
            &mut s,
            &mut m,
            "{\"execute\":\"query-version\",\"id\":1}{\"execute\":\"query-commands\",\"id\":2}",
        );
        assert_eq!(r[0]["return"]["qemu"]["major"], 7);
        let names: Vec<&str> =
            r[1]["return"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert!(
            names.contains(&"qmp_capabilities")
                && names.contains(&"query-status")
                && names.contains(&"add-fd")
        );
        assert_eq!(names.len(), BUILTIN_COMMANDS.len() + 4);
        let r = exchange(&mut s, &mut m, "{\"execute\":\"query-cpus-fast\",\"id\":3}");
        assert_eq!(
            r[0]["error"],
            json!({"class": "CommandNotFound", "desc": "The command query-cpus-fast has not been found"})
        );
    }

    #[test]
    fn add_fd_attaches_to_its_command() {
        let (mut s, mut m) = negotiated();
        let (a, _b) = UnixStream::pair().unwrap();
        // The fd arrives with the first byte of the add-fd; a preceding command must not take it.
        s.receive(b"{\"execute\":\"stop\",\"id\":1}", Vec::new(), &mut m);
        s.receive(b"{\"execute\":\"add-fd\",\"arguments\":{\"opaque\":\"raw:/x\"},", vec![a.into()], &mut m);
        s.receive(b"\"id\":2}", Vec::new(), &mut m);
        let r = lines(&s.take_output());
        assert_eq!(r[0], json!({"return": {}, "id": 1}));
        assert_eq!(r[1]["return"]["fdset-id"], 0);
        let fd = r[1]["return"]["fd"].as_i64().unwrap();
        let (set_fd, opaque) =
            m.fds.fdset(0).next().map(|(f, o)| (f.as_raw_fd(), o.map(str::to_string))).unwrap();
        assert_eq!(i64::from(set_fd), fd);
        assert_eq!(opaque.as_deref(), Some("raw:/x"));
        // An fd sent with a command that does not take it is closed, not kept for the next one.
        let (c, _d) = UnixStream::pair().unwrap();
        s.receive(b"{\"execute\":\"stop\",\"id\":3}", vec![c.into()], &mut m);
        assert_eq!(lines(&s.take_output()), vec![json!({"return": {}, "id": 3})]);
        let r = exchange(&mut s, &mut m, "{\"execute\":\"add-fd\",\"id\":4}");
        assert_eq!(r[0]["error"]["desc"], "No file descriptor supplied via SCM_RIGHTS");
        let r = exchange(&mut s, &mut m, "{\"execute\":\"query-fdsets\",\"id\":5}");
        assert_eq!(r[0]["return"][0]["fds"][0]["fd"], fd);
        let r =
            exchange(&mut s, &mut m, "{\"execute\":\"remove-fd\",\"arguments\":{\"fdset-id\":0},\"id\":6}");
        assert_eq!(r[0]["return"], json!({}));
    }

    #[test]
    fn events_only_in_command_mode() {
        let (mut s, _m) = session();
        s.take_output();
        assert!(!s.push_event(&Event::new("STOP", None)));
        let (mut s, _m) = negotiated();
        let ev = Event {
            name: "SHUTDOWN".into(),
            data: Some(json!({"guest": true})),
            timestamp: std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_500_000_250),
        };
        assert!(s.push_event(&ev));
        assert_eq!(
            String::from_utf8(s.take_output()).unwrap(),
            "{\"timestamp\":{\"seconds\":1500,\"microseconds\":250},\"event\":\"SHUTDOWN\",\"data\":{\"guest\":true}}\r\n"
        );
    }

    #[test]
    fn backpressure() {
        let (mut s, mut m) = negotiated();
        // Each query-commands reply is ~300 bytes; queue far more than the high-water mark.
        let cmd = "{\"execute\":\"query-commands\"}".repeat(8000);
        s.receive(cmd.as_bytes(), Vec::new(), &mut m);
        assert!(s.output().len() < OUTPUT_HIGH_WATER + 4096);
        assert!(!s.wants_input());
        let mut n = lines(&s.take_output()).len();
        while n < 8000 {
            s.process(&mut m);
            let more = lines(&s.take_output()).len();
            assert!(more > 0);
            n += more;
        }
        assert_eq!(n, 8000);
        assert!(s.wants_input());
    }

    impl Session {
        fn decoder_buffer_len(&self) -> usize {
            self.decoder.buffered() + self.queued_bytes
        }
    }
}
