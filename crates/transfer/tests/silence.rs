//! A receiver that goes silent (a path that stops forwarding: no reset, no end of stream) is
//! noticed after the I/O timeout, whichever step meets the silence first, and the error names
//! that step. The timing itself is not asserted (a test on a shared machine must not depend on
//! wall-clock time): each test prints how late the stall was reported (`--nocapture`).

mod common;

use common::*;
use precopy_testnet::{Dialer, Net, Proxy, bind, resumable_receiver};
use precopy_transfer::*;
use rand::{SeedableRng, rngs::StdRng};
use std::time::{Duration, Instant};

const BASE: u64 = 0x10_0000;
/// 32 MiB: more than every socket buffer on the path holds, so writes must stall.
const PAGES: usize = 8192;
const IO_TIMEOUT: Duration = Duration::from_secs(1);

/// A receiver behind a proxy, a sender (I/O timeout 1 s) connected through it that has sent
/// round 0, and the proxy.
fn sender_through_a_proxy(
    net: Net,
    dir: &tempfile::TempDir,
) -> (
    Sender<SliceSource<Vec<u8>>>,
    Proxy,
    std::thread::JoinHandle<()>,
) {
    let (listener, target) = bind(net, dir, "rx");
    let rx = spawn_receiver(listener, receiver_config());
    let rx = std::thread::spawn(move || {
        // Ends when the proxy is dropped and the receiver's connection closes.
        let _ = rx.join();
    });
    let proxy = Proxy::start(net, dir, target);
    let config = SenderConfig {
        io_timeout: Some(IO_TIMEOUT),
        ..sender_config()
    };
    let mut tx = Sender::connect(
        vec![proxy.target.connect().unwrap()],
        Layout::single(PS, BASE, PAGES as u64 * PS).unwrap(),
        SliceSource::new(BASE, memory(PAGES, 11)),
        &config,
    )
    .unwrap();
    tx.send_round(&[BASE..BASE + 64 * PS]).unwrap();
    (tx, proxy, rx)
}

fn a_silent_receiver_stalls_the_round_after_the_io_timeout(net: Net) {
    let dir = tempfile::tempdir().unwrap();
    let (mut tx, proxy, rx) = sender_through_a_proxy(net, &dir);
    proxy.blackhole();
    let at = Instant::now();
    let err = tx
        .send_round(&[BASE..BASE + PAGES as u64 * PS])
        .unwrap_err();
    let took = at.elapsed();
    assert!(
        matches!(&err, TransferError::Stalled { what, after, .. }
            if *what == "sending frames to" && *after == IO_TIMEOUT),
        "{err:?}"
    );
    assert!(
        !err.is_connection_break(),
        "a stall is not a break: {err:?}"
    );
    // Includes filling the path's buffers (a few ms on loopback).
    eprintln!(
        "{net:?}: write stall reported {:.0} ms after the path went silent, I/O timeout {} ms: {:+.0} ms late",
        took.as_secs_f64() * 1e3,
        IO_TIMEOUT.as_millis(),
        (took.as_secs_f64() - IO_TIMEOUT.as_secs_f64()) * 1e3
    );
    drop(tx);
    drop(proxy);
    rx.join().unwrap();
}

#[test]
fn a_silent_tcp_receiver_stalls_the_round_after_the_io_timeout() {
    a_silent_receiver_stalls_the_round_after_the_io_timeout(Net::Tcp);
}

#[test]
fn a_silent_unix_receiver_stalls_the_round_after_the_io_timeout() {
    a_silent_receiver_stalls_the_round_after_the_io_timeout(Net::Unix);
}

/// The PING between rounds meets the silence first: it fails naming the wait for the PONG,
/// and the next round reports the same stall at once instead of waiting a second timeout.
#[test]
fn a_silent_receiver_fails_the_ping_and_the_next_round_reports_the_same_stall() {
    let dir = tempfile::tempdir().unwrap();
    let (mut tx, proxy, rx) = sender_through_a_proxy(Net::Tcp, &dir);
    proxy.blackhole();
    let at = Instant::now();
    let err = tx.probe_finish().unwrap_err();
    let took = at.elapsed();
    assert!(
        matches!(&err, TransferError::Stalled { what, .. } if *what == "waiting for the PONG of"),
        "{err:?}"
    );
    let again = Instant::now();
    let err = tx.send_round(&[BASE..BASE + 64 * PS]).unwrap_err();
    let then = again.elapsed();
    assert!(
        matches!(&err, TransferError::Stalled { what, .. } if *what == "waiting for the PONG of"),
        "{err:?}"
    );
    eprintln!(
        "PONG stall after {:.0} ms (I/O timeout {} ms); the next round failed {:.1} ms later",
        took.as_secs_f64() * 1e3,
        IO_TIMEOUT.as_millis(),
        then.as_secs_f64() * 1e3
    );
    drop(tx);
    drop(proxy);
    rx.join().unwrap();
}

/// A path that goes silent in the middle of a transfer: the sender's round stalls, the sender
/// dials again (a new path), and the receiver, which saw no break on its side, takes the same
/// session back from the new connection; only what it lacks is sent again, and the final
/// check proves the copy.
#[test]
fn a_silent_path_is_resumed_on_a_new_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (listener, target) = bind(Net::Tcp, &dir, "rx");
    let rx = resumable_receiver(listener, receiver_config());
    let proxy = Proxy::start(Net::Tcp, &dir, target);
    let mut mem = memory(PAGES, 12);
    let config = SenderConfig {
        io_timeout: Some(IO_TIMEOUT),
        ..sender_config()
    };
    let mut tx = Dialer::new(proxy.target.clone()).sender(PS, BASE, mem.clone(), &config);
    let first = tx.send_round(&[BASE..BASE + PAGES as u64 * PS]).unwrap();

    // Half the memory changes; the path goes silent before it goes out.
    let mut rng = StdRng::seed_from_u64(13);
    let dirty = redirty(&mut mem, BASE, PAGES / 2, &mut rng);
    tx.source_mut().data_mut().copy_from_slice(&mem);
    proxy.blackhole();
    let err = match tx.send_round(&dirty) {
        Err(e) => e,
        // The round fitted in the silent path's socket buffers (loopback TCP grows them to
        // tens of MiB): the wait for the final acknowledgement stalls instead.
        Ok(_) => tx.finish(FinalCheck::Full).unwrap_err(),
    };
    assert!(matches!(&err, TransferError::Stalled { .. }), "{err:?}");
    assert!(tx.can_resume());
    let lacking = tx.resume().expect("resumed on a new connection");
    let mut again = lacking;
    again.extend(dirty.iter().cloned());
    let resent = tx.send_round(&again).unwrap();
    tx.finish(FinalCheck::Full).unwrap();
    let received = rx.join().unwrap().expect("receiver");
    assert_eq!(received.report.resumes, 1);
    assert!(
        received.memory == mem,
        "destination differs from the source"
    );
    eprintln!(
        "silent path resumed: round 0 {} bytes, after the resume {} bytes",
        first.bytes_on_wire, resent.bytes_on_wire
    );
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(300);

/// Whether `err` is the handshake's timeout, said as one: the step, how long, and no
/// "Resource temporarily unavailable (os error 11)" (how the kernel reports a socket timeout).
fn handshake_timed_out(err: &TransferError) -> bool {
    let msg = err.to_string();
    matches!(err, TransferError::Stalled { what, after, .. }
        if *what == "the handshake with" && *after == HANDSHAKE_TIMEOUT)
        && msg.contains("no progress for 300ms")
        && !msg.contains("os error")
}

/// A receiver that takes the connection and never answers the handshake (busy with another
/// sender): the sender's handshake times out and says so.
#[test]
fn a_handshake_the_receiver_never_answers_times_out_and_says_so() {
    let (listener, connect, _dir) = listen(&common::Net::Tcp);
    let config = SenderConfig {
        handshake_timeout: HANDSHAKE_TIMEOUT,
        ..sender_config()
    };
    let err = Sender::connect(
        vec![connect()],
        Layout::single(PS, BASE, 4 * PS).unwrap(),
        SliceSource::new(BASE, memory(4, 1)),
        &config,
    )
    .map(|_| ())
    .unwrap_err();
    assert!(handshake_timed_out(&err), "{err:?}: {err}");
    drop(listener);
}

/// The other way round: a sender that connects and never says HELLO.
#[test]
fn a_sender_that_never_says_hello_times_the_receivers_handshake_out() {
    let (listener, connect, _dir) = listen(&common::Net::Tcp);
    let _quiet = connect();
    let config = ReceiverConfig {
        handshake_timeout: HANDSHAKE_TIMEOUT,
        ..receiver_config()
    };
    let err = Receiver::accept_connection(listener.accept().unwrap(), &config)
        .map(|_| ())
        .unwrap_err();
    assert!(handshake_timed_out(&err), "{err:?}: {err}");
}

/// The receiver's silence bound covers all of a sender's connections together (progress on
/// one counts for all), yet a sender whose every connection goes silent still fails it: two
/// streams send round 0, then nothing; the receiver stops on the timeout, naming it.
#[test]
fn a_silent_sender_of_two_streams_fails_the_receivers_io_timeout() {
    let (listener, connect, _dir) = listen(&common::Net::Tcp);
    let after = Duration::from_millis(300);
    let rx = spawn_receiver(
        listener,
        ReceiverConfig {
            io_timeout: Some(after),
            ..receiver_config()
        },
    );
    let config = SenderConfig {
        streams: 2,
        ..sender_config()
    };
    let mut tx = Sender::connect(
        vec![connect(), connect()],
        Layout::single(PS, BASE, 64 * PS).unwrap(),
        SliceSource::new(BASE, memory(64, 5)),
        &config,
    )
    .unwrap();
    tx.send_round(&[BASE..BASE + 64 * PS]).unwrap();
    // The sender stays connected and sends nothing more.
    let err = rx.join().unwrap().map(|_| ()).unwrap_err();
    assert!(
        matches!(&err, TransferError::Stalled { what, after: a, .. }
            if *what == "receiving frames from" && *a == after),
        "{err:?}"
    );
    drop(tx);
}
