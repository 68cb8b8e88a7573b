//! Kernel-level tests. Each restricting test re-executes this test binary with only itself
//! selected and `HVMDM_SANDBOX_CHILD` set; the child applies the policy (irreversible, so never
//! in the harness process), checks what it can and cannot do, and reports through its exit
//! status and stderr.

use std::ffi::CString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::*;

const CHILD: &str = "HVMDM_SANDBOX_CHILD";
const DIR: &str = "HVMDM_SANDBOX_DIR";
const FD: &str = "HVMDM_SANDBOX_FD";

fn is_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

/// In the child: run `body` and `_exit` with its verdict (never returns to the harness, whose
/// own syscalls the filter may forbid). In the parent: re-exec and return the child's output.
fn run_in_child(
    test: &str,
    env: &[(&str, String)],
    keep_fd: Option<RawFd>,
    body: impl FnOnce() -> Result<(), i32>,
) -> Output {
    if is_child() {
        let code = match body() {
            Ok(()) => {
                eprintln!("CHILD-OK");
                0
            }
            Err(code) => code,
        };
        // SAFETY: _exit has no preconditions; skipping destructors/atexit is intended.
        unsafe { libc::_exit(code) }
    }
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"]).env(CHILD, "1").env("RUST_BACKTRACE", "0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(fd) = keep_fd {
        // SAFETY: the closure runs between fork and exec and only calls async-signal-safe fcntl.
        unsafe {
            cmd.pre_exec(move || {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.output().unwrap()
}

fn describe(out: &Output) -> String {
    format!("status {:?}\n--- child stderr ---\n{}", out.status, String::from_utf8_lossy(&out.stderr))
}

fn assert_child_ok(out: &Output) {
    assert!(
        out.status.code() == Some(0) && String::from_utf8_lossy(&out.stderr).contains("CHILD-OK"),
        "{}",
        describe(out)
    );
}

/// Child-side check: on failure, say which and exit with `code`.
fn check(ok: bool, code: i32, what: &str) -> Result<(), i32> {
    if ok {
        Ok(())
    } else {
        eprintln!("child check {code} failed: {what} (errno now {:?})", io::Error::last_os_error());
        Err(code)
    }
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn open_errno(path: &str) -> Option<i32> {
    std::fs::File::open(path).err().and_then(|e| e.raw_os_error())
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hvmdm-sandbox-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    dir
}

fn set_mode(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn seccomp_errno_allows_loop_syscalls_and_refuses_others() {
    let out = run_in_child("tests::seccomp_errno_allows_loop_syscalls_and_refuses_others", &[], None, || {
        let mut p = [0; 2];
        // SAFETY: `p` has room for two fds.
        check(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } == 0, 1, "pipe2 before filter")?;
        let applied = apply(&Policy { seccomp: Some(SeccompLevel::Errno), ..Policy::default() });
        check(applied.is_ok(), 2, &format!("apply: {applied:?}"))?;

        // Allowed: pipe I/O.
        // SAFETY: valid fd and buffer.
        check(unsafe { libc::write(p[1], b"ping".as_ptr().cast(), 4) } == 4, 3, "write to pipe")?;
        let mut buf = [0u8; 4];
        // SAFETY: valid fd and buffer.
        check(unsafe { libc::read(p[0], buf.as_mut_ptr().cast(), 4) } == 4, 4, "read from pipe")?;
        check(&buf == b"ping", 5, "pipe data")?;

        // Forbidden: new sockets, opening files, exec, fork, regaining ids.
        // SAFETY: plain integer arguments.
        let s = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        check(s == -1 && errno() == libc::EPERM, 10, "socket() refused with EPERM")?;
        check(open_errno("/etc/passwd") == Some(libc::EPERM), 11, "open(/etc/passwd) refused")?;
        let prog = CString::new("/bin/true").unwrap();
        let argv = [prog.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        // SAFETY: NUL-terminated argv/envp arrays of valid C strings.
        let rc = unsafe { libc::execve(prog.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        check(rc == -1 && errno() == libc::EPERM, 12, "execve refused")?;
        // SAFETY: fork; the child branch (should the filter fail) exits at once.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: immediate exit in the forked child.
            unsafe { libc::_exit(99) };
        }
        check(pid == -1 && errno() == libc::EPERM, 13, "fork (clone without CLONE_THREAD) refused")?;
        // As root only the filter can refuse this (as non-root the kernel does too).
        // SAFETY: plain id argument.
        let rc = unsafe { libc::setuid(0) };
        check(rc == -1 && errno() == libc::EPERM, 14, "setuid refused")?;
        // SAFETY: integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
        check(rc == -1 && errno() == libc::EPERM, 15, "prctl other than PR_SET_NAME refused")?;
        // SAFETY: clone3 with a null args pointer never creates anything (EFAULT/EINVAL
        // unfiltered); the filter answers ENOSYS.
        let rc = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
        check(rc == -1 && errno() == libc::ENOSYS, 16, "clone3 answered ENOSYS")?;
        // SAFETY: signal 0 only probes; pid 1 is outside our thread group.
        let rc = unsafe { libc::syscall(libc::SYS_tgkill, 1, 1, 0) };
        check(rc == -1 && errno() == libc::EPERM, 17, "tgkill outside own process refused")?;

        // Allowed runtime patterns: a named thread (clone3 -> clone fallback, prctl(PR_SET_NAME),
        // sigaltstack, getrandom for HashMap), channels, signals to our own threads.
        let h = std::thread::Builder::new()
            .name("sandboxed-worker".into())
            .spawn(|| {
                let mut m = std::collections::HashMap::new();
                m.insert(1u32, vec![0u8; 1 << 20]);
                // SAFETY: gettid/getpid cannot fail; signal 0 only probes.
                let rc = unsafe {
                    libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::syscall(libc::SYS_gettid), 0)
                };
                (m.len(), rc)
            })
            .map_err(|e| {
                eprintln!("thread spawn: {e}");
                20
            })?;
        let (n, rc) = h.join().map_err(|_| 21)?;
        check(n == 1 && rc == 0, 22, "thread ran, tgkill to own thread allowed")?;
        let t = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(2));
        check(t.elapsed().as_millis() >= 2, 23, "clock/sleep")?;
        Ok(())
    });
    if !is_child() {
        assert_child_ok(&out);
    }
}

#[test]
fn seccomp_kill_level_kills_with_sigsys() {
    let out = run_in_child("tests::seccomp_kill_level_kills_with_sigsys", &[], None, || {
        let applied = apply(&Policy { seccomp: Some(SeccompLevel::Kill), ..Policy::default() });
        check(applied.is_ok(), 2, &format!("apply: {applied:?}"))?;
        eprintln!("ALLOWED-WRITE-OK");
        // SAFETY: plain integer arguments; the filter kills us here.
        let s = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        eprintln!("socket() returned {s}: not killed");
        Err(3)
    });
    if !is_child() {
        assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{}", describe(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains("ALLOWED-WRITE-OK"), "{}", describe(&out));
    }
}

#[test]
fn chroot_and_runas_drop_root_for_good() {
    if !is_root() {
        eprintln!("skipped: chroot/runas test needs root (euid != 0)");
        return;
    }
    let dir = if is_child() { PathBuf::from(std::env::var(DIR).unwrap()) } else { scratch_dir("chroot") };
    if !is_child() {
        std::fs::write(dir.join("marker"), "inside").unwrap();
        std::fs::write(dir.join("secret"), "root only").unwrap();
        set_mode(&dir.join("secret"), 0o600);
        set_mode(&dir, 0o755);
    }
    let out = run_in_child(
        "tests::chroot_and_runas_drop_root_for_good",
        &[(DIR, dir.display().to_string())],
        None,
        || {
            // The name form: resolved from /etc/passwd before the chroot hides it.
            let policy = Policy {
                chroot: Some(dir.clone()),
                runas: Some(RunAs::parse("nobody").map_err(|_| 1)?),
                rlimits: true,
                ..Policy::default()
            };
            let applied = apply(&policy).map_err(|e| {
                eprintln!("apply: {e}");
                2
            })?;
            check(applied.credentials == Some(Credentials { uid: 65534, gid: 65534 }), 3, "nobody ids")?;
            check(applied.nofile_limit.is_some_and(|n| n <= DEFAULT_NOFILE_LIMIT), 4, "nofile reported")?;
            // SAFETY: id getters cannot fail; getgroups(0, NULL) only counts.
            let (uid, euid, gid, egid, ngroups) = unsafe {
                (
                    libc::getuid(),
                    libc::geteuid(),
                    libc::getgid(),
                    libc::getegid(),
                    libc::getgroups(0, std::ptr::null_mut()),
                )
            };
            check((uid, euid, gid, egid) == (65534, 65534, 65534, 65534), 5, "ids dropped")?;
            check(ngroups == 0, 6, "supplementary groups dropped")?;

            let inside = std::fs::read_to_string("/marker").map_err(|e| {
                eprintln!("/marker: {e}");
                7
            })?;
            check(inside == "inside", 8, "root is the chroot dir")?;
            check(open_errno("/secret") == Some(libc::EACCES), 9, "root-only file unreadable")?;
            check(open_errno("/etc/passwd") == Some(libc::ENOENT), 10, "host files invisible")?;
            check(open_errno("/../../etc/passwd") == Some(libc::ENOENT), 11, "no escape via ..")?;
            check(std::env::current_dir().ok() == Some(PathBuf::from("/")), 12, "cwd is /")?;

            // SAFETY: plain id argument.
            let rc = unsafe { libc::setuid(0) };
            check(rc == -1 && errno() == libc::EPERM, 13, "setuid(0) fails")?;
            // SAFETY: static path.
            let rc = unsafe { libc::chroot(c"/".as_ptr()) };
            check(rc == -1 && errno() == libc::EPERM, 14, "chroot needs a capability we no longer have")?;

            let mut lim = libc::rlimit { rlim_cur: 1, rlim_max: 1 };
            // SAFETY: valid out pointer.
            unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut lim) };
            check(lim.rlim_cur == 0 && lim.rlim_max == 0, 15, "RLIMIT_CORE 0")?;
            // SAFETY: valid out pointer.
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
            check(lim.rlim_max <= DEFAULT_NOFILE_LIMIT, 16, "RLIMIT_NOFILE capped")?;
            let raise = libc::rlimit { rlim_cur: lim.rlim_max + 1, rlim_max: lim.rlim_max + 1 };
            // SAFETY: valid in pointer.
            let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raise) };
            check(rc == -1, 17, "hard limit cannot be raised again")?;
            Ok(())
        },
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert_child_ok(&out);
}

#[test]
fn libxl_style_mode_0000_chroot_denies_everything() {
    if !is_root() {
        eprintln!("skipped: chroot/runas test needs root (euid != 0)");
        return;
    }
    let dir = if is_child() { PathBuf::from(std::env::var(DIR).unwrap()) } else { scratch_dir("root0000") };
    if !is_child() {
        std::fs::write(dir.join("file"), "x").unwrap();
        set_mode(&dir, 0o000);
    }
    let out = run_in_child(
        "tests::libxl_style_mode_0000_chroot_denies_everything",
        &[(DIR, dir.display().to_string())],
        None,
        || {
            let policy = Policy::restricted(Some(dir.clone()), Some(RunAs::Ids { uid: 65534, gid: 65534 }));
            // The filter would answer EPERM before the permission check; test the DAC part.
            let policy = Policy { seccomp: None, ..policy };
            apply(&policy).map_err(|e| {
                eprintln!("apply: {e}");
                2
            })?;
            check(open_errno("/file") == Some(libc::EACCES), 3, "mode 0000 root: lookups refused")?;
            check(open_errno("/") == Some(libc::EACCES), 4, "mode 0000 root: not even listable")?;
            Ok(())
        },
    );
    set_mode(&dir, 0o755);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_child_ok(&out);
}

#[test]
fn missing_chroot_dir_is_a_named_error() {
    let out = run_in_child("tests::missing_chroot_dir_is_a_named_error", &[], None, || {
        let policy = Policy { chroot: Some("/nonexistent/hvmdm-root".into()), ..Policy::default() };
        match apply(&policy) {
            Err(e @ SandboxError::Chroot { .. }) => {
                let msg = e.to_string();
                check(msg.contains("/nonexistent/hvmdm-root"), 3, &format!("message names the path: {msg}"))
            }
            other => {
                eprintln!("unexpected {other:?}");
                Err(2)
            }
        }
    });
    // Unprivileged, chroot fails with EPERM instead of ENOENT: still the Chroot error.
    if !is_child() {
        assert_child_ok(&out);
    }
}

#[test]
fn unknown_runas_user_fails_before_anything_changes() {
    // Pure lookup failure: nothing is applied, safe in-process.
    let policy = Policy { runas: Some(RunAs::User("hvmdm-no-such-user-xyz".into())), ..Policy::default() };
    assert!(matches!(apply(&policy), Err(SandboxError::UnknownUser(_))));
}

/// The deprivileged process still runs a device-model style loop: mio/epoll on a socket
/// inherited from setup, a worker thread created after the filter, an eventfd waker, timeouts,
/// heap growth. Under `SeccompLevel::Kill`, any syscall missing from the allow-list would show
/// up as SIGSYS. The parent plays the guest, issuing port reads/writes.
#[test]
fn restricted_process_still_serves_requests() {
    let test = "tests::restricted_process_still_serves_requests";
    if is_child() {
        run_in_child(test, &[], None, || {
            let fd: RawFd = std::env::var(FD).map_err(|_| 1)?.parse().map_err(|_| 1)?;
            serve(fd, std::env::var_os(DIR).map(PathBuf::from))
        });
        return;
    }
    let (guest, dm) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = dm.as_raw_fd();
    let mut env = vec![(FD, fd.to_string())];
    let dir = if is_root() {
        let d = scratch_dir("serve");
        set_mode(&d, 0o000);
        env.push((DIR, d.display().to_string()));
        Some(d)
    } else {
        eprintln!("not root: serving test runs with rlimits + seccomp only (no chroot/runas)");
        None
    };
    // `dm` stays open here until the child has exited, so the inherited number stays valid.
    let child = std::thread::spawn(move || {
        let out = run_in_child(test, &env, Some(fd), || Ok(()));
        drop(dm);
        out
    });

    let mut guest_w = guest.try_clone().unwrap();
    guest.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let mut lines = BufReader::new(guest).lines();
    let mut ask = |req: &str| -> Option<String> {
        guest_w.write_all(format!("{req}\n").as_bytes()).ok()?;
        lines.next()?.ok()
    };
    let answers: Vec<Option<String>> =
        ["W 96 42", "R 96", "R 100", "W 100 7", "R 100", "bogus", "Q"].iter().map(|r| ask(r)).collect();
    let out = child.join().unwrap();
    if let Some(d) = dir {
        set_mode(&d, 0o755);
        std::fs::remove_dir_all(&d).unwrap();
    }
    assert_child_ok(&out);
    let want = ["OK", "42", "ffffffff", "OK", "7", "ERR", "BYE"];
    assert_eq!(answers, want.iter().map(|s| Some(s.to_string())).collect::<Vec<_>>(), "{}", describe(&out));
}

/// The sandboxed side of `restricted_process_still_serves_requests`.
fn serve(fd: RawFd, dir: Option<PathBuf>) -> Result<(), i32> {
    use mio::{Events, Interest, Poll, Token, Waker};
    use std::sync::mpsc;

    // SAFETY: `fd` was inherited from the parent for this purpose and nothing else owns it.
    let std_sock = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
    std_sock.set_nonblocking(true).map_err(|_| 2)?;
    let mut sock = std_sock;
    let mut poll = Poll::new().map_err(|_| 3)?;
    const SOCK: Token = Token(0);
    const WAKE: Token = Token(1);
    let waker = std::sync::Arc::new(Waker::new(poll.registry(), WAKE).map_err(|_| 4)?);
    poll.registry().register(&mut mio::unix::SourceFd(&fd), SOCK, Interest::READABLE).map_err(|_| 5)?;

    // Setup done: restrict, as the machine does after opening everything.
    let mut policy = Policy { rlimits: true, seccomp: Some(SeccompLevel::Kill), ..Policy::default() };
    if let Some(d) = dir {
        policy.chroot = Some(d);
        policy.runas = Some(RunAs::Ids { uid: 65534, gid: 65534 });
    }
    apply(&policy).map_err(|e| {
        eprintln!("apply: {e}");
        6
    })?;

    // Worker thread created after the filter: the "device".
    let (req_tx, req_rx) = mpsc::channel::<String>();
    let (rsp_tx, rsp_rx) = mpsc::channel::<String>();
    let w = waker.clone();
    let worker = std::thread::Builder::new()
        .name("device".into())
        .spawn(move || {
            let mut regs: std::collections::HashMap<u16, u32> = std::collections::HashMap::new();
            for req in req_rx {
                let parts: Vec<&str> = req.split_whitespace().collect();
                let rsp = match parts.as_slice() {
                    ["W", port, val] => match (port.parse(), val.parse()) {
                        (Ok(p), Ok(v)) => {
                            regs.insert(p, v);
                            "OK".to_string()
                        }
                        _ => "ERR".to_string(),
                    },
                    ["R", port] => match port.parse::<u16>() {
                        Ok(p) => regs.get(&p).map_or("ffffffff".to_string(), |v| v.to_string()),
                        Err(_) => "ERR".to_string(),
                    },
                    ["Q"] => "BYE".to_string(),
                    _ => "ERR".to_string(),
                };
                if rsp_tx.send(rsp).is_err() || w.wake().is_err() {
                    break;
                }
            }
        })
        .map_err(|e| {
            eprintln!("spawn after filter: {e}");
            7
        })?;

    let mut events = Events::with_capacity(8);
    let mut inbuf = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        check(std::time::Instant::now() < deadline, 8, "served in time")?;
        poll.poll(&mut events, Some(std::time::Duration::from_millis(100))).map_err(|_| 9)?;
        for ev in events.iter() {
            match ev.token() {
                SOCK => {
                    let mut chunk = [0u8; 256];
                    loop {
                        match sock.read(&mut chunk) {
                            Ok(0) => return Err(10),
                            Ok(n) => inbuf.extend_from_slice(&chunk[..n]),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(_) => return Err(11),
                        }
                    }
                    while let Some(pos) = inbuf.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = inbuf.drain(..=pos).collect();
                        let line = String::from_utf8_lossy(&line[..pos]).into_owned();
                        req_tx.send(line).map_err(|_| 12)?;
                    }
                }
                WAKE => {
                    while let Ok(rsp) = rsp_rx.try_recv() {
                        // Small replies on a fresh socket: a blocking-style write loop suffices.
                        let msg = format!("{rsp}\n");
                        let mut off = 0;
                        while off < msg.len() {
                            match sock.write(&msg.as_bytes()[off..]) {
                                Ok(n) => off += n,
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                                Err(_) => return Err(13),
                            }
                        }
                        if rsp == "BYE" {
                            drop(req_tx);
                            worker.join().map_err(|_| 14)?;
                            return Ok(());
                        }
                    }
                }
                _ => {}
            }
        }
    }
}
