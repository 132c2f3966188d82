//! The resume state machine on random interleavings of two sides, their
//! apps, the old tunnel stream and the control messages: whichever side
//! moves first (or both at once, or again after a resume), every byte
//! arrives once and in order, and nothing is in flight when both pause.

#![allow(
    clippy::many_single_char_names,
    clippy::cast_possible_truncation,
    reason = "a model: sides i/o, sizes k/n"
)]

use std::collections::VecDeque;

use proptest::prelude::*;

use super::{Action, Phase, Resume};

/// One side: its state machine, its app's bytes, what reached its app.
struct Side {
    sm: Resume,
    input: Vec<u8>,
    read: usize,
    unflushed: VecDeque<u8>,
    output: Vec<u8>,
    moves_left: u8,
}

impl Side {
    fn new(input: Vec<u8>, moves: u8) -> Self {
        Self {
            sm: Resume::new(),
            input,
            read: 0,
            unflushed: VecDeque::new(),
            output: Vec::new(),
            moves_left: moves,
        }
    }
}

/// Both sides and what travels between them.
struct World {
    side: [Side; 2],
    /// Old-stream bytes in flight, from side i to the other.
    data: [VecDeque<u8>; 2],
    /// Quiesce messages in flight, from side i to the other.
    control: [VecDeque<u64>; 2],
    resumes: u32,
}

impl World {
    fn act(&mut self, i: usize, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::StopReadingApp | Action::Paused | Action::Reattach => {}
                Action::SendQuiesce { sent } => self.control[i].push_back(sent),
                Action::Close { reason } => panic!("side {i} closed the stream: {reason}"),
            }
        }
    }

    /// One step; `what` picks it, `k` sizes it. Returns false if it was not possible.
    fn step(&mut self, what: u8, k: usize) -> bool {
        let i = usize::from(what % 2);
        let o = 1 - i;
        match what / 2 % 5 {
            // The app writes, the side reads it.
            0 => {
                let s = &mut self.side[i];
                let n = k.min(s.input.len() - s.read);
                if !s.sm.may_read_app() || n == 0 {
                    return false;
                }
                s.unflushed.extend(&s.input[s.read..s.read + n]);
                s.read += n;
                s.sm.app_read(n as u64);
            }
            // The side writes into the tunnel.
            1 => {
                let s = &mut self.side[i];
                let n = k.min(s.unflushed.len());
                if n == 0 {
                    return false;
                }
                self.data[i].extend(s.unflushed.drain(..n));
                let a = s.sm.tunnel_wrote(n as u64);
                self.act(i, a);
            }
            // The tunnel delivers to the other side, which writes its app.
            2 => {
                let n = k.min(self.data[i].len());
                if n == 0 {
                    return false;
                }
                let bytes: Vec<u8> = self.data[i].drain(..n).collect();
                self.side[o].output.extend(&bytes);
                let a = self.side[o].sm.tunnel_received(n as u64);
                self.act(o, a);
            }
            // The side's daemon is being replaced.
            3 => {
                let s = &mut self.side[i];
                if s.moves_left == 0 || !matches!(s.sm.phase(), Phase::Open | Phase::Resumed) {
                    return false;
                }
                s.moves_left -= 1;
                let a = s.sm.local_quiesce();
                self.act(i, a);
            }
            // A quiesce message reaches the other side.
            _ => {
                let Some(sent) = self.control[i].pop_front() else { return false };
                let a = self.side[o].sm.peer_quiesce(sent);
                self.act(o, a);
            }
        }
        self.maybe_resume();
        true
    }

    /// Both paused: the old stream must be empty; side 0 resumes at side 1
    /// (which one resumes does not matter to the counts).
    fn maybe_resume(&mut self) {
        if self.side[0].sm.phase() != Phase::Paused || self.side[1].sm.phase() != Phase::Paused {
            return;
        }
        assert!(self.data[0].is_empty() && self.data[1].is_empty(), "bytes in flight at pause");
        assert!(self.control[0].is_empty() && self.control[1].is_empty(), "control in flight");
        let (sent, received) = (self.side[0].sm.sent(), self.side[0].sm.received());
        let a = self.side[1].sm.resume(sent, received).expect("the counts match");
        self.act(1, a);
        let a = self.side[0].sm.resumed();
        self.act(0, a);
        self.resumes += 1;
    }

    /// Runs every possible step until nothing moves.
    fn finish(&mut self) {
        for _ in 0..100_000 {
            if !(0..20u8).any(|w| self.step(w, 1 << 20)) {
                return;
            }
        }
        panic!("no quiescence");
    }
}

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn no_byte_is_lost_duplicated_or_reordered(
        a_len in 0usize..400,
        b_len in 0usize..400,
        moves in (0u8..3, 0u8..3),
        steps in proptest::collection::vec((0u8..20, 1usize..64), 0..400),
    ) {
        let mut w = World {
            side: [Side::new(bytes(a_len, 1), moves.0), Side::new(bytes(b_len, 7), moves.1)],
            data: [VecDeque::new(), VecDeque::new()],
            control: [VecDeque::new(), VecDeque::new()],
            resumes: 0,
        };
        for (what, k) in steps {
            w.step(what, k);
        }
        w.finish();
        prop_assert_eq!(&w.side[1].output, &w.side[0].input);
        prop_assert_eq!(&w.side[0].output, &w.side[1].input);
        for s in &w.side {
            prop_assert!(matches!(s.sm.phase(), Phase::Open | Phase::Resumed), "{:?}", s.sm.phase());
            prop_assert_eq!(s.moves_left, 0, "every move was made");
        }
        // Every move ended in a resume (two moves at once share one).
        let moves = u32::from(moves.0 + moves.1);
        prop_assert!(w.resumes <= moves && (moves == 0 || w.resumes >= 1), "{} resumes for {} moves", w.resumes, moves);
    }
}

#[test]
fn both_sides_moving_at_once_pause_with_one_exchange() {
    let (mut a, mut b) = (Resume::new(), Resume::new());
    a.app_read(10);
    assert_eq!(a.tunnel_wrote(10), vec![]);
    assert_eq!(b.tunnel_received(10), vec![]);
    assert_eq!(a.local_quiesce(), vec![Action::StopReadingApp, Action::SendQuiesce { sent: 10 }]);
    assert_eq!(b.local_quiesce(), vec![Action::StopReadingApp, Action::SendQuiesce { sent: 0 }]);
    assert_eq!(a.peer_quiesce(0), vec![Action::Paused]);
    assert_eq!(b.peer_quiesce(10), vec![Action::Paused]);
    // a sent 10 and received 0: the resume must say so.
    assert_eq!(b.resume(0, 10), Err(super::ResumeRefused::CountMismatch));
    assert_eq!(b.resume(10, 0), Ok(vec![Action::Reattach]));
    assert_eq!(b.resume(10, 0), Err(super::ResumeRefused::NotPaused), "a resume is accepted once");
}

#[test]
fn a_peer_that_sends_more_than_it_said_closes_the_stream() {
    let mut b = Resume::new();
    assert_eq!(b.peer_quiesce(5), vec![Action::StopReadingApp, Action::SendQuiesce { sent: 0 }]);
    assert_eq!(b.tunnel_received(5), vec![Action::Paused]);
    assert!(matches!(b.tunnel_received(1)[..], [Action::Close { .. }]));
}

#[test]
fn a_pause_not_resumed_in_time_closes_and_open_streams_do_not_care() {
    let mut a = Resume::new();
    assert_eq!(a.timed_out(), vec![]);
    a.local_quiesce();
    assert!(matches!(a.timed_out()[..], [Action::Close { reason: "not resumed in time" }]));
    assert_eq!(a.phase(), Phase::Closed);
}

#[test]
fn unflushed_bytes_hold_the_quiesce_back() {
    let mut a = Resume::new();
    a.app_read(8);
    assert_eq!(a.local_quiesce(), vec![Action::StopReadingApp]);
    assert!(!a.may_read_app());
    assert_eq!(a.tunnel_wrote(3), vec![]);
    assert_eq!(a.tunnel_wrote(5), vec![Action::SendQuiesce { sent: 8 }]);
    assert_eq!(a.phase(), Phase::AwaitingPeer);
}
