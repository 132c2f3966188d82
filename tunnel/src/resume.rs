//! Stream resume (docs/PROTOCOL.md §6), sans IO: the state of one side of a
//! resumable tunnel stream while it is quiesced, paused and resumed, so that
//! a daemon upgrade moves the stream to a new tunnel connection with no byte
//! lost, duplicated or reordered, whichever side moves first.
//!
//! Each side counts the bytes it read from its app socket and sent into the
//! tunnel (`sent`) and the bytes it received from the tunnel and wrote to its
//! app socket (`received`). To quiesce, a side stops reading its app socket,
//! flushes, and tells the other its `sent`; the other does the same and
//! answers with its own. Each then reads the old tunnel stream until it has
//! received exactly what the other said it sent: both are paused with the
//! same view of what was delivered, and the old stream carries nothing more.
//! A resume presents both counts; the paused side accepts it only if they
//! match its own.
//!
//! The driver (the daemon) feeds events in and carries out the actions that
//! come back; nothing here does IO or keeps time (the bound on a pause is the
//! driver's timer, reported with [`Resume::timed_out`]). A pause that is
//! given up (a QUIESCE with no answer in time, or one withdrawn by the
//! peer, §6.3) is left by starting a fresh machine at the same counts
//! ([`Resume::open_at`]): both sides read exactly what the other wrote, so
//! the old stream simply carries on.

/// Where one side of a resumable stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Relaying both ways.
    Open,
    /// This side stopped reading its app and is flushing, before telling the
    /// peer its count (`initiator`: this side asked to move).
    Flushing {
        /// Whether this side started the quiesce.
        initiator: bool,
        /// The peer's count, when its quiesce already arrived.
        peer_sent: Option<u64>,
    },
    /// This side told the peer its count and waits for the peer's.
    AwaitingPeer,
    /// Both counts are known; reading the old stream up to the peer's count.
    Draining {
        /// What the peer sent in all.
        peer_sent: u64,
    },
    /// Quiet: nothing in flight either way. Ready to be handed over/resumed.
    Paused,
    /// Carrying on over a new tunnel stream.
    Resumed,
    /// Given up (protocol error or the pause bound passed): the driver
    /// closes the app socket as a stream reset does today.
    Closed,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Stop reading the app socket (bytes already read are still sent).
    StopReadingApp,
    /// Send the quiesce control message with this side's count.
    SendQuiesce {
        /// Bytes this side sent into the tunnel, in all.
        sent: u64,
    },
    /// The stream is paused: hand it over or wait for the resume.
    Paused,
    /// Attach the app socket to the new tunnel stream and relay again.
    Reattach,
    /// Close the app socket (the stream is lost, as without the extension).
    Close {
        /// Why, for the log.
        reason: &'static str,
    },
}

/// Why a resume request was refused (the driver answers it with 400/401).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResumeRefused {
    /// The stream is not paused (yet, or any more).
    #[error("the stream is not paused")]
    NotPaused,
    /// The counts in the request do not match what this side delivered.
    #[error("byte counts do not match what was delivered")]
    CountMismatch,
}

/// One side of one resumable stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    phase: Phase,
    sent: u64,
    received: u64,
    /// Bytes read from the app but not yet written into the tunnel.
    unflushed: u64,
}

impl Default for Resume {
    fn default() -> Self {
        Self::new()
    }
}

impl Resume {
    /// A freshly opened stream.
    pub fn new() -> Self {
        Self { phase: Phase::Open, sent: 0, received: 0, unflushed: 0 }
    }

    /// A stream relaying again after `sent` bytes out and `received` in
    /// (early data written with the request, say).
    pub fn open_at(sent: u64, received: u64) -> Self {
        Self { phase: Phase::Open, sent, received, unflushed: 0 }
    }

    /// A paused stream taken over from the previous daemon with these
    /// counts: waiting for its resume.
    pub fn paused_at(sent: u64, received: u64) -> Self {
        Self { phase: Phase::Paused, sent, received, unflushed: 0 }
    }

    /// Where it is.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Bytes sent into the tunnel.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Bytes received from the tunnel (and so written to the app).
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Whether the driver may read its app socket now.
    pub fn may_read_app(&self) -> bool {
        matches!(self.phase, Phase::Open | Phase::Resumed)
    }

    /// The driver read `n` bytes from the app socket (only while
    /// [`Resume::may_read_app`]).
    pub fn app_read(&mut self, n: u64) {
        debug_assert!(self.may_read_app(), "read the app while {:?}", self.phase);
        self.unflushed += n;
    }

    /// The driver wrote `n` of the bytes read from the app into the tunnel.
    pub fn tunnel_wrote(&mut self, n: u64) -> Vec<Action> {
        debug_assert!(n <= self.unflushed);
        self.unflushed -= n.min(self.unflushed);
        self.sent += n;
        self.after_flush()
    }

    /// The driver received `n` bytes from the old tunnel stream (and will
    /// write them to the app socket).
    pub fn tunnel_received(&mut self, n: u64) -> Vec<Action> {
        self.received += n;
        match self.phase {
            Phase::Draining { peer_sent } if self.received > peer_sent => {
                self.close("the peer sent more than it said")
            }
            Phase::Draining { peer_sent } if self.received == peer_sent => self.pause(),
            Phase::Paused => self.close("bytes after the pause"),
            _ => Vec::new(),
        }
    }

    /// This side is to move (its daemon is being replaced): quiesce.
    pub fn local_quiesce(&mut self) -> Vec<Action> {
        match self.phase {
            Phase::Open | Phase::Resumed => {
                self.phase = Phase::Flushing { initiator: true, peer_sent: None };
                let mut a = vec![Action::StopReadingApp];
                a.extend(self.after_flush());
                a
            }
            // Already on the way (the peer moved first): nothing more to do.
            _ => Vec::new(),
        }
    }

    /// The peer's quiesce (or its answer to ours) arrived with its count.
    pub fn peer_quiesce(&mut self, peer_sent: u64) -> Vec<Action> {
        match self.phase {
            Phase::Open | Phase::Resumed => {
                self.phase = Phase::Flushing { initiator: false, peer_sent: Some(peer_sent) };
                let mut a = vec![Action::StopReadingApp];
                a.extend(self.after_flush());
                a
            }
            Phase::Flushing { initiator, peer_sent: None } => {
                // Both moved at once: the peer's message is its answer.
                self.phase = Phase::Flushing { initiator, peer_sent: Some(peer_sent) };
                self.after_flush()
            }
            Phase::AwaitingPeer => self.drain_to(peer_sent),
            _ => self.close("an unexpected quiesce"),
        }
    }

    /// A resume request arrived (over a new tunnel stream, from the peer
    /// whose identity the driver checked) with the peer's counts.
    pub fn resume(
        &mut self,
        peer_sent: u64,
        peer_received: u64,
    ) -> Result<Vec<Action>, ResumeRefused> {
        if self.phase != Phase::Paused {
            return Err(ResumeRefused::NotPaused);
        }
        if peer_sent != self.received || peer_received != self.sent {
            return Err(ResumeRefused::CountMismatch);
        }
        self.phase = Phase::Resumed;
        Ok(vec![Action::Reattach])
    }

    /// This side resumed the stream itself (it sent the resume request and
    /// got 200): relay again.
    pub fn resumed(&mut self) -> Vec<Action> {
        if self.phase == Phase::Paused {
            self.phase = Phase::Resumed;
            vec![Action::Reattach]
        } else {
            self.close("resumed while not paused")
        }
    }

    /// The driver's bound on quiescing or pausing passed.
    pub fn timed_out(&mut self) -> Vec<Action> {
        match self.phase {
            Phase::Open | Phase::Resumed | Phase::Closed => Vec::new(),
            _ => self.close("not resumed in time"),
        }
    }

    fn after_flush(&mut self) -> Vec<Action> {
        let Phase::Flushing { peer_sent, .. } = self.phase else { return Vec::new() };
        if self.unflushed > 0 {
            return Vec::new();
        }
        let mut a = vec![Action::SendQuiesce { sent: self.sent }];
        match peer_sent {
            Some(p) => a.extend(self.drain_to(p)),
            None => self.phase = Phase::AwaitingPeer,
        }
        a
    }

    fn drain_to(&mut self, peer_sent: u64) -> Vec<Action> {
        if self.received > peer_sent {
            return self.close("received more than the peer said it sent");
        }
        self.phase = Phase::Draining { peer_sent };
        if self.received == peer_sent {
            self.pause()
        } else {
            Vec::new()
        }
    }

    fn pause(&mut self) -> Vec<Action> {
        self.phase = Phase::Paused;
        vec![Action::Paused]
    }

    fn close(&mut self, reason: &'static str) -> Vec<Action> {
        self.phase = Phase::Closed;
        vec![Action::Close { reason }]
    }
}

#[cfg(test)]
mod tests;
