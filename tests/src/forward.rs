//! A TCP forwarder from 127.0.0.1:`port` inside a namespace to 127.0.0.1:
//! `port` of the host, counting the bytes each way: daemons in a node
//! namespace reach a server on the host's loopback (a real kube-apiserver)
//! with the same URL, so a kubeconfig and the server's certificate fit
//! unchanged, and a benchmark can read the watch traffic.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use crate::Topology;

/// A running forwarder; it stops accepting when dropped.
#[derive(Debug)]
pub struct LoopbackForwarder {
    stop: Arc<AtomicBool>,
    to_host: Arc<AtomicU64>,
    from_host: Arc<AtomicU64>,
}

fn pump(mut from: TcpStream, mut to: TcpStream, count: &AtomicU64) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown(Shutdown::Write);
}

impl LoopbackForwarder {
    /// Listens on 127.0.0.1:`port` in `netns`, forwards to the host's.
    pub fn start(netns: &str, port: u16) -> Self {
        let l = Topology::in_netns(netns, move || {
            let l = TcpListener::bind(("127.0.0.1", port)).expect("bind the forwarder");
            l.set_nonblocking(true).expect("nonblocking");
            l
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (to_host, from_host) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (stopped, up_count, down_count) =
            (Arc::clone(&stop), Arc::clone(&to_host), Arc::clone(&from_host));
        // Spawned from the caller's thread (the host netns), where it connects.
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let Ok((down, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = down.set_nonblocking(false);
                let Ok(up) = TcpStream::connect(("127.0.0.1", port)) else { continue };
                let (Ok(down2), Ok(up2)) = (down.try_clone(), up.try_clone()) else { continue };
                let (a, b) = (Arc::clone(&up_count), Arc::clone(&down_count));
                std::thread::spawn(move || pump(down, up, &a));
                std::thread::spawn(move || pump(up2, down2, &b));
            }
        });
        Self { stop, to_host, from_host }
    }

    /// Bytes forwarded so far: (to the host, from the host).
    pub fn bytes(&self) -> (u64, u64) {
        (self.to_host.load(Ordering::Relaxed), self.from_host.load(Ordering::Relaxed))
    }
}

impl Drop for LoopbackForwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
