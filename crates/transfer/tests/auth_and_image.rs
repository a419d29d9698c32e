//! Authentication of peers, and checkpoint images cut short.

mod common;

use common::*;
use precopy_transfer::digest::page_hash;
use precopy_transfer::*;

const BASE: u64 = 0x40_0000;

fn key(b: u8) -> Key {
    Key::from_bytes(vec![b; 32]).unwrap()
}

/// A receiver with `receiver_key`: a sender with `sender_key` tries first (refused), then one
/// with the right key sends everything. Returns the first sender's result and the receiver's
/// report: it kept listening after the refusal.
fn try_transfer(
    sender_key: Option<Key>,
    receiver_key: Key,
) -> (Result<(), TransferError>, ReceiveReport) {
    let (listener, connect, _d) = listen(&Net::Tcp);
    let rx = spawn_receiver(
        listener,
        ReceiverConfig {
            key: Some(receiver_key.clone()),
            ..receiver_config()
        },
    );
    let layout = Layout::single(PS, BASE, 4 * PS).unwrap();
    let config = SenderConfig {
        key: sender_key,
        ..sender_config()
    };
    let sent = Sender::connect(
        vec![connect()],
        layout.clone(),
        SliceSource::new(BASE, vec![3u8; 4 * PS as usize]),
        &config,
    )
    .map(|_| ());
    let config = SenderConfig {
        key: Some(receiver_key),
        ..sender_config()
    };
    let mut tx = Sender::connect(
        vec![connect()],
        layout,
        SliceSource::new(BASE, vec![5u8; 4 * PS as usize]),
        &config,
    )
    .expect("the receiver still listens after a refused sender");
    tx.send_round(&[BASE..BASE + 4 * PS]).unwrap();
    tx.finish(FinalCheck::Full).unwrap();
    let (report, mem) = rx.join().unwrap().expect("the right sender's transfer");
    assert!(mem.iter().all(|&b| b == 5), "only the right sender's pages");
    (sent, report)
}

#[test]
fn sender_without_key_is_refused_and_the_receiver_keeps_listening() {
    let (sent, report) = try_transfer(None, key(1));
    let err = sent.unwrap_err();
    assert!(matches!(err, TransferError::AuthRequired { .. }), "{err:?}");
    // Named in the field's terms: the receiver, at its address, requires a key.
    let receiver = match &err {
        TransferError::AuthRequired { receiver } => receiver.clone(),
        _ => unreachable!(),
    };
    assert!(receiver.starts_with("127.0.0.1:"), "{receiver}");
    assert!(
        err.to_string()
            .contains(&format!("the receiver at {receiver} requires a shared key")),
        "{err}"
    );
    assert_eq!(report.refused, 1);
}

#[test]
fn sender_with_wrong_key_is_refused_and_the_receiver_keeps_listening() {
    let (sent, report) = try_transfer(Some(key(2)), key(1));
    let err = sent.unwrap_err();
    // The sender is told its key was refused, and the receiver's reason names the sender by
    // its address, not as "peer".
    assert!(
        matches!(&err, TransferError::KeyRefused { message, .. }
            if message.starts_with("the sender at 127.0.0.1:") && message.contains("presented a different key")),
        "{err}"
    );
    assert!(
        err.to_string().contains("refused this sender's key"),
        "{err}"
    );
    assert_eq!(report.refused, 1);
}

/// A receiver takes one transfer at a time: run with `run_refusing_others`, it answers a second
/// sender (key proven) that it is busy, and that sender says so instead of meeting a reset
/// when the receiver ends; the first transfer completes, and the refusal is counted.
#[test]
fn a_second_sender_is_told_the_receiver_is_busy() {
    for (name, net) in [("unix", Net::Unix), ("tcp", Net::Tcp)] {
        let (listener, connect, _d) = listen(&net);
        let config = ReceiverConfig {
            key: Some(key(7)),
            ..receiver_config()
        };
        let rx = std::thread::spawn(move || {
            let rx = Receiver::accept(&listener, &config)?;
            let mut sink = MemorySink::new(rx.layout().clone())?;
            let report = rx.run_refusing_others(&listener, &mut sink)?;
            Ok::<_, TransferError>(report)
        });
        let layout = Layout::single(PS, BASE, 4 * PS).unwrap();
        let config = SenderConfig {
            key: Some(key(7)),
            ..sender_config()
        };
        let mut first = Sender::connect(
            vec![connect()],
            layout.clone(),
            SliceSource::new(BASE, vec![5u8; 4 * PS as usize]),
            &config,
        )
        .unwrap();
        first.send_round(&[BASE..BASE + 4 * PS]).unwrap();
        // A PING answered: the receiver runs the transfer (a sender that connects while
        // `accept` still gathers is told the same: tests/busy.rs).
        first.probe_finish().unwrap();
        let second = Sender::connect(
            vec![connect()],
            layout,
            SliceSource::new(BASE, vec![6u8; 4 * PS as usize]),
            &config,
        )
        .map(|_| ());
        let err = second.unwrap_err();
        assert!(
            matches!(err, TransferError::ReceiverBusy { .. }),
            "{name}: {err:?}"
        );
        assert!(
            err.to_string().contains("busy with another transfer"),
            "{err}"
        );
        first.finish(FinalCheck::Full).unwrap();
        let report = rx.join().unwrap().expect("the first transfer");
        assert_eq!(report.refused, 1);
    }
}

/// Strangers first: a connection that sends garbage, one that stays silent (its handshake
/// would hold a one-at-a-time receiver for the whole handshake timeout) and a sender with the
/// wrong key. Each is refused (the silent one is cut off when the transfer ends), the
/// receiver keeps listening, and the real sender's transfer completes into an image.
#[test]
fn garbage_a_silent_peer_and_a_wrong_key_first_then_a_real_send_completes_into_the_image() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let l = Listener::bind_tcp("127.0.0.1:0").unwrap();
    let addr = l.address();
    let image = path.clone();
    let rx = std::thread::spawn(move || {
        let rx = Receiver::accept(&l, &receiver_config())?;
        let mut sink = ImageWriter::create(&image, rx.layout().clone())?;
        rx.run(&mut sink)
    });
    // Garbage: refused with an ERROR, closed.
    let mut garbage = std::net::TcpStream::connect(&addr).unwrap();
    garbage.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = garbage.read_to_end(&mut answer);
    // Silent: connected, never says a word.
    let silent = std::net::TcpStream::connect(&addr).unwrap();
    // The wrong key.
    let layout = Layout::single(PS, BASE, 8 * PS).unwrap();
    let wrong = Sender::connect(
        vec![Connection::connect_tcp(&addr).unwrap()],
        layout.clone(),
        SliceSource::new(BASE, vec![9u8; 8 * PS as usize]),
        &SenderConfig {
            key: Some(key(0xee)),
            ..sender_config()
        },
    );
    assert!(
        matches!(&wrong, Err(TransferError::KeyRefused { .. })),
        "{:?}",
        wrong.map(|_| ())
    );
    // The real sender, while the silent connection still waits in its handshake.
    let mem = memory(8, 21);
    let mut tx = Sender::connect(
        vec![Connection::connect_tcp(&addr).unwrap()],
        layout,
        SliceSource::new(BASE, mem.clone()),
        &sender_config(),
    )
    .expect("the receiver still listens after three strangers");
    tx.send_round(&[BASE..BASE + 8 * PS]).unwrap();
    tx.finish(FinalCheck::Recorded).unwrap();
    let report = rx.join().unwrap().expect("the real sender's transfer");
    assert_eq!(report.refused, 2, "the garbage and the wrong key");
    let img = Image::open(&path).unwrap();
    assert!(img.is_complete());
    assert_eq!(img.read_span_to_vec(0..8 * PS).unwrap(), mem);
    drop(silent);
}

#[test]
fn right_key_works_and_receiver_proves_itself() {
    let (listener, connect, _d) = listen(&Net::Tcp);
    let rx = spawn_receiver(
        listener,
        ReceiverConfig {
            key: Some(key(7)),
            ..receiver_config()
        },
    );
    let layout = Layout::single(PS, BASE, 4 * PS).unwrap();
    let config = SenderConfig {
        key: Some(key(7)),
        streams: 2,
        ..sender_config()
    };
    let mut tx = Sender::connect(
        vec![connect(), connect()],
        layout,
        SliceSource::new(BASE, vec![3u8; 4 * PS as usize]),
        &config,
    )
    .unwrap();
    tx.send_round(&[BASE..BASE + 4 * PS]).unwrap();
    tx.finish(FinalCheck::Full).unwrap();
    let (_, mem) = rx.join().unwrap().unwrap();
    assert!(mem.iter().all(|&b| b == 3));

    // A sender holding a key refuses a receiver that cannot prove it has it
    // (a keyless receiver exists only on a Unix socket).
    let (listener, connect, _d) = listen(&Net::Unix);
    let rx = spawn_receiver(listener, ReceiverConfig::default());
    let config = SenderConfig {
        key: Some(key(7)),
        ..sender_config()
    };
    let layout = Layout::single(PS, BASE, 4 * PS).unwrap();
    let err = Sender::connect(
        vec![connect()],
        layout,
        SliceSource::new(BASE, vec![0u8; 4]),
        &config,
    )
    .unwrap_err();
    assert!(matches!(err, TransferError::AuthFailed { .. }), "{err}");
    assert!(rx.join().unwrap().is_err());
}

#[test]
fn non_loopback_listener_requires_a_key() {
    let l = Listener::bind_tcp("0.0.0.0:0").unwrap();
    let err = Receiver::accept(&l, &ReceiverConfig::default()).unwrap_err();
    assert!(matches!(err, TransferError::KeyRequired { .. }), "{err}");
}

/// Any local user can connect to a loopback port: a keyless TCP receiver
/// refuses to start, and says how to make a key.
#[test]
fn loopback_listener_requires_a_key_too() {
    let l = Listener::bind_tcp("127.0.0.1:0").unwrap();
    let err = Receiver::accept(&l, &ReceiverConfig::default()).unwrap_err();
    assert!(matches!(err, TransferError::KeyRequired { .. }), "{err}");
    assert!(err.to_string().contains("/dev/urandom"), "{err}");
}

#[test]
fn random_key_goes_through_an_owner_only_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("key");
    let k = Key::random();
    k.write_new_file(&p).unwrap();
    let mode = std::fs::metadata(&p).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // Never overwritten.
    assert!(matches!(
        Key::random().write_new_file(&p),
        Err(TransferError::KeyFile { .. })
    ));
    // Both ends holding it authenticate.
    let read = Key::from_file(&p).unwrap();
    let (listener, connect, _d) = listen(&Net::Tcp);
    let rx = spawn_receiver(
        listener,
        ReceiverConfig {
            key: Some(read),
            ..ReceiverConfig::default()
        },
    );
    let config = SenderConfig {
        key: Some(k),
        ..SenderConfig::default()
    };
    let layout = Layout::single(PS, BASE, 4 * PS).unwrap();
    let mut tx = Sender::connect(
        vec![connect()],
        layout,
        SliceSource::new(BASE, vec![5u8; 4 * PS as usize]),
        &config,
    )
    .unwrap();
    tx.send_round(&[BASE..BASE + 4 * PS]).unwrap();
    tx.finish(FinalCheck::Recorded).unwrap();
    let (_, mem) = rx.join().unwrap().unwrap();
    assert!(mem.iter().all(|&b| b == 5));
    // A key file others may read is no secret.
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(
        Key::from_file(&p),
        Err(TransferError::BadKey { .. })
    ));
}

#[test]
fn key_file_is_read_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("key");
    std::fs::write(&p, b"0123456789abcdef0123\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    Key::from_file(&p).unwrap();
    std::fs::write(&p, b"short\n").unwrap();
    assert!(matches!(
        Key::from_file(&p),
        Err(TransferError::BadKey { .. })
    ));
    assert!(matches!(
        Key::from_file(&dir.path().join("missing")),
        Err(TransferError::KeyFile { .. })
    ));
}

#[test]
fn key_file_that_is_not_a_regular_file_is_refused_without_blocking() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // A FIFO with no writer: reading it would wait forever.
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let err = Key::from_file(&fifo).unwrap_err();
    assert!(
        matches!(&err, TransferError::KeyNotAFile { kind: "a FIFO", path } if *path == fifo),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("not a regular file (a FIFO)"),
        "{err}"
    );
    let sub = dir.path().join("dir");
    std::fs::create_dir(&sub).unwrap();
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(matches!(
        Key::from_file(&sub),
        Err(TransferError::KeyNotAFile {
            kind: "a directory",
            ..
        })
    ));
    assert!(matches!(
        Key::from_file(std::path::Path::new("/dev/null")),
        Err(TransferError::KeyNotAFile {
            kind: "a character device",
            ..
        })
    ));
}

fn write_image(path: &std::path::Path) -> Vec<u8> {
    let pages = 24;
    let layout = Layout::single(PS, BASE, pages as u64 * PS).unwrap();
    let mem = memory(pages, 11);
    let mut tx = Transfer::new(
        SliceSource::new(BASE, mem),
        ImageWriter::create(path, layout.clone()).unwrap(),
        layout,
        4,
    )
    .unwrap();
    tx.send_round(&[BASE..BASE + pages as u64 * PS]).unwrap();
    tx.source_mut().data_mut()[..PS as usize].fill(9);
    tx.send_round(&[BASE..BASE + PS]).unwrap();
    tx.finish(FinalCheck::Full).unwrap();
    std::fs::read(path).unwrap()
}

#[test]
fn image_cut_anywhere_never_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full");
    let bytes = write_image(&path);
    let full = Image::open(&path).unwrap();
    assert!(full.is_complete());
    full.verify().unwrap();

    let cut_path = dir.path().join("cut");
    // Every byte near the end (where the trailer and index live) and a stride
    // through the rest, including inside page payloads and headers.
    let mut cuts: Vec<usize> = (bytes.len().saturating_sub(300)..bytes.len()).collect();
    cuts.extend((0..bytes.len()).step_by(509));
    for cut in cuts {
        std::fs::write(&cut_path, &bytes[..cut]).unwrap();
        match Image::open(&cut_path) {
            Ok(img) => {
                assert!(!img.is_complete(), "cut at {cut} looks complete");
                assert!(!img.info().complete);
                assert!(img.verify().is_err(), "cut at {cut} verifies");
            }
            Err(_) => assert!(
                cut < 200,
                "only a cut inside the header may fail to open ({cut})"
            ),
        }
    }
}

#[test]
fn damaged_image_fails_verify_and_incomplete_rounds_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let mut bytes = write_image(&path);
    // Flip a byte in the middle of some page data: open (which skips page
    // payloads) still finds it complete, verify finds the bad record.
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let img = Image::open(&path).unwrap();
    let err = img.verify().unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::Corrupt { .. } | ImageError::ChecksumMismatch { .. }
        ),
        "{err}"
    );

    // An image whose writer stopped mid-round shows only ended rounds.
    let layout = Layout::single(PS, BASE, 4 * PS).unwrap();
    let mut w = ImageWriter::create(&path, layout).unwrap();
    w.begin_round(0).unwrap();
    w.send_pages(0, page(5), &[page_hash(&page(5))]).unwrap();
    w.end_round(0).unwrap();
    w.begin_round(1).unwrap();
    w.send_pages(PS, page(6), &[page_hash(&page(6))]).unwrap();
    drop(w);
    // Never completed: it stays at the partial path.
    let img = Image::open(ImageWriter::partial_path(&path)).unwrap();
    let info = img.info();
    assert!(!info.complete);
    assert_eq!(info.rounds.len(), 1);
    assert_eq!(info.data_pages, 1);
    assert_eq!(img.read_span_to_vec(PS..PS + 4).unwrap(), vec![0; 4]);
    assert!(matches!(img.verify(), Err(ImageError::Incomplete { .. })));
}

#[test]
fn image_refuses_wrong_checksum_and_stays_incomplete() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let layout = Layout::single(PS, BASE, 2 * PS).unwrap();
    let mut w = ImageWriter::create(&path, layout).unwrap();
    w.begin_round(0).unwrap();
    w.send_pages(0, page(5), &[page_hash(&page(5))]).unwrap();
    w.end_round(0).unwrap();
    assert!(matches!(
        w.finish(1, FinalCheck::Recorded),
        Err(TransferError::ChecksumMismatch { .. })
    ));
    drop(w);
    let partial = ImageWriter::partial_path(&path);
    assert!(!Image::open(&partial).unwrap().is_complete());
}

/// A page filled with `byte`.
fn page(byte: u8) -> PageBuf {
    PageBuf::from_vec(vec![byte; PS as usize])
}

/// Set in the copy of this test binary that runs as another user: the socket
/// to try.
const CONNECT_AS_OTHER_USER: &str = "PRECOPY_TEST_CONNECT_UNIX";

/// Runs this test binary as user `nobody` (uid/gid 65534) trying to connect
/// to `path`; `Some(true)` if it connected, `Some(false)` if refused with
/// EACCES, `None` if the user switch itself failed.
fn connect_as_nobody(path: &std::path::Path) -> Option<bool> {
    use std::os::unix::process::CommandExt;
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "unix_socket_refuses_another_user",
            "--test-threads=1",
        ])
        .env(CONNECT_AS_OTHER_USER, path)
        .uid(65534)
        .gid(65534)
        .status()
        .ok()?;
    match status.code() {
        Some(0) => Some(true),
        Some(13) => Some(false),
        _ => None,
    }
}

/// A Unix listener is created owner-only: another user cannot connect (and
/// can, as a control, once the socket's mode is opened up).
#[test]
fn unix_socket_refuses_another_user() {
    if let Some(path) = std::env::var_os(CONNECT_AS_OTHER_USER) {
        // The copy running as `nobody`.
        let code = match std::os::unix::net::UnixStream::connect(&path) {
            Ok(_) => 0,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => 13,
            Err(_) => 1,
        };
        std::process::exit(code);
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP unix_socket_refuses_another_user: needs root to run a probe as `nobody`");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // The directory is open to all, so only the socket's own mode can refuse.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("sock");
    let _l = Listener::bind_unix(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    match connect_as_nobody(&path) {
        None => {
            eprintln!("SKIP unix_socket_refuses_another_user: could not run a probe as uid 65534");
            return;
        }
        Some(connected) => assert!(!connected, "another user connected to an owner-only socket"),
    }
    // Control: the same probe gets in once the mode allows it.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(
        connect_as_nobody(&path),
        Some(true),
        "the probe itself is broken"
    );
}

/// A Unix listener's path appears only once the socket listens, so a client that connects
/// the moment it sees the file gets in (the unit test `the_path_does_not_exist_between_the_bind_
/// and_the_listen` looks between the two steps; this race alone rarely hit the old gap). Each
/// round binds while a thread watches for the file; the file is owner-only, nothing else is
/// left in the directory, and the listener and the client name the path itself, not the
/// staging name the socket was bound under.
#[test]
fn a_unix_socket_file_appears_only_once_it_listens() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sock");
    for _ in 0..20 {
        let watcher = {
            let path = path.clone();
            std::thread::spawn(move || {
                while std::fs::symlink_metadata(&path).is_err() {
                    std::hint::spin_loop();
                }
                Connection::connect_unix(&path)
            })
        };
        let l = Listener::bind_unix(&path).unwrap();
        let client = watcher
            .join()
            .unwrap()
            .expect("connected as soon as the file appeared");
        let listed: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(listed, ["sock"]);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        assert_eq!(l.address(), path.display().to_string());
        assert_eq!(client.peer(), format!("unix:{}", path.display()));
        drop(l);
        std::fs::remove_file(&path).unwrap();
    }
}

/// A file at a Unix listener's path is never replaced: binding fails as a bind there would
/// (address in use), the file stays as it was, and no staging name is left behind.
#[test]
fn a_unix_listener_never_replaces_a_file_at_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sock");
    std::fs::write(&path, "keep me").unwrap();
    let err = Listener::bind_unix(&path).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    // A live listener's path is in use; once it is gone, its file is not.
    let live = dir.path().join("live");
    let l = Listener::bind_unix(&live).unwrap();
    assert!(Listener::unix_path_in_use(&live).unwrap());
    drop(l);
    assert!(!Listener::unix_path_in_use(&live).unwrap());
}

#[test]
fn a_transfer_that_never_finishes_leaves_the_earlier_image_in_place() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let before = write_image(&path);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600,
        "an image holds a process's memory: owner-only"
    );
    // A second transfer to the same path that fails before finishing.
    let layout = Layout::single(PS, BASE, 4 * PS).unwrap();
    let mut w = ImageWriter::create(&path, layout).unwrap();
    w.begin_round(0).unwrap();
    w.send_pages(0, page(7), &[page_hash(&page(7))]).unwrap();
    drop(w);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the earlier image changed"
    );
    assert!(Image::open(&path).unwrap().is_complete());
    let partial = ImageWriter::partial_path(&path);
    assert!(!Image::open(&partial).unwrap().is_complete());
}

/// Sends 4 pages to a receiver writing an image at `path`; the sender commits if `commit`,
/// else it gives up after the acknowledgement (as a driver whose final round ran past its
/// bound). Returns the receiver's result.
fn receive_into_image(
    path: &std::path::Path,
    commit: bool,
) -> Result<ReceiveReport, TransferError> {
    let (listener, connect, _d) = listen(&Net::Unix);
    let path = path.to_owned();
    let rx = std::thread::spawn(move || {
        let rx = Receiver::accept(&listener, &receiver_config())?;
        let mut sink = ImageWriter::create(&path, rx.layout().clone())?;
        rx.run(&mut sink)
    });
    let layout = Layout::single(PS, BASE, 4 * PS).unwrap();
    let mut tx = Sender::connect(
        vec![connect()],
        layout,
        SliceSource::new(BASE, memory(4, 5)),
        &sender_config(),
    )
    .unwrap();
    tx.send_round(&[BASE..BASE + 4 * PS]).unwrap();
    tx.finish_uncommitted(FinalCheck::Recorded).unwrap();
    if commit {
        tx.commit().unwrap();
    }
    drop(tx);
    rx.join().unwrap()
}

#[test]
fn a_receiver_publishes_its_image_only_after_the_senders_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let before = write_image(&path);
    let err = receive_into_image(&path, false).unwrap_err();
    // The sender gave up between frames (after the acknowledgement): the receiver says it
    // ended the transfer, not that a stream was cut.
    assert!(
        matches!(&err, TransferError::NotCommitted { source, .. }
            if matches!(**source, TransferError::Protocol(ProtocolError::SenderClosed { .. }))),
        "{err:?}"
    );
    assert!(
        precopy_sys::error_chain(&err).contains("the sender ended the transfer"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "an image the sender never committed replaced the earlier one"
    );
    let report = receive_into_image(&path, true).unwrap();
    assert_eq!(report.pages + report.zero_pages, 4);
    let image = Image::open(&path).unwrap();
    assert!(image.is_complete());
    assert_eq!(
        image.read_span_to_vec(0..4 * PS).unwrap(),
        memory(4, 5),
        "the committed image holds what was sent"
    );
    assert!(!ImageWriter::partial_path(&path).exists());
}

#[test]
fn check_destination_refuses_what_create_would() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir/img");
    assert!(matches!(
        ImageWriter::check_destination(&missing),
        Err(ImageError::NoDirectory { dir: d }) if d == dir.path().join("no-such-dir")
    ));
    assert!(matches!(
        ImageWriter::check_destination(dir.path()),
        Err(ImageError::NotAFile {
            kind: "a directory",
            ..
        })
    ));
    let layout = Layout::single(PS, BASE, PS).unwrap();
    assert!(matches!(
        ImageWriter::create(&missing, layout.clone()),
        Err(TransferError::Image(ImageError::NoDirectory { .. }))
    ));
    let fine = dir.path().join("img");
    ImageWriter::check_destination(&fine).unwrap();
    ImageWriter::create(&fine, layout).unwrap();
}

/// A name that fits `NAME_MAX` only without the writer's suffixes, and a directory on a file
/// system that takes no files (`/proc`, where creating fails with "No such file or
/// directory" even for root), are refused before anything is written, saying why.
#[test]
fn check_destination_refuses_a_name_too_long_and_a_pseudo_file_system() {
    let dir = tempfile::tempdir().unwrap();
    // ".partial.compacting" is 19 bytes: 236 + 19 = 255 fits, 237 does not.
    let fits = dir.path().join("a".repeat(236));
    ImageWriter::check_destination(&fits).unwrap();
    let layout = Layout::single(PS, BASE, PS).unwrap();
    ImageWriter::create(&fits, layout.clone()).unwrap();
    let long = dir.path().join("b".repeat(237));
    let e = ImageWriter::check_destination(&long).unwrap_err();
    assert!(
        matches!(
            e,
            ImageError::NameTooLong {
                len: 237,
                suffix: 19,
                fits: 236,
                name_max: 255,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("NAME_MAX"), "{e}");
    assert!(matches!(
        ImageWriter::create(&long, layout),
        Err(TransferError::Image(ImageError::NameTooLong { .. }))
    ));
    let e = ImageWriter::check_destination("/proc/version").unwrap_err();
    assert!(
        matches!(e, ImageError::FileSystemNotWritable { .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("proc file system"), "{e}");
}

#[test]
fn an_image_of_version_4_5_or_6_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let image = write_image(&path);
    for old in [4u32, 5, 6] {
        let mut bytes = image.clone();
        bytes[8..12].copy_from_slice(&old.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let err = Image::open(&path).unwrap_err();
        assert!(
            matches!(
                &err,
                ImageError::Corrupt {
                    source: ProtocolError::OldImageVersion {
                        version,
                        supported: 7
                    },
                    ..
                } if *version == old
            ),
            "{err:?}"
        );
        let chain = precopy_sys::error_chain(&err);
        assert!(
            chain.contains(&format!(
                "image format version {old} is no longer supported"
            )) && chain.contains("the final mappings recorded since version 7"),
            "{chain}"
        );
    }
}

#[test]
fn an_image_is_synced_at_the_end_of_every_round() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let layout = Layout::single(PS, BASE, 8 * PS).unwrap();
    let sink = ImageWriter::create(&path, layout.clone()).unwrap();
    let mut tx = Transfer::new(SliceSource::new(BASE, memory(8, 3)), sink, layout, 4).unwrap();
    // Before a round ended nothing was synced, and there is no sync to estimate the
    // finish's from.
    assert_eq!(tx.sink().synced_len(), 0);
    assert_eq!(tx.probe_finish().unwrap(), None);
    let mut synced = 0;
    for round in 0..3u64 {
        tx.send_round(&[BASE + round * PS..BASE + (round + 3) * PS])
            .unwrap();
        let w = tx.sink();
        assert_eq!(
            w.synced_len(),
            w.bytes_written(),
            "round {round} ended with everything written synced"
        );
        assert!(w.synced_len() > synced, "round {round} synced its records");
        synced = w.synced_len();
        // The finish probe now estimates the image's finish (index, last sync).
        assert!(tx.probe_finish().unwrap().is_some(), "round {round}");
    }
    tx.finish(FinalCheck::Recorded).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    assert!(
        len > synced,
        "FINISH, INDEX and TRAILER follow the last round"
    );
    assert_eq!(
        tx.sink().synced_len(),
        len,
        "and are synced before the image is published"
    );
}
