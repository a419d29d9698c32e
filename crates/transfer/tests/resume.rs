//! Resuming a transfer whose connections broke (the socket cut, not a process killed): the
//! receiver keeps what it applied and lets only the same sender (same session, the key proven
//! again) continue; everyone else is refused while it waits; only blocks of pages that differ
//! are sent again; and the wait is bounded.

mod common;

use common::*;
use precopy_testnet::{Dialer, Net, Target, bind, resumable_receiver};
use precopy_transfer::protocol::{
    Auth, Challenge, ErrorFrame, FrameKind, FrameReader, FrameWriter, Hello, error_code,
};
use precopy_transfer::*;
use rand::{SeedableRng, rngs::StdRng};
use std::time::Duration;

const BASE: u64 = 0x10_0000;
const PAGES: usize = 256;

/// A sender of `mem` that dials with `dialer`.
fn dialing_sender(dialer: &Dialer, mem: Vec<u8>) -> Sender<SliceSource<Vec<u8>>> {
    dialer.sender(PS, BASE, mem, &sender_config())
}

/// The receiver's configuration, waiting `resume_wait` for the sender to come back.
fn waiting(resume_wait: Duration) -> ReceiverConfig {
    ReceiverConfig {
        resume_wait,
        ..receiver_config()
    }
}

/// A resume HELLO for `session` written by hand, then an AUTH whose proof is made up (no
/// key): returns the code of the ERROR the receiver answered with.
fn resume_without_the_key(target: &Target, session: u64) -> u32 {
    let conn = target.connect().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let hello = Hello {
        session,
        stream_index: 0,
        stream_count: 1,
        nonce: [7; 16],
        layout: Layout::single(PS, 0, PAGES as u64 * PS)
            .unwrap()
            .without_host(),
        resume: true,
    };
    let mut w = FrameWriter::new(&conn);
    w.write_preamble().unwrap();
    w.send(&hello).unwrap();
    let mut r = FrameReader::new(&conn);
    r.read_preamble().unwrap();
    let mut p = Vec::new();
    let challenge: Challenge = r.read_frame(&mut p).unwrap().decode(&p).unwrap();
    assert!(challenge.key_required);
    w.send(&Auth {
        mac: Some([0x55; 32]),
    })
    .unwrap();
    let h = r.read_frame(&mut p).unwrap();
    assert_eq!(h.kind, FrameKind::Error);
    h.decode::<ErrorFrame>(&p).unwrap().code
}

/// 16 MiB: the 8 pages a cut loses lie in at most 8 blocks of 64 pages (2 MiB).
const BIG: usize = 4096;

fn cut_connection_resumes_the_same_session(net: Net) {
    let dir = tempfile::tempdir().unwrap();
    let (listener, target) = bind(net, &dir, "rx");
    let rx = resumable_receiver(listener, waiting(Duration::from_secs(20)));

    let mut mem = memory(BIG, 1);
    let dialer = Dialer::new(target.clone());
    let mut tx = dialing_sender(&dialer, mem.clone());
    let all = BASE..BASE + BIG as u64 * PS;
    let first = tx.send_round(std::slice::from_ref(&all)).unwrap();

    // The source changes a few pages; the connection breaks before they go out.
    let mut rng = StdRng::seed_from_u64(5);
    let dirty = redirty(&mut mem, BASE, 8, &mut rng);
    tx.source_mut().data_mut().copy_from_slice(&mem);
    dialer.cut();
    let err = tx.send_round(&dirty).unwrap_err();
    assert!(err.is_connection_break(), "{err:?}");
    assert!(tx.can_resume());

    // While the receiver waits: a resume of the same session without the key is refused,
    // and so is a new transfer that has the key.
    let code = resume_without_the_key(&target, tx.sink().session());
    assert_eq!(code, error_code::AUTH);
    let stranger = Sender::connect(
        vec![target.connect().unwrap()],
        Layout::single(PS, BASE, BIG as u64 * PS).unwrap(),
        SliceSource::new(BASE, vec![0xee; BIG * PS as usize]),
        &sender_config(),
    );
    let err = stranger.map(|_| ()).unwrap_err();
    assert!(
        matches!(&err, TransferError::PeerRejected { code, message }
            if *code == error_code::RESUME && message.contains("waits for its sender to resume")),
        "{err:?}"
    );

    // The sender comes back: at most the blocks of the 8 pages the cut lost are lacking.
    let lacking = tx.resume().unwrap();
    let lacking_bytes: u64 = lacking.iter().map(|r| r.end - r.start).sum();
    assert!(
        lacking_bytes <= 8 * 64 * PS,
        "{lacking_bytes} bytes lacking after a cut that lost 8 pages"
    );
    let mut again = lacking.clone();
    again.extend(dirty.iter().cloned());
    let resent = tx.send_round(&again).unwrap();
    tx.finish(FinalCheck::Full).unwrap();
    assert!(
        resent.bytes_on_wire * 4 < first.bytes_on_wire,
        "resent {} bytes, round 0 was {}",
        resent.bytes_on_wire,
        first.bytes_on_wire
    );

    let received = rx.join().unwrap().unwrap();
    assert_eq!(received.report.resumes, 1);
    assert!(
        received.memory == mem,
        "destination differs from the source"
    );
}

#[test]
fn cut_tcp_connection_resumes_the_same_session() {
    cut_connection_resumes_the_same_session(Net::Tcp);
}

#[test]
fn cut_unix_connection_resumes_the_same_session() {
    cut_connection_resumes_the_same_session(Net::Unix);
}

#[test]
fn a_sender_that_never_comes_back_fails_after_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let (listener, target) = bind(Net::Tcp, &dir, "rx");
    let rx = resumable_receiver(listener, waiting(Duration::from_millis(300)));
    let dialer = Dialer::new(target);
    let mut tx = dialing_sender(&dialer, memory(PAGES, 2));
    tx.send_round(&[BASE..BASE + 16 * PS]).unwrap();
    dialer.cut();
    let err = rx.join().unwrap().unwrap_err();
    assert!(
        matches!(&err, TransferError::ResumeTimedOut { source, .. } if source.is_connection_break()),
        "{err:?}"
    );
}

#[test]
fn a_receiver_without_the_session_refuses_the_resume_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (first, target) = bind(Net::Unix, &dir, "first");
    // A plain run does not wait for a resume: the cut fails it.
    let rx = spawn_receiver(first, receiver_config());
    let dialer = Dialer::new(target);
    let mut tx = dialing_sender(&dialer, memory(PAGES, 3));
    tx.send_round(&[BASE..BASE + 16 * PS]).unwrap();
    dialer.cut();
    assert!(rx.join().unwrap().is_err());
    // A new receiver elsewhere holds no session to resume.
    let (second, target) = bind(Net::Unix, &dir, "second");
    dialer.redirect(target);
    let rx = std::thread::spawn(move || {
        let conn = second.accept().unwrap();
        Receiver::accept_connection(conn, &receiver_config()).map(|_| ())
    });
    let err = tx.resume().unwrap_err();
    assert!(
        matches!(&err, TransferError::ResumeRefused { message, .. }
            if message.contains("holds no session to resume")),
        "{err:?}"
    );
    let refused = rx.join().unwrap().unwrap_err();
    assert!(
        matches!(
            refused,
            TransferError::Protocol(ProtocolError::ResumeRefused {
                reason: ResumeRefusal::NoSession,
                ..
            })
        ),
        "{refused:?}"
    );
}

#[test]
fn a_sender_made_with_connect_cannot_resume() {
    let (listener, connect, _dir) = listen(&common::Net::Tcp);
    let rx = spawn_receiver(listener, receiver_config());
    let mut tx = Sender::connect(
        vec![connect()],
        Layout::single(PS, BASE, PAGES as u64 * PS).unwrap(),
        SliceSource::new(BASE, memory(PAGES, 4)),
        &sender_config(),
    )
    .unwrap();
    tx.send_round(&[BASE..BASE + 16 * PS]).unwrap();
    assert!(!tx.can_resume());
    assert!(matches!(
        tx.resume(),
        Err(TransferError::Misuse {
            operation: "resume",
            ..
        })
    ));
    tx.finish(FinalCheck::Recorded).unwrap();
    rx.join().unwrap().unwrap();
}

/// The connection breaks in the final phase, after the state arrived and before FINISH: the
/// sender (its workload running again) comes back, sends another round, a new state and
/// FINISH; the receiver forgets the first state, takes the second and completes.
#[test]
fn a_final_phase_cut_after_the_state_resumes_and_takes_the_new_state() {
    let dir = tempfile::tempdir().unwrap();
    let (listener, target) = bind(Net::Tcp, &dir, "rx");
    let rx = resumable_receiver(listener, receiver_config());
    let mut mem = memory(PAGES, 8);
    let dialer = Dialer::new(target);
    let mut tx = dialing_sender(&dialer, mem.clone());
    tx.send_round(&[BASE..BASE + PAGES as u64 * PS]).unwrap();
    tx.send_state(b"first state").unwrap();
    // The PONG comes back only after the receiver handled what came before it: the state.
    tx.probe_finish().unwrap();
    dialer.cut();
    let err = tx.finish(FinalCheck::Recorded).unwrap_err();
    assert!(err.is_connection_break(), "{err:?}");
    assert!(
        tx.can_resume(),
        "not acknowledged: the final phase can be tried again"
    );

    let mut rng = StdRng::seed_from_u64(9);
    let dirty = redirty(&mut mem, BASE, 4, &mut rng);
    tx.source_mut().data_mut().copy_from_slice(&mem);
    let mut again = tx.resume().unwrap();
    again.extend(dirty.iter().cloned());
    tx.send_round(&again).unwrap();
    tx.send_state(b"second state").unwrap();
    tx.finish(FinalCheck::Full).unwrap();
    let received = rx.join().unwrap().unwrap();
    assert_eq!(received.report.resumes, 1);
    assert_eq!(received.state.as_deref(), Some(&b"second state"[..]));
    assert!(
        received.memory == mem,
        "destination differs from the source"
    );
}
