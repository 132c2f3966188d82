//! The plugin's side of the daemon socket: blocking std I/O with deadlines,
//! one request and one response per connection.

use std::{
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use crate::{
    plugin::{Daemon, DaemonError},
    protocol::{Request, Response, MAX_MESSAGE},
};

/// Talks to the daemon over its Unix socket.
#[derive(Debug, Default)]
pub struct SocketDaemon;

impl Daemon for SocketDaemon {
    fn call(
        &mut self,
        socket: &Path,
        req: &Request,
        timeout: Duration,
    ) -> Result<Response, DaemonError> {
        call(socket, req, timeout)
    }
}

/// Sends `req` and waits up to `timeout` for the whole answer.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, DaemonError> {
    let deadline = Instant::now() + timeout;
    let mut stream = UnixStream::connect(socket).map_err(DaemonError::Unreachable)?;
    let timed_out = |e: std::io::Error| match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => DaemonError::Timeout(timeout),
        _ => DaemonError::Protocol(format!("connection to the daemon failed: {e}")),
    };
    stream.set_write_timeout(Some(timeout)).map_err(timed_out)?;
    let mut line = serde_json::to_vec(req).map_err(|e| DaemonError::Protocol(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(timed_out)?;
    let mut reader = BufReader::new(stream.take(MAX_MESSAGE as u64));
    let mut answer = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(DaemonError::Timeout(timeout));
        }
        reader.get_ref().get_ref().set_read_timeout(Some(left)).map_err(timed_out)?;
        match reader.read_until(b'\n', &mut answer) {
            Ok(0) => break,
            Ok(_) if answer.ends_with(b"\n") => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(timed_out(e)),
        }
    }
    if answer.is_empty() {
        return Err(DaemonError::Protocol(
            "the daemon closed the connection without answering".into(),
        ));
    }
    serde_json::from_slice(&answer).map_err(|e| DaemonError::Protocol(e.to_string()))
}
