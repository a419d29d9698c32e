//! One userfaultfd in async write-protect mode, bound to the address space it acts on.

use crate::{Error, Result};
use precopy_sys::abi;
use precopy_sys::uffd as sys;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::OnceLock;

/// Whose memory a [`Uffd`] acts on: the process that created the fd, always.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The calling process.
    This,
    /// Another process, by PID; the fd was created inside it and adopted.
    Process(i32),
}

impl Target {
    fn proc_dir(self) -> PathBuf {
        match self {
            Target::This => PathBuf::from("/proc/self"),
            Target::Process(pid) => PathBuf::from(format!("/proc/{pid}")),
        }
    }
}

/// userfaultfd features negotiated with the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features(u64);

impl Features {
    /// The raw `UFFD_FEATURE_*` bits.
    pub fn bits(self) -> u64 {
        self.0
    }
    /// Writes resolve in the kernel; nothing reaches user space (6.7+).
    pub fn wp_async(self) -> bool {
        self.0 & abi::UFFD_FEATURE_WP_ASYNC != 0
    }
    /// Unpopulated ptes can be write-protected too (6.4+).
    pub fn wp_unpopulated(self) -> bool {
        self.0 & abi::UFFD_FEATURE_WP_UNPOPULATED != 0
    }
    /// Write-protect works on hugetlbfs and shmem (5.19+).
    pub fn wp_hugetlbfs_shmem(self) -> bool {
        self.0 & abi::UFFD_FEATURE_WP_HUGETLBFS_SHMEM != 0
    }
}

/// Features the running kernel supports, probed once on a throwaway fd (`UFFDIO_API` succeeds
/// only once per fd, so the real fd is never used to probe).
pub fn kernel_features() -> Result<Features> {
    static PROBED: OnceLock<std::result::Result<u64, (i32, bool)>> = OnceLock::new();
    let probed = PROBED.get_or_init(|| {
        let fd = sys::create().map_err(|e| (e.raw_os_error().unwrap_or(0), true))?;
        sys::api(fd.as_fd(), 0)
            .map(|r| r.features)
            .map_err(|e| (e.raw_os_error().unwrap_or(0), false))
    });
    match *probed {
        Ok(bits) => Ok(Features(bits)),
        Err((errno, true)) => Err(Error::Create(std::io::Error::from_raw_os_error(errno))),
        Err((errno, false)) => Err(Error::Api(std::io::Error::from_raw_os_error(errno))),
    }
}

/// Refuses negotiated features that would make the tracked process wait for a reader.
fn check_adoptable(f: Features) -> Result<()> {
    let events = [
        (
            abi::UFFD_FEATURE_EVENT_FORK,
            "UFFD_FEATURE_EVENT_FORK",
            "fork",
        ),
        (
            abi::UFFD_FEATURE_EVENT_REMAP,
            "UFFD_FEATURE_EVENT_REMAP",
            "mremap",
        ),
        (
            abi::UFFD_FEATURE_EVENT_REMOVE,
            "UFFD_FEATURE_EVENT_REMOVE",
            "madvise(MADV_DONTNEED/MADV_REMOVE)",
        ),
        (
            abi::UFFD_FEATURE_EVENT_UNMAP,
            "UFFD_FEATURE_EVENT_UNMAP",
            "munmap",
        ),
    ];
    if let Some(&(_, feature, call)) = events.iter().find(|(bit, _, _)| f.0 & bit != 0) {
        return Err(Error::BlockingFeature {
            feature,
            blocks: call,
        });
    }
    if !f.wp_async() {
        return Err(Error::BlockingFeature {
            feature: "synchronous write-protect (UFFD_FEATURE_WP_ASYNC not negotiated)",
            blocks: "every first write to a tracked page",
        });
    }
    if !f.wp_unpopulated() {
        return Err(Error::NegotiatedWithout {
            feature: "UFFD_FEATURE_WP_UNPOPULATED",
        });
    }
    Ok(())
}

pub(crate) fn required_features() -> Result<u64> {
    let offered = kernel_features()?;
    if !offered.wp_async() {
        return Err(Error::KernelLacks {
            feature: "UFFD_FEATURE_WP_ASYNC",
            needs: "Linux 6.7+",
        });
    }
    if !offered.wp_unpopulated() {
        return Err(Error::KernelLacks {
            feature: "UFFD_FEATURE_WP_UNPOPULATED",
            needs: "Linux 6.4+",
        });
    }
    let mut want = abi::UFFD_FEATURE_WP_ASYNC | abi::UFFD_FEATURE_WP_UNPOPULATED;
    if offered.wp_hugetlbfs_shmem() {
        want |= abi::UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
    }
    Ok(want)
}

/// A userfaultfd in async write-protect mode plus the `/proc` files of its address space.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: Features,
    target: Target,
    pagemap: File,
    maps: File,
}

impl Uffd {
    /// Creates a userfaultfd for the calling process and negotiates `WP_ASYNC |
    /// WP_UNPOPULATED` (and `WP_HUGETLBFS_SHMEM` where offered).
    pub fn new() -> Result<Uffd> {
        let want = required_features()?;
        let fd = sys::create().map_err(Error::Create)?;
        Self::handshake_and_bind(fd, want, Target::This)
    }

    /// Adopts a userfaultfd that process `pid` created (received over a Unix socket, or copied
    /// with `pidfd_getfd`). It acts on `pid`'s memory.
    ///
    /// A fresh fd (no `UFFDIO_API` yet) gets the engine's handshake. An fd its owner already
    /// negotiated is accepted only if its features, read from `/proc/self/fdinfo` (the
    /// context's real ones), cannot block the tracked process: refused with
    /// [`Error::BlockingFeature`] naming the feature if it has `UFFD_FEATURE_EVENT_FORK`,
    /// `_REMAP`, `_REMOVE` or `_UNMAP` (the kernel makes the process wait in fork, mremap,
    /// madvise or munmap until someone reads the event, and nobody here does) or lacks
    /// `UFFD_FEATURE_WP_ASYNC` (write-protect faults would be synchronous: every first write
    /// to a tracked page would wait for a reader); refused with [`Error::NegotiatedWithout`]
    /// if it lacks `UFFD_FEATURE_WP_UNPOPULATED`. A refused fd is dropped untouched: nothing
    /// was registered, so the other process keeps running.
    ///
    /// A `pid` of zero or below is refused with [`Error::BadPid`] before the fd is touched.
    pub fn adopt(fd: OwnedFd, pid: i32) -> Result<Uffd> {
        if pid <= 0 {
            return Err(Error::BadPid { pid });
        }
        match sys::context_features(fd.as_fd()) {
            Ok(Some(bits)) if bits & abi::UFFD_FEATURE_INITIALIZED != 0 => {
                let features = Features(bits & !abi::UFFD_FEATURE_INITIALIZED);
                check_adoptable(features)?;
                Self::bind(fd, features, Target::Process(pid))
            }
            Ok(Some(_)) => {
                let want = required_features()?;
                Self::handshake_and_bind(fd, want, Target::Process(pid))
            }
            Ok(None) => Err(Error::NotUffd),
            Err(e) => Err(Error::Fdinfo(e)),
        }
    }

    fn handshake_and_bind(fd: OwnedFd, want: u64, target: Target) -> Result<Uffd> {
        let reply = sys::api(fd.as_fd(), want).map_err(Error::Api)?;
        // The reply lists every feature the kernel offers; the context has what was asked
        // for (and offered). fdinfo says so directly where it is readable.
        let enabled = match sys::context_features(fd.as_fd()) {
            Ok(Some(bits)) => bits & !abi::UFFD_FEATURE_INITIALIZED,
            _ => want & reply.features,
        };
        Self::bind(fd, Features(enabled), target)
    }

    fn bind(fd: OwnedFd, features: Features, target: Target) -> Result<Uffd> {
        let dir = target.proc_dir();
        let open = |name: &str| {
            let path = dir.join(name);
            File::open(&path).map_err(|source| Error::OpenProc { path, source })
        };
        Ok(Uffd {
            fd,
            features,
            target,
            pagemap: open("pagemap")?,
            maps: open("maps")?,
        })
    }

    /// The userfaultfd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The features negotiated on this fd (not every feature the kernel offers: see
    /// [`kernel_features`] for that).
    pub fn features(&self) -> Features {
        self.features
    }

    /// Whose memory this fd acts on.
    pub fn target(&self) -> Target {
        self.target
    }

    /// The PID of the tracked process (the caller's own for [`Target::This`]).
    pub fn pid(&self) -> i32 {
        match self.target {
            Target::This => std::process::id() as i32,
            Target::Process(pid) => pid,
        }
    }

    /// `/proc/PID/pagemap` of the tracked process, for `PAGEMAP_SCAN`.
    pub fn pagemap(&self) -> BorrowedFd<'_> {
        self.pagemap.as_fd()
    }

    /// `/proc/PID/maps` of the tracked process, for `PROCMAP_QUERY`.
    pub fn maps(&self) -> BorrowedFd<'_> {
        self.maps.as_fd()
    }
}
