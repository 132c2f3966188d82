//! The benchmark's own applications, all blocking sockets on threads: the
//! 1 KiB echo server and its request/response and new-connection clients,
//! the idle-connection holder, and the `SCHED_IDLE` spinners that keep the
//! vCPUs awake.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use netkit::Topology;

use crate::stats::{f, fu, quantile_sorted};

/// Size of a request and of a response.
pub const MSG: usize = 1024;
/// Port of the echo server in the server pod.
pub const ECHO_PORT: u16 = 7001;
/// Port of the idle-connection holder in the server pod.
pub const HOLD_PORT: u16 = 7002;
/// Server threads of the echo server (8 client threads at most, plus slack
/// for connections whose close is still on its way through a proxy).
const ECHO_THREADS: usize = 32;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Starts the echo server in `netns`: each connection gets 1 KiB back for
/// every 1 KiB it sends, until it closes.
pub fn start_echo(netns: &str, port: u16) -> std::io::Result<()> {
    let l = Topology::in_netns(netns, move || TcpListener::bind(("0.0.0.0", port)))?;
    let l = Arc::new(l);
    for _ in 0..ECHO_THREADS {
        let l = Arc::clone(&l);
        thread::Builder::new().name("echo".into()).spawn(move || {
            crate::placement::pin_thread(1);
            loop {
                if let Ok((s, _)) = l.accept() {
                    let _ = echo(s);
                }
            }
        })?;
    }
    Ok(())
}

fn echo(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = [0u8; MSG];
    loop {
        if let Err(e) = s.read_exact(&mut buf) {
            return if e.kind() == std::io::ErrorKind::UnexpectedEof { Ok(()) } else { Err(e) };
        }
        s.write_all(&buf)?;
    }
}

/// The idle-connection holder: a child process (this binary with `--hold
/// PORT`, so its sockets do not count against the bench's own open-file
/// limit) in the server pod that accepts, writes one byte (so the client
/// knows the connection reached the application) and keeps every socket.
/// Dropping it kills it, which closes them all.
pub struct Holder {
    _proc: netkit::Proc,
}

impl Holder {
    /// Starts it in `pod` and waits until it listens.
    pub fn start(topo: &Topology, pod: &netkit::Pod, port: u16) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
        let mut cmd = Topology::command_in(
            &pod.netns,
            Some(&pod.cgroup),
            &exe.to_string_lossy(),
            &["--hold", &port.to_string()],
        )
        .map_err(|e| format!("holder command: {e}"))?;
        cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null());
        crate::placement::pin_command(&mut cmd, 1);
        let proc = topo.spawn("idle-connection holder", cmd).map_err(|e| e.to_string())?;
        crate::procfs::wait_listening(proc.pid(), &[port], Duration::from_secs(5))?;
        Ok(Self { _proc: proc })
    }
}

/// The holder process's main (`bench --hold PORT`). Never returns; ends
/// when killed, when its parent dies, or after an hour.
pub fn hold_main(port: u16) -> ! {
    // SAFETY: prctl with PR_SET_PDEATHSIG and a signal number.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let _ = crate::procfs::raise_nofile(u64::MAX);
    thread::spawn(|| {
        thread::sleep(Duration::from_secs(3600));
        std::process::exit(3);
    });
    let listen = || -> std::io::Result<TcpListener> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
        s.listen(4096)?;
        Ok(TcpListener::from(s))
    };
    let l = listen().unwrap_or_else(|e| {
        eprintln!("bench --hold {port}: {e}");
        std::process::exit(1);
    });
    let mut held = Vec::new();
    loop {
        match l.accept() {
            Ok((mut s, _)) => {
                if s.write_all(b"!").is_ok() {
                    held.push(s);
                }
            }
            // Out of file descriptors: back off (the client stops on its own).
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Result of one request/response run.
#[derive(Debug, Clone, Copy)]
pub struct Rr {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub rate: f64,
    pub samples: usize,
}

/// Request/response on one held connection: after `warmup`, round trips of
/// 1 KiB each way for `duration` (at most `max` of them), each one timed.
pub fn rr(
    netns: &str,
    dst: SocketAddr,
    warmup: Duration,
    duration: Duration,
    max: usize,
) -> Result<Rr, String> {
    Topology::in_netns(netns, move || {
        crate::placement::pin_thread(0);
        let mut s = connect(dst)?;
        let mut buf = [0x5au8; MSG];
        let round_trip = |s: &mut TcpStream, buf: &mut [u8; MSG]| -> Result<(), String> {
            s.write_all(buf).map_err(|e| format!("write: {e}"))?;
            s.read_exact(buf).map_err(|e| format!("read: {}", eof_reason(&e)))
        };
        let w = Instant::now();
        while w.elapsed() < warmup && !crate::stopped() {
            round_trip(&mut s, &mut buf)?;
        }
        let mut ns = Vec::with_capacity(max.min(1 << 20));
        let start = Instant::now();
        while ns.len() < max && start.elapsed() < duration && !crate::stopped() {
            let t = Instant::now();
            round_trip(&mut s, &mut buf)?;
            ns.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
        let secs = start.elapsed().as_secs_f64();
        if ns.is_empty() {
            return Err("no round trip completed".into());
        }
        ns.sort_unstable();
        let q = |p| quantile_sorted(&ns, p).map_or(f64::NAN, |v| f(v) / 1000.0);
        Ok(Rr {
            p50_us: q(0.5),
            p99_us: q(0.99),
            p999_us: q(0.999),
            rate: fu(ns.len()) / secs,
            samples: ns.len(),
        })
    })
}

/// New connections per second, each: connect, send 1 KiB, read 1 KiB,
/// close; `threads` clients for `duration`.
pub fn cps(
    netns: &str,
    dst: SocketAddr,
    threads: usize,
    duration: Duration,
) -> Result<f64, String> {
    Topology::in_netns(netns, move || {
        crate::placement::pin_thread(0);
        let done = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let abort = Arc::new(AtomicBool::new(false));
        let first_error: Arc<Mutex<Option<String>>> = Arc::default();
        let start = Instant::now();
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (done, errors, abort, first_error) = (
                    Arc::clone(&done),
                    Arc::clone(&errors),
                    Arc::clone(&abort),
                    Arc::clone(&first_error),
                );
                thread::spawn(move || {
                    let mut buf = [0xa5u8; MSG];
                    while start.elapsed() < duration
                        && !abort.load(Ordering::Relaxed)
                        && !crate::stopped()
                    {
                        match one_exchange(dst, &mut buf) {
                            Ok(()) => {
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                first_error.lock().expect("lock").get_or_insert(e);
                                let n = errors.fetch_add(1, Ordering::Relaxed) + 1;
                                // A candidate that refuses everything ends the run early.
                                if n >= 50 && done.load(Ordering::Relaxed) == 0 {
                                    abort.store(true, Ordering::Relaxed);
                                }
                                thread::sleep(Duration::from_millis(2));
                            }
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            let _ = h.join();
        }
        let secs = start.elapsed().as_secs_f64();
        let (done, errors) = (done.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
        let first = first_error.lock().expect("lock").take();
        // More than 1% failed exchanges make the rate meaningless.
        if done == 0 || errors * 100 > done {
            return Err(format!(
                "{errors} of {} connections failed (first: {})",
                done + errors,
                first.unwrap_or_default()
            ));
        }
        Ok(f(done) / secs)
    })
}

fn one_exchange(dst: SocketAddr, buf: &mut [u8; MSG]) -> Result<(), String> {
    let mut s = connect(dst)?;
    s.write_all(buf).map_err(|e| format!("write: {e}"))?;
    s.read_exact(buf).map_err(|e| format!("read: {}", eof_reason(&e)))
}

fn connect(dst: SocketAddr) -> Result<TcpStream, String> {
    let s = TcpStream::connect_timeout(&dst, CONNECT_TIMEOUT)
        .map_err(|e| format!("connect {dst}: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(IO_TIMEOUT)).map_err(|e| e.to_string())?;
    Ok(s)
}

fn eof_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            "connection closed by the other side (refused or reset upstream)".into()
        }
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("timed out after {IO_TIMEOUT:?}")
        }
        _ => e.to_string(),
    }
}

/// Outcome of opening idle connections.
pub struct Opened {
    pub conns: Vec<TcpStream>,
    pub stopped_because: Option<String>,
}

/// Opens connections to `dst` until `total` are open (counting `have`),
/// each confirmed end to end by the holder's one byte; 8 openers in
/// parallel. Stops early at `deadline`, after 20 failures, or when the
/// system's thread count reaches `thread_ceiling`.
pub fn open_idle(
    netns: &str,
    dst: SocketAddr,
    want: usize,
    deadline: Instant,
    thread_ceiling: u64,
) -> Opened {
    Topology::in_netns(netns, move || {
        crate::placement::pin_thread(0);
        let left = Arc::new(AtomicUsize::new(want));
        let errors = Arc::new(AtomicUsize::new(0));
        let why: Arc<Mutex<Option<String>>> = Arc::default();
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let (left, errors, why) = (Arc::clone(&left), Arc::clone(&errors), Arc::clone(&why));
                thread::spawn(move || {
                    let mut mine = Vec::new();
                    let stop = |why: &Mutex<Option<String>>, r: String| {
                        why.lock().expect("lock").get_or_insert(r);
                    };
                    loop {
                        if crate::stopped() || errors.load(Ordering::Relaxed) >= 20 || why.lock().expect("lock").is_some()
                        {
                            break;
                        }
                        if Instant::now() > deadline {
                            stop(&why, "time limit".into());
                            break;
                        }
                        if i == 0 && mine.len() % 64 == 0 {
                            if let Some(t) = crate::procfs::system_threads().filter(|t| *t >= thread_ceiling) {
                                stop(&why, format!("system thread count {t} reached the safety ceiling {thread_ceiling}"));
                                break;
                            }
                        }
                        if left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(1)).is_err() {
                            break;
                        }
                        match open_one(dst) {
                            Ok(s) => mine.push(s),
                            Err(e) => {
                                left.fetch_add(1, Ordering::Relaxed);
                                if errors.fetch_add(1, Ordering::Relaxed) + 1 >= 20 {
                                    stop(&why, format!("20 failures (last: {e})"));
                                }
                            }
                        }
                    }
                    mine
                })
            })
            .collect();
        let conns: Vec<TcpStream> =
            handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect();
        let stopped_because = why.lock().expect("lock").take();
        Opened { conns, stopped_because }
    })
}

fn open_one(dst: SocketAddr) -> Result<TcpStream, String> {
    let mut s = connect(dst)?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).map_err(|e| format!("read: {}", eof_reason(&e)))?;
    Ok(s)
}

/// Two lowest-priority busy loops (`SCHED_IDLE`) that keep both vCPUs out of
/// idle, so wake-up latency does not dominate the latency figures. They
/// yield to every normal task at once; they stop when dropped.
pub struct Spinners {
    stop: Arc<AtomicBool>,
    handles: Vec<thread::JoinHandle<()>>,
}

impl Spinners {
    /// Starts `n` spinners that end on their own after `max` at the latest.
    pub fn start(n: usize, max: Duration) -> Result<Self, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let mut handles = Vec::new();
        for i in 0..n {
            let (stop, tx) = (Arc::clone(&stop), tx.clone());
            handles.push(thread::spawn(move || {
                crate::placement::pin_thread(i);
                let param = libc::sched_param { sched_priority: 0 };
                // SAFETY: pid 0 is the calling thread; param is valid.
                let ok =
                    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &raw const param) } == 0;
                let _ = tx.send(ok);
                if !ok {
                    return;
                }
                let t = Instant::now();
                while !stop.load(Ordering::Relaxed) && t.elapsed() < max {
                    for _ in 0..10_000 {
                        std::hint::spin_loop();
                    }
                }
            }));
        }
        let s = Self { stop, handles };
        for _ in 0..n {
            if !rx.recv_timeout(Duration::from_secs(5)).unwrap_or(false) {
                return Err("cannot set SCHED_IDLE on a spinner thread".into());
            }
        }
        Ok(s)
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
