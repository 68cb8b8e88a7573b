//! Streaming splitter for QMP input: finds top-level JSON values in a byte stream without
//! parsing them, so objects may arrive split across reads, several per read, with or without
//! whitespace between them. Memory is bounded: a value longer than the limit is dropped while the
//! scanner keeps tracking nesting, and scanning resumes at the next top-level value.

/// One top-level item found in the input. `end` is the stream offset just past its last byte
/// (used to attach SCM_RIGHTS descriptors to the command they arrived with).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A complete candidate value (object, array, string, or a bare token such as junk).
    Value { bytes: Vec<u8>, end: u64 },
    /// A value exceeded the limit; reported as soon as the limit is crossed. The rest of it
    /// is discarded.
    TooLarge { end: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between values.
    Idle,
    /// Inside `{...}` or `[...]`.
    Container,
    /// Inside a top-level string.
    TopString,
    /// A token that is neither container nor string (numbers, keywords, junk).
    Bare,
}

pub(crate) struct Decoder {
    max: usize,
    buf: Vec<u8>,
    state: State,
    depth: u64,
    in_str: bool,
    esc: bool,
    discarding: bool,
    offset: u64,
}

impl Decoder {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            buf: Vec::new(),
            state: State::Idle,
            depth: 0,
            in_str: false,
            esc: false,
            discarding: false,
            offset: 0,
        }
    }

    /// Stream offset of the next byte to be pushed.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes of the value being buffered.
    #[cfg(test)]
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// True while a value is partially buffered.
    #[cfg(test)]
    pub(crate) fn in_value(&self) -> bool {
        self.state != State::Idle
    }

    fn store(&mut self, b: u8, out: &mut Vec<Frame>) {
        if self.discarding {
            return;
        }
        if self.buf.len() >= self.max {
            self.buf = Vec::new();
            self.discarding = true;
            out.push(Frame::TooLarge { end: self.offset + 1 });
            return;
        }
        self.buf.push(b);
    }

    fn emit(&mut self, out: &mut Vec<Frame>, end: u64) {
        self.state = State::Idle;
        if std::mem::take(&mut self.discarding) {
            self.buf = Vec::new();
        } else {
            out.push(Frame::Value { bytes: std::mem::take(&mut self.buf), end });
        }
    }

    /// Scans `data`, appending every completed item to `out`.
    pub(crate) fn push(&mut self, data: &[u8], out: &mut Vec<Frame>) {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            match self.state {
                State::Idle => match b {
                    b' ' | b'\t' | b'\r' | b'\n' => {}
                    b'{' | b'[' => {
                        self.state = State::Container;
                        self.depth = 1;
                        self.in_str = false;
                        self.esc = false;
                        self.store(b, out);
                    }
                    b'"' => {
                        self.state = State::TopString;
                        self.esc = false;
                        self.store(b, out);
                    }
                    _ => {
                        self.state = State::Bare;
                        self.store(b, out);
                    }
                },
                State::Container => {
                    self.store(b, out);
                    if self.in_str {
                        if self.esc {
                            self.esc = false;
                        } else if b == b'\\' {
                            self.esc = true;
                        } else if b == b'"' {
                            self.in_str = false;
                        }
                    } else {
                        match b {
                            b'"' => self.in_str = true,
                            b'{' | b'[' => self.depth = self.depth.saturating_add(1),
                            b'}' | b']' => {
                                self.depth -= 1;
                                if self.depth == 0 {
                                    self.emit(out, self.offset + 1);
                                }
                            }
                            _ => {}
                        }
                    }
                }
                State::TopString => {
                    self.store(b, out);
                    if self.esc {
                        self.esc = false;
                    } else if b == b'\\' {
                        self.esc = true;
                    } else if b == b'"' {
                        self.emit(out, self.offset + 1);
                    }
                }
                State::Bare => match b {
                    b' ' | b'\t' | b'\r' | b'\n' | b'{' | b'[' | b'"' => {
                        // The delimiter starts the next item: rescan it in Idle.
                        self.emit(out, self.offset);
                        continue;
                    }
                    _ => self.store(b, out),
                },
            }
            i += 1;
            self.offset += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(d: &mut Decoder, data: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        d.push(data, &mut out);
        out
    }

    fn v(s: &str, end: u64) -> Frame {
        Frame::Value { bytes: s.as_bytes().to_vec(), end }
    }

    #[test]
    fn split_and_coalesced() {
        let mut d = Decoder::new(1024);
        assert_eq!(values(&mut d, b"{\"a\":\"}{\\\"\""), vec![]);
        assert!(d.in_value());
        assert_eq!(
            values(&mut d, b",\"b\":[1,{}]}{\"c\":1}\r\n[]"),
            vec![v("{\"a\":\"}{\\\"\",\"b\":[1,{}]}", 23), v("{\"c\":1}", 30), v("[]", 34),]
        );
        assert!(!d.in_value());
    }

    #[test]
    fn bare_tokens_and_strings() {
        let mut d = Decoder::new(1024);
        assert_eq!(
            values(&mut d, b"foo}} 42{} \"s\\\"x\" "),
            vec![v("foo}}", 5), v("42", 8), v("{}", 10), v("\"s\\\"x\"", 17),]
        );
    }

    #[test]
    fn oversize_is_bounded_and_resyncs() {
        let mut d = Decoder::new(16);
        let mut out = Vec::new();
        d.push(b"{\"a\":\"", &mut out);
        for _ in 0..1000 {
            d.push(b"xxxxxxxxxx{[", &mut out);
            assert!(d.buf.len() <= 16);
        }
        assert_eq!(out, vec![Frame::TooLarge { end: 17 }]);
        out.clear();
        d.push(b"\"}{\"ok\":1}", &mut out);
        assert_eq!(out, vec![v("{\"ok\":1}", 12016)]);
        // Bare junk too.
        out.clear();
        d.push(&[b'z'; 40], &mut out);
        d.push(b" 1 ", &mut out);
        assert_eq!(out, vec![Frame::TooLarge { end: 12033 }, v("1", 12058)]);
    }
}
