//! In-process fake xenstored for tests: a thread serving a UnixListener, the tree in a
//! HashMap, permissions stored (not enforced, except writes under `/ro` answer EACCES),
//! watches that fire on changes at or below the watched path (events are written before
//! the reply, as C xenstored does), and transactions with generation-based conflicts plus
//! a counter that forces EAGAIN on the next commits.
//!
//! Reads of `/fake/*` paths misbehave on purpose (see `misbehave`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use super::wire::{join_strings, Decoder, Message, MsgType};

#[derive(Clone, Debug)]
struct Node {
    value: Vec<u8>,
    perms: Vec<String>,
}

type Tree = HashMap<String, Node>;

pub(crate) struct Tx {
    tree: Tree,
    base_gen: u64,
    changed: Vec<String>,
}

#[derive(Default)]
pub(crate) struct State {
    tree: Tree,
    watches: Vec<(usize, String, String)>,
    conns: HashMap<usize, UnixStream>,
    pub txs: HashMap<u32, Tx>,
    next_tx: u32,
    generation: u64,
    /// Commits to fail with EAGAIN before honouring any.
    pub force_eagain: u32,
    /// Write every outgoing frame in 3-byte pieces with pauses (exercises partial reads).
    pub dribble: bool,
    pub tx_started: u32,
    pub tx_committed: u32,
    pub tx_aborted: u32,
}

pub(crate) struct FakeXenstored {
    pub path: PathBuf,
    dir: PathBuf,
    pub state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

static UNIQUE: AtomicUsize = AtomicUsize::new(0);

impl FakeXenstored {
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "hvmdm-fake-xs-{}-{}",
            std::process::id(),
            UNIQUE.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("socket");
        let listener = UnixListener::bind(&path).unwrap();
        let mut st = State { next_tx: 1, ..Default::default() };
        st.tree.insert("/".into(), Node { value: vec![], perms: vec!["n0".into()] });
        let state = Arc::new(Mutex::new(st));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, stop2) = (state.clone(), stop.clone());
        thread::spawn(move || {
            for (id, conn) in listener.incoming().enumerate() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let writer = conn.try_clone().unwrap();
                s2.lock().unwrap().conns.insert(id, writer);
                let s3 = s2.clone();
                thread::spawn(move || serve(id, conn, s3));
            }
        });
        FakeXenstored { path, dir, state, stop }
    }

    pub fn set_force_eagain(&self, n: u32) {
        self.state.lock().unwrap().force_eagain = n;
    }

    pub fn set_dribble(&self, on: bool) {
        self.state.lock().unwrap().dribble = on;
    }

    /// Changes a node behind the client's back (bumps the generation like any commit).
    pub fn external_write(&self, path: &str, value: &[u8]) {
        let mut st = self.state.lock().unwrap();
        create(&mut st.tree, path, value.to_vec());
        st.generation += 1;
        fire(&mut st, path, false);
    }
}

impl Drop for FakeXenstored {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = UnixStream::connect(&self.path);
        if let Ok(mut st) = self.state.lock() {
            for c in st.conns.values() {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
            st.conns.clear();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn serve(id: usize, mut conn: UnixStream, state: Arc<Mutex<State>>) {
    let mut dec = Decoder::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        dec.push(&buf[..n]);
        loop {
            match dec.next_message() {
                Ok(Some(m)) => handle(id, m, &state),
                Ok(None) => break,
                // Like xenstored: a protocol violation ends the connection.
                Err(_) => {
                    let _ = conn.shutdown(std::net::Shutdown::Both);
                    break;
                }
            }
        }
    }
    let mut st = state.lock().unwrap();
    st.conns.remove(&id);
    st.watches.retain(|w| w.0 != id);
}

fn frame(ty: MsgType, req_id: u32, tx_id: u32, payload: &[u8]) -> Vec<u8> {
    Message { ty, req_id, tx_id, payload: payload.to_vec() }.encode().unwrap()
}

fn send_raw(st: &mut State, id: usize, bytes: &[u8]) {
    let dribble = st.dribble;
    if let Some(c) = st.conns.get_mut(&id) {
        if dribble {
            for chunk in bytes.chunks(3) {
                let _ = c.write_all(chunk);
                thread::sleep(Duration::from_micros(300));
            }
        } else {
            let _ = c.write_all(bytes);
        }
    }
}

fn parent(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    Some(match path.rfind('/') {
        Some(0) => "/",
        Some(i) => &path[..i],
        None => "/",
    })
}

fn create(tree: &mut Tree, path: &str, value: Vec<u8>) {
    let mut p = parent(path);
    while let Some(pp) = p {
        tree.entry(pp.to_string()).or_insert_with(|| Node { value: vec![], perms: vec!["n0".into()] });
        p = parent(pp);
    }
    let node =
        tree.entry(path.to_string()).or_insert_with(|| Node { value: vec![], perms: vec!["n0".into()] });
    node.value = value;
}

fn under(p: &str, base: &str) -> bool {
    p == base || base == "/" || p.starts_with(&format!("{base}/"))
}

/// Queues events for every watch affected by a change of `path`; `removed` also fires
/// watches on nodes below it.
fn fire(st: &mut State, path: &str, removed: bool) {
    let mut out = Vec::new();
    for (cid, wpath, token) in &st.watches {
        if under(path, wpath) {
            out.push((*cid, path.to_string(), token.clone()));
        } else if removed && under(wpath, path) {
            out.push((*cid, wpath.clone(), token.clone()));
        }
    }
    for (cid, p, token) in out {
        let f = frame(MsgType::WatchEvent, 0, 0, &join_strings(&[p.as_bytes(), token.as_bytes()]));
        send_raw(st, cid, &f);
    }
}

fn valid_path(p: &str) -> bool {
    p.starts_with('/') && (p == "/" || !p.ends_with('/')) && !p.contains("//")
}

/// Scripted faults for reads of `/fake/*`. Returns true if it handled the request.
fn misbehave(st: &mut State, id: usize, m: &Message, path: &str) -> bool {
    let r = m.req_id;
    match path {
        "/fake/oversized" => {
            let mut f = Vec::new();
            for w in [MsgType::Read as u32, r, 0, 5000] {
                f.extend_from_slice(&w.to_le_bytes());
            }
            f.extend_from_slice(&[b'x'; 100]);
            send_raw(st, id, &f);
        }
        "/fake/truncated" => {
            let f = frame(MsgType::Read, r, 0, b"whole value");
            send_raw(st, id, &f[..10]);
            if let Some(c) = st.conns.get(&id) {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
        "/fake/garbage" => {
            let g: Vec<u8> = (0..64u32).map(|i| (i.wrapping_mul(2654435761) >> 7) as u8).collect();
            send_raw(st, id, &g);
        }
        "/fake/stale" => {
            let f = frame(MsgType::Read, r.wrapping_add(1000), 0, b"stale");
            send_raw(st, id, &f);
            let f = frame(MsgType::Read, r, 0, b"fresh");
            send_raw(st, id, &f);
        }
        "/fake/wrongtype" => {
            let f = frame(MsgType::Write, r, 0, b"OK\0");
            send_raw(st, id, &f);
        }
        "/fake/badevent" => {
            let f = frame(MsgType::WatchEvent, 0, 0, b"no-nul-here");
            send_raw(st, id, &f);
            let f = frame(MsgType::Read, r, 0, b"after");
            send_raw(st, id, &f);
        }
        "/fake/slow" => {
            // Reply 300 ms late from another thread (the client times out first).
            let Some(c) = st.conns.get(&id).and_then(|c| c.try_clone().ok()) else { return true };
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(300));
                let mut c = c;
                let _ = c.write_all(&frame(MsgType::Read, r, 0, b"late"));
            });
        }
        _ => return false,
    }
    true
}

fn handle(id: usize, m: Message, state: &Arc<Mutex<State>>) {
    let mut st = state.lock().unwrap();
    let st = &mut *st;
    // Lossy: a WRITE's value after the path may be binary.
    let body = m.payload.strip_suffix(&[0]).unwrap_or(&m.payload);
    let args: Vec<String> =
        body.split(|&b| b == 0).map(|s| String::from_utf8_lossy(s).into_owned()).collect();
    let arg0 = args.first().cloned().unwrap_or_default();
    if m.ty == MsgType::Read && misbehave(st, id, &m, &arg0) {
        return;
    }
    let reply = process(id, &m, st, &args);
    let f = match reply {
        Ok(None) => return,
        Ok(Some(p)) => frame(m.ty, m.req_id, m.tx_id, &p),
        Err(e) => frame(MsgType::Error, m.req_id, m.tx_id, &join_strings(&[e.as_bytes()])),
    };
    send_raw(st, id, &f);
}

const OK: &[u8] = b"OK\0";

/// `Ok(None)`: the reply was already sent.
fn process(id: usize, m: &Message, st: &mut State, args: &[String]) -> Result<Option<Vec<u8>>, &'static str> {
    let in_tx = m.tx_id != 0;
    if in_tx && !st.txs.contains_key(&m.tx_id) {
        return Err("ENOENT");
    }
    let path = args.first().cloned().unwrap_or_default();
    let supported = matches!(
        m.ty,
        MsgType::Read
            | MsgType::Write
            | MsgType::Mkdir
            | MsgType::Rm
            | MsgType::Directory
            | MsgType::GetPerms
            | MsgType::SetPerms
            | MsgType::Watch
            | MsgType::Unwatch
            | MsgType::TransactionStart
            | MsgType::TransactionEnd
    );
    if !supported {
        return Err("ENOSYS");
    }
    let needs_path = !matches!(m.ty, MsgType::TransactionStart | MsgType::TransactionEnd);
    if needs_path && !valid_path(&path) {
        return Err("EINVAL");
    }
    // Tree the request works on: the transaction's copy or the live one.
    macro_rules! tree {
        () => {
            if in_tx {
                &mut st.txs.get_mut(&m.tx_id).ok_or("ENOENT")?.tree
            } else {
                &mut st.tree
            }
        };
    }
    let mut changed: Option<(String, bool)> = None;
    let reply = match m.ty {
        MsgType::Read => tree!().get(&path).map(|n| n.value.clone()).ok_or("ENOENT")?,
        MsgType::Write => {
            if under(&path, "/ro") && path != "/" {
                return Err("EACCES");
            }
            let nul = m.payload.iter().position(|&b| b == 0).ok_or("EINVAL")?;
            create(tree!(), &path, m.payload[nul + 1..].to_vec());
            changed = Some((path.clone(), false));
            OK.to_vec()
        }
        MsgType::Mkdir => {
            let t = tree!();
            if !t.contains_key(&path) {
                create(t, &path, vec![]);
                changed = Some((path.clone(), false));
            }
            OK.to_vec()
        }
        MsgType::Rm => {
            let t = tree!();
            if !t.contains_key(&path) {
                return Err("ENOENT");
            }
            if path == "/" {
                return Err("EINVAL");
            }
            t.retain(|k, _| !under(k, &path));
            changed = Some((path.clone(), true));
            OK.to_vec()
        }
        MsgType::Directory => {
            let t = tree!();
            if !t.contains_key(&path) {
                return Err("ENOENT");
            }
            let mut kids: Vec<&str> = t
                .keys()
                .filter(|k| k.as_str() != "/" && parent(k) == Some(path.as_str()))
                .map(|k| k.rsplit('/').next().unwrap_or(""))
                .collect();
            kids.sort();
            let parts: Vec<&[u8]> = kids.iter().map(|k| k.as_bytes()).collect();
            join_strings(&parts)
        }
        MsgType::GetPerms => {
            let n = tree!().get(&path).ok_or("ENOENT")?;
            let parts: Vec<&[u8]> = n.perms.iter().map(|p| p.as_bytes()).collect();
            join_strings(&parts)
        }
        MsgType::SetPerms => {
            let perms = args[1..].to_vec();
            let ok = |p: &String| {
                p.len() >= 2 && "nrwb".contains(&p[..1]) && p[1..].bytes().all(|b| b.is_ascii_digit())
            };
            if perms.is_empty() || !perms.iter().all(ok) {
                return Err("EINVAL");
            }
            tree!().get_mut(&path).ok_or("ENOENT")?.perms = perms;
            changed = Some((path.clone(), false));
            OK.to_vec()
        }
        MsgType::Watch => {
            let token = args.get(1).ok_or("EINVAL")?.clone();
            if st.watches.iter().any(|w| w.0 == id && w.1 == path && w.2 == token) {
                return Err("EEXIST");
            }
            st.watches.push((id, path.clone(), token.clone()));
            // Reply first, then the initial event (xenstored order).
            let f = frame(MsgType::Watch, m.req_id, 0, OK);
            send_raw(st, id, &f);
            let f = frame(MsgType::WatchEvent, 0, 0, &join_strings(&[path.as_bytes(), token.as_bytes()]));
            send_raw(st, id, &f);
            return Ok(None);
        }
        MsgType::Unwatch => {
            let token = args.get(1).ok_or("EINVAL")?;
            let before = st.watches.len();
            st.watches.retain(|w| !(w.0 == id && w.1 == path && &w.2 == token));
            if st.watches.len() == before {
                return Err("ENOENT");
            }
            OK.to_vec()
        }
        MsgType::TransactionStart => {
            if in_tx {
                return Err("EBUSY");
            }
            let txid = st.next_tx;
            st.next_tx += 1;
            st.tx_started += 1;
            st.txs.insert(txid, Tx { tree: st.tree.clone(), base_gen: st.generation, changed: vec![] });
            join_strings(&[txid.to_string().as_bytes()])
        }
        MsgType::TransactionEnd => {
            let tx = st.txs.remove(&m.tx_id).ok_or("ENOENT")?;
            match path.as_str() {
                "T" => {
                    if st.force_eagain > 0 {
                        st.force_eagain -= 1;
                        return Err("EAGAIN");
                    }
                    if tx.base_gen != st.generation {
                        return Err("EAGAIN");
                    }
                    st.tree = tx.tree;
                    st.generation += 1;
                    st.tx_committed += 1;
                    for p in tx.changed {
                        fire(st, &p, false);
                    }
                }
                "F" => st.tx_aborted += 1,
                _ => return Err("EINVAL"),
            }
            OK.to_vec()
        }
        _ => return Err("ENOSYS"),
    };
    if let Some((p, removed)) = changed {
        if in_tx {
            if let Some(tx) = st.txs.get_mut(&m.tx_id) {
                tx.changed.push(p);
            }
        } else {
            st.generation += 1;
            fire(st, &p, removed);
        }
    }
    Ok(Some(reply))
}
