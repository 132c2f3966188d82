//! Network namespaces: open one by path, read its cookie, and create sockets
//! inside it.
//!
//! `setns(2)` changes only the calling thread; a socket keeps the namespace
//! it was created in. All work in another namespace ([`Netns::run`], for pod
//! set-up and for per-connection sockets alike) runs on the calling thread
//! between `setns` into the pod and back to the daemon's namespace, as
//! ztunnel's in-pod socket factory does: a few microseconds, where handing
//! each job to a thread parked in the namespace cost two cross-thread
//! wake-ups per connection. A guard returns the thread even when the job
//! panics, or aborts the process if it cannot.

use std::{
    fs::File,
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use nix::sched::{setns, CloneFlags};
use socket2::{Domain, Protocol, Socket, Type};

/// Errors from namespace operations.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The netns file could not be opened.
    #[error("cannot open network namespace {path}: {source} (does the pod still exist?)")]
    Open { path: PathBuf, source: io::Error },
    /// `setns` failed.
    #[error(
        "cannot enter network namespace {path}: {source} (is the daemon root with CAP_SYS_ADMIN?)"
    )]
    Enter { path: PathBuf, source: nix::Error },
    /// A socket operation inside the namespace failed.
    #[error("in network namespace {path}: {what}: {source}")]
    Socket { path: PathBuf, what: String, source: io::Error },
    /// The daemon's own namespace was never recorded (`init_home`).
    #[error("cannot run in network namespace {path}: the daemon's own namespace is unknown (a bug: please report it)")]
    Thread { path: PathBuf },
}

/// An open network namespace (holding the fd keeps it alive).
#[derive(Debug, Clone)]
pub struct Netns {
    path: PathBuf,
    fd: Arc<OwnedFd>,
}

impl Netns {
    /// Opens the namespace at `path` (e.g. `/run/netns/<name>` or `/proc/<pid>/ns/net`).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, NetnsError> {
        let path = path.as_ref().to_path_buf();
        let file =
            File::open(&path).map_err(|source| NetnsError::Open { path: path.clone(), source })?;
        Ok(Self { path, fd: Arc::new(OwnedFd::from(file)) })
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Self, NetnsError> {
        Self::open("/proc/thread-self/ns/net")
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path that names this very namespace for as long as it is open
    /// (`/proc/<pid>/fd/<fd>`), for tools that take a path (`nsenter`): the
    /// inventory's path may meanwhile name a newer namespace.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), self.fd.as_raw_fd()))
    }

    /// Borrow the namespace fd (for `sk_lookup` attachment).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Runs `f` inside this namespace on the calling thread and returns its
    /// result. `f` must not block long or await: it holds the thread in the
    /// pod's namespace.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        init_home()?;
        run_in(&self.fd, &self.path, f)
    }

    /// Checks that the namespace can be entered.
    pub fn check(&self) -> Result<(), NetnsError> {
        self.run(|| ())
    }

    /// Connects a TCP socket created inside the namespace to `dst`.
    pub async fn connect(
        &self,
        dst: SocketAddr,
        opts: SocketOpts,
    ) -> Result<tokio::net::TcpStream, NetnsError> {
        let err = |what: String| {
            let path = self.path.clone();
            move |source| NetnsError::Socket { path, what, source }
        };
        let sock = self
            .run(move || -> io::Result<Socket> { new_socket(dst, Type::STREAM, opts) })?
            .map_err(err(format!("socket for {dst}")))?;
        let ts = tokio::net::TcpSocket::from_std_stream(sock.into());
        ts.connect(dst).await.map_err(err(format!("connect {dst}")))
    }

    /// The kernel's cookie for this namespace (what `bpf_get_netns_cookie` returns).
    pub fn cookie(&self) -> Result<u64, NetnsError> {
        let path = self.path.clone();
        self.run(move || -> Result<u64, NetnsError> {
            let s = Socket::new(Domain::IPV4, Type::DGRAM, None).map_err(|source| {
                NetnsError::Socket { path: path.clone(), what: "socket".into(), source }
            })?;
            netns_cookie_of(s.as_fd()).map_err(|source| NetnsError::Socket {
                path,
                what: "SO_NETNS_COOKIE".into(),
                source,
            })
        })?
    }

    /// Creates a listening TCP socket bound to `addr` inside this namespace.
    /// `transparent` sets `IP_TRANSPARENT`; `mark` sets `SO_MARK`.
    pub fn tcp_listener(
        &self,
        addr: SocketAddr,
        opts: SocketOpts,
    ) -> Result<std::net::TcpListener, NetnsError> {
        let path = self.path.clone();
        self.run(move || -> Result<std::net::TcpListener, NetnsError> {
            let err = |what: &str| {
                let path = path.clone();
                let what = format!("{what} {addr}");
                move |source| NetnsError::Socket { path, what, source }
            };
            let s = new_socket(addr, Type::STREAM, opts).map_err(err("socket"))?;
            s.set_reuse_address(true).map_err(err("SO_REUSEADDR"))?;
            s.bind(&addr.into()).map_err(err("bind"))?;
            s.listen(4096).map_err(err("listen"))?;
            Ok(s.into())
        })?
    }

    /// Creates a UDP socket bound to `addr` inside this namespace.
    pub fn udp_socket(
        &self,
        addr: SocketAddr,
        opts: SocketOpts,
    ) -> Result<std::net::UdpSocket, NetnsError> {
        let path = self.path.clone();
        self.run(move || -> Result<std::net::UdpSocket, NetnsError> {
            let err = |source| NetnsError::Socket {
                path: path.clone(),
                what: format!("udp {addr}"),
                source,
            };
            let s = new_socket(addr, Type::DGRAM, opts).map_err(err)?;
            s.bind(&addr.into()).map_err(err)?;
            Ok(s.into())
        })?
    }
}

/// Options for sockets the daemon creates.
#[derive(Debug, Clone, Copy, Default)]
pub struct SocketOpts {
    /// `SO_MARK` value (0 = none).
    pub mark: u32,
    /// `IP_TRANSPARENT` / `IPV6_TRANSPARENT`.
    pub transparent: bool,
    /// `SO_REUSEPORT` (rolling restarts).
    pub reuse_port: bool,
    /// `IPV6_V6ONLY` on IPv6 sockets.
    pub v6_only: bool,
}

/// A new non-blocking socket of `addr`'s family with the given options
/// (not bound). `O_NONBLOCK` and `FD_CLOEXEC` are set at creation.
pub fn new_socket(addr: SocketAddr, ty: Type, opts: SocketOpts) -> io::Result<Socket> {
    let domain = if addr.is_ipv6() { Domain::IPV6 } else { Domain::IPV4 };
    let proto = if ty == Type::STREAM { Protocol::TCP } else { Protocol::UDP };
    let s = Socket::new(domain, ty.nonblocking().cloexec(), Some(proto))?;
    if opts.mark != 0 {
        s.set_mark(opts.mark)?;
    }
    if opts.transparent {
        if addr.is_ipv6() {
            s.set_ip_transparent_v6(true)?;
        } else {
            s.set_ip_transparent_v4(true)?;
        }
    }
    if opts.reuse_port {
        s.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        s.set_only_v6(opts.v6_only)?;
    }
    Ok(s)
}

const SO_NETNS_COOKIE: libc::c_int = 71;

/// The netns cookie of the namespace an existing socket lives in.
pub fn netns_cookie_of(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<u64>()).expect("8 fits socklen_t");
    // SAFETY: `v` and `len` are valid for writes of the sizes given; the fd is open.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut v).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The daemon's own network namespace, where every thread returns after a
/// job. Opened from the first caller (a daemon thread, in the node netns).
static HOME: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();

/// Sets the namespace the daemon's threads return to after a job: call once
/// at start-up from a thread in the daemon's own namespace.
pub fn init_home() -> Result<(), NetnsError> {
    if HOME.get().is_none() {
        let ns = Netns::current()?;
        let fd = ns.fd.try_clone().map_err(|source| NetnsError::Socket {
            path: ns.path.clone(),
            what: "dup".into(),
            source,
        })?;
        let _ = HOME.set(fd);
    }
    Ok(())
}

/// Returns the thread to the daemon's namespace when dropped, also when the
/// job panics. A thread that cannot return would open later sockets in a
/// pod's namespace: the process aborts instead.
struct ReturnHome(&'static OwnedFd);

impl Drop for ReturnHome {
    fn drop(&mut self) {
        if let Err(e) = setns(self.0.as_fd(), CloneFlags::CLONE_NEWNET) {
            eprintln!("tlsmesh: cannot return a thread to the daemon's network namespace ({e}); aborting rather than opening sockets in a pod");
            std::process::abort();
        }
    }
}

/// Runs `f` on the calling thread inside the namespace `fd`, then returns
/// the thread to the daemon's namespace (also when `f` panics).
fn run_in<T>(fd: &OwnedFd, path: &Path, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
    let home = HOME.get().ok_or_else(|| NetnsError::Thread { path: path.to_path_buf() })?;
    setns(fd.as_fd(), CloneFlags::CLONE_NEWNET)
        .map_err(|source| NetnsError::Enter { path: path.to_path_buf(), source })?;
    let _back = ReturnHome(home);
    Ok(f())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_netns_is_a_clear_error() {
        let e = Netns::open("/run/netns/definitely-not-there").unwrap_err();
        assert!(e.to_string().contains("/run/netns/definitely-not-there"), "{e}");
        assert!(e.to_string().contains("pod still exist"), "{e}");
    }

    #[test]
    fn current_netns_has_a_cookie() {
        let ns = Netns::current().unwrap();
        let a = ns.cookie().unwrap();
        assert_ne!(a, 0);
        assert_eq!(a, ns.cookie().unwrap(), "cookie is stable");
    }
}
