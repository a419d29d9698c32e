//! One transfer at a time: every connection that is not part of the accepted transfer is told
//! so (the protocol's ERROR code BUSY once its key is proven) and counted, also one whose
//! handshake is still running when `Receiver::accept` has gathered the first sender's
//! connections. The handshakes are written by hand and held back at chosen steps, so each
//! test orders the two senders exactly, with no timing luck.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::*;
use precopy_transfer::protocol::{
    Auth, Challenge, ErrorFrame, FrameKind, FrameReader, FrameWriter, Hello, error_code,
};
use precopy_transfer::*;

/// How a held handshake ended for its sender.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// WELCOME: the connection is the transfer's.
    Welcome,
    /// An ERROR with this code.
    Error(u32),
    /// The end of the stream, or a reset: cut off without a word.
    Cut,
}

/// A sender's handshake written by hand on a Unix socket (a receiver without a key: no proof
/// to make), stopped after the receiver's CHALLENGE: the receiver has accepted the connection
/// and waits for its AUTH.
struct Held {
    r: FrameReader<Connection>,
    w: FrameWriter<Connection>,
}

impl Held {
    fn start(conn: Connection, session: u64, stream_index: u32, stream_count: u32) -> Held {
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut w = FrameWriter::new(conn.try_clone().unwrap());
        let mut r = FrameReader::new(conn);
        w.write_preamble().unwrap();
        w.send(&Hello {
            session,
            stream_index,
            stream_count,
            nonce: [stream_index as u8; 16],
            layout: Layout::single(PS, 0, 16 * PS).unwrap().without_host(),
            resume: false,
        })
        .unwrap();
        r.read_preamble().unwrap();
        let mut p = Vec::new();
        let challenge: Challenge = r.read_frame(&mut p).unwrap().decode(&p).unwrap();
        assert!(!challenge.key_required);
        Held { r, w }
    }

    /// Sends AUTH and reads the receiver's answer.
    fn prove(mut self) -> Answer {
        if self.w.send(&Auth { mac: None }).is_err() {
            return Answer::Cut;
        }
        let mut p = Vec::new();
        match self.r.read_frame(&mut p) {
            Ok(h) if h.kind == FrameKind::Welcome => Answer::Welcome,
            Ok(h) if h.kind == FrameKind::Error => {
                Answer::Error(h.decode::<ErrorFrame>(&p).unwrap().code)
            }
            Ok(h) => panic!("unexpected {:?} in the handshake", h.kind),
            Err(_) => Answer::Cut,
        }
    }
}

/// A receiver without a key on a fresh Unix socket, accepting on its own thread.
struct Accepting {
    connect: Box<dyn Fn() -> Connection + Send>,
    /// Says when `Receiver::accept` returned.
    accepted: mpsc::Receiver<Result<(), TransferError>>,
    /// The test's go to report `Receiver::refused`.
    go: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<u64>,
    _dir: Option<tempfile::TempDir>,
}

impl Accepting {
    fn start() -> Accepting {
        let (listener, connect, dir) = listen(&Net::Unix);
        let (accepted_tx, accepted) = mpsc::channel();
        let (go, go_rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rx = match Receiver::accept(&listener, &ReceiverConfig::default()) {
                Ok(rx) => rx,
                Err(e) => {
                    accepted_tx.send(Err(e)).unwrap();
                    return 0;
                }
            };
            accepted_tx.send(Ok(())).unwrap();
            let _ = go_rx.recv();
            rx.refused()
        });
        Accepting {
            connect,
            accepted,
            go,
            thread,
            _dir: dir,
        }
    }

    /// Waits until `accept` returned the first sender's transfer.
    fn wait_accepted(&self) {
        self.accepted
            .recv()
            .unwrap()
            .expect("the first sender's transfer");
    }

    /// The connections the receiver refused.
    fn refused(self) -> u64 {
        self.go.send(()).unwrap();
        self.thread.join().unwrap()
    }
}

/// The second sender is in its handshake (its CHALLENGE read, its AUTH held back) when the
/// first sender's only connection completes and `accept` returns: it is told BUSY once it
/// proves itself, not cut off, and the refusal is counted.
#[test]
fn a_sender_in_its_handshake_when_accept_returns_is_told_busy() {
    let rx = Accepting::start();
    let connect = &rx.connect;
    let first = Held::start(connect(), 1, 0, 1);
    let second = Held::start(connect(), 2, 0, 1);
    assert_eq!(first.prove(), Answer::Welcome);
    rx.wait_accepted();
    assert_eq!(second.prove(), Answer::Error(error_code::BUSY));
    assert_eq!(rx.refused(), 1, "the busy answer is counted");
}

/// The second sender completes its handshake while `accept` still gathers the first sender's
/// connections (one of two is in): it is told BUSY, never welcomed, and counted. A connection
/// of the first sender for a stream index already in is that sender's fault: refused as a
/// protocol error, counted, and the first sender's other connection still gets in.
#[test]
fn a_sender_while_accept_gathers_the_first_ones_connections_is_told_busy() {
    let rx = Accepting::start();
    let connect = &rx.connect;
    let first0 = Held::start(connect(), 1, 0, 2);
    let first1 = Held::start(connect(), 1, 1, 2);
    assert_eq!(first0.prove(), Answer::Welcome);
    let second = Held::start(connect(), 2, 0, 1);
    assert_eq!(second.prove(), Answer::Error(error_code::BUSY));
    let again = Held::start(connect(), 1, 0, 2);
    assert_eq!(again.prove(), Answer::Error(error_code::PROTOCOL));
    assert_eq!(first1.prove(), Answer::Welcome);
    rx.wait_accepted();
    assert_eq!(rx.refused(), 2, "both refusals are counted");
}
