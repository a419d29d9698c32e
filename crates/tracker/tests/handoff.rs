//! A uffd handed over a Unix socket is adopted and acts on the sender's memory.

use precopy_tracker::handoff::{receive_uffd, send_uffd};
use precopy_tracker::{Target, Tracker};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

#[test]
fn uffd_sent_over_unix_socket_is_adopted() {
    let fd = match precopy_sys::uffd::create() {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("SKIP uffd_sent_over_unix_socket_is_adopted: no userfaultfd here: {e}");
            return;
        }
    };
    let (a, b) = UnixStream::pair().unwrap();
    send_uffd(&a, fd.as_fd()).unwrap();
    drop(fd);
    let uffd = match receive_uffd(&b) {
        Ok(u) => u,
        Err(precopy_tracker::Error::KernelLacks { feature, needs }) => {
            eprintln!(
                "SKIP uffd_sent_over_unix_socket_is_adopted: kernel lacks {feature} ({needs})"
            );
            return;
        }
        Err(e) => panic!("receive_uffd: {e}"),
    };
    assert_eq!(uffd.target(), Target::Process(std::process::id() as i32));
    assert!(uffd.features().wp_async());
    let mem = precopy_sys::mem::Mapping::anonymous(4 * 4096).unwrap();
    let mut tracker = Tracker::new(uffd);
    tracker.register(mem.range()).unwrap();
    tracker.arm().unwrap();
    assert_eq!(tracker.ranges().len(), 1);
}

#[test]
fn message_without_fd_is_a_clear_error() {
    use std::io::Write;
    let (mut a, b) = UnixStream::pair().unwrap();
    a.write_all(&1234u32.to_ne_bytes()).unwrap();
    let err = receive_uffd(&b).unwrap_err();
    assert!(
        matches!(err, precopy_tracker::Error::Handoff(_)),
        "unexpected error: {err}"
    );
}
