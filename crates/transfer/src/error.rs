//! Every error this crate returns. Each variant names what went wrong with the
//! numbers needed to act on it; the underlying cause sits in `#[source]`, never
//! pasted into the message.

use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use crate::kind::FrameKind;

/// A memory layout that cannot be used, or a range that does not fit it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LayoutError {
    /// A region's page size is not a power of two in the supported span.
    #[error(
        "region {region}: page size {page_size} is not a power of two between 512 bytes and 1 GiB"
    )]
    BadPageSize {
        /// The region's id.
        region: u32,
        /// The rejected page size.
        page_size: u64,
    },
    /// A page size (not a region's) that is not a power of two in the supported span.
    #[error("page size {page_size} is not a power of two between 512 bytes and 1 GiB")]
    InvalidPageSize {
        /// The rejected page size.
        page_size: u64,
    },
    /// The layout has no regions at all.
    #[error("layout has no regions")]
    Empty,
    /// More regions than the wire format carries.
    #[error("layout has {count} regions, more than the {max} supported")]
    TooManyRegions {
        /// Regions given.
        count: usize,
        /// Most regions supported.
        max: usize,
    },
    /// A region of size zero.
    #[error("region {region} is empty")]
    EmptyRegion {
        /// The region's id.
        region: u32,
    },
    /// A region whose size, host or guest-physical address is not a multiple
    /// of its page size.
    #[error("region {region}: size or address is not a multiple of its {page_size}-byte pages")]
    Unaligned {
        /// The region's id.
        region: u32,
        /// The region's page size.
        page_size: u64,
    },
    /// A region running past the end of the address space.
    #[error("region {region} wraps around the address space")]
    Wraps {
        /// The region's id.
        region: u32,
    },
    /// Two regions with the same id.
    #[error("region id {region} is used twice")]
    DuplicateId {
        /// The id.
        region: u32,
    },
    /// A region added to a layout after the others must take the next id and keep the wire
    /// unit.
    #[error("region {region} cannot be added: {reason}")]
    CannotAdd {
        /// The region's id.
        region: u32,
        /// Why.
        reason: &'static str,
    },
    /// Two regions share host addresses.
    #[error("regions {first} and {second} overlap in this process's address space")]
    Overlap {
        /// The region with the lower host address.
        first: u32,
        /// The region that starts inside it.
        second: u32,
    },
    /// Two regions share guest-physical addresses (a VMM's memory slots would collide).
    #[error("regions {first} and {second} overlap in guest-physical addresses")]
    GuestOverlap {
        /// The region with the lower guest-physical address.
        first: u32,
        /// The region that starts inside it.
        second: u32,
    },
    /// A range that is not page-aligned or is empty/inverted.
    #[error("range {range:#x?} is not a non-empty span of whole {page_size}-byte pages")]
    RangeUnaligned {
        /// The rejected range.
        range: Range<u64>,
        /// The layout's page size.
        page_size: u64,
    },
    /// A host range (or memory offsets) not inside the layout.
    #[error("range {range:#x?} is outside the layout")]
    OutsideLayout {
        /// The rejected range.
        range: Range<u64>,
    },
    /// No region has this id.
    #[error("no region has id {region}")]
    UnknownRegion {
        /// The id.
        region: u32,
    },
    /// Bytes that are not whole pages inside their region.
    #[error("{len:#x} bytes at offset {offset:#x} are not whole pages inside region {region}")]
    OutsideRegion {
        /// The region's id.
        region: u32,
        /// Offset inside the region.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Memory the destination handed in does not match the announced layout.
    #[error("destination memory for region {region}: {reason}")]
    Placement {
        /// The region's id.
        region: u32,
        /// What does not match.
        reason: &'static str,
    },
}

/// Reading page contents from a [`PageSource`](crate::PageSource) failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    /// Part of a requested range is not mapped in the source. Such a page is
    /// never sent as zeros: the caller decides what an unmapped page means.
    #[error(
        "source address {addr:#x} is not readable: nothing is mapped there (reading {len:#x} bytes)"
    )]
    Unmapped {
        /// First address that could not be read.
        addr: u64,
        /// Bytes that were left unread from `addr` in that request.
        len: u64,
    },
    /// Part of a requested range is mapped in the source but cannot be read
    /// (`process_vm_readv` says `EFAULT` for this and for [`SourceError::Unmapped`]
    /// alike; the source's memory map tells them apart). Never sent as zeros.
    #[error("source address {addr:#x} is not readable: {reason} (reading {len:#x} bytes)")]
    NotReadable {
        /// First address that could not be read.
        addr: u64,
        /// Bytes that were left unread from `addr` in that request.
        len: u64,
        /// Why, as far as the source's memory map tells.
        reason: Unreadable,
    },
    /// A requested range ends before it starts.
    #[error("source range {start:#x}..{end:#x} ends before it starts")]
    InvertedRange {
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
    },
    /// The source process exited.
    #[error("process {pid} no longer exists")]
    ProcessGone {
        /// The process id.
        pid: i32,
    },
    /// The caller may not read the source process (ptrace access mode check).
    #[error("not permitted to read the memory of process {pid} (needs ptrace access)")]
    PermissionDenied {
        /// The process id.
        pid: i32,
    },
    /// Any other failure of `process_vm_readv`.
    #[error("reading {len:#x} bytes at {addr:#x} of process {pid} failed")]
    Read {
        /// The process id.
        pid: i32,
        /// First address of the failed request.
        addr: u64,
        /// Bytes requested.
        len: u64,
        /// The errno.
        #[source]
        source: nix::errno::Errno,
    },
    /// The buffer handed to `read_ranges` does not match the ranges.
    #[error("buffer holds {buf} bytes but the ranges cover {ranges}")]
    BufferSize {
        /// Buffer length.
        buf: usize,
        /// Sum of the range lengths.
        ranges: u64,
    },
}

/// Why mapped source memory could not be read (see [`SourceError::NotReadable`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unreadable {
    /// The mapping holding the address has no read permission: `PROT_NONE` memory, such as a
    /// guard page below a thread's stack or address space a program reserved.
    NoReadPermission {
        /// The mapping's first address.
        start: u64,
        /// One past its last address.
        end: u64,
        /// Its permissions as `/proc/PID/maps` shows them (`---p`).
        perms: String,
    },
    /// The page is a guard region installed with `MADV_GUARD_INSTALL` (Linux 6.15+): any
    /// access to it faults, whatever the mapping's permissions.
    GuardRegion,
    /// The mapping is readable, yet the kernel could not read the page: a file mapping past
    /// the end of its file, device memory, a hardware-poisoned page.
    Refused {
        /// The mapping's permissions as `/proc/PID/maps` shows them.
        perms: String,
    },
    /// The source's memory map could not be read to tell (the process is gone, or may not be
    /// inspected).
    Unknown,
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unreadable::NoReadPermission { start, end, perms } => write!(
                f,
                "mapped without read permission (PROT_NONE or a guard page: mapping \
                 {start:#x}..{end:#x} is {perms})"
            ),
            Unreadable::GuardRegion => {
                f.write_str("a guard region (MADV_GUARD_INSTALL) faults on any access")
            }
            Unreadable::Refused { perms } => write!(
                f,
                "mapped readable ({perms}) but the kernel could not read it (file mapping past \
                 the end of its file, device memory or a poisoned page)"
            ),
            Unreadable::Unknown => {
                f.write_str("the source's memory map could not be read to tell why")
            }
        }
    }
}

/// The byte stream broke the protocol. A receiver returns one of these for the
/// first fault it meets and applies nothing from that frame or later.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProtocolError {
    /// The stream ended inside a frame or before the final frame.
    #[error("stream truncated at byte {offset} while reading {what}")]
    Truncated {
        /// Stream offset where more bytes were needed.
        offset: u64,
        /// What was being read.
        what: &'static str,
    },
    /// An image's record runs past the end of a file that ends with the image's valid
    /// TRAILER: the file was written to its end (the trailer is written last, once), so
    /// the record's length (or what precedes it) is damaged, not cut.
    #[error(
        "the record at byte {offset} runs past the end of the file (byte {file_len}), which ends with the image's trailer (at byte {trailer}): the file was written to its end, so the record is damaged, not cut"
    )]
    PastTrailer {
        /// File offset of the record whose length runs past the end.
        offset: u64,
        /// The file's length.
        file_len: u64,
        /// File offset of the valid TRAILER that ends the file.
        trailer: u64,
    },
    /// The sender closed its connection between two frames before the transfer's end (a
    /// receiver's reading only): it ended the transfer on purpose (it gave up, was interrupted)
    /// or exited. Unlike [`ProtocolError::Truncated`], no frame was cut.
    #[error(
        "the sender ended the transfer: it closed the connection between two frames, after byte {offset}"
    )]
    SenderClosed {
        /// Stream offset where the next frame would have started.
        offset: u64,
    },
    /// The stream does not start with the precopy magic.
    #[error(
        "not a precopy stream or image: it starts with bytes {} (\"{}\"), not the precopy magic",
        hex_bytes(found),
        ascii_bytes(found)
    )]
    BadMagic {
        /// The eight bytes found instead.
        found: [u8; 8],
    },
    /// The peer speaks a protocol version this build does not.
    #[error("unknown protocol version {version} (this build speaks {supported})")]
    UnknownVersion {
        /// Version announced by the peer.
        version: u32,
        /// The version this build speaks.
        supported: u32,
    },
    /// The peer speaks an older protocol or image version this build no
    /// longer reads.
    #[error(
        "version {version} is no longer supported: this build reads and writes version {supported} only (the final round marked, so that the receiver raises its threads for it, since version 7; memory unmapped mid-stream dropped since version 6, memory regions added mid-stream since version 5, an XXH3-64 hash of every page instead of a CRC32C since version 4, pages named by region and offset since version 3); run the same precopy version at both ends, and make images again with it"
    )]
    OldVersion {
        /// Version announced by the peer or image.
        version: u32,
        /// The version this build speaks.
        supported: u32,
    },
    /// An image of an older format version (an image's version counts apart from the wire's
    /// since version 6, which the wire does not have).
    #[error(
        "image format version {version} is no longer supported: this build reads and writes version {supported} only (the final mappings recorded since version 7, compacted images since version 6, memory regions added mid-stream since version 5, an XXH3-64 hash of every page instead of a CRC32C since version 4, pages named by region and offset since version 3); make the image again with this precopy"
    )]
    OldImageVersion {
        /// Version the image's preamble states.
        version: u32,
        /// The version this build reads and writes.
        supported: u32,
    },
    /// An image's preamble has non-zero bytes where its format reserves zeros (bytes 12-15):
    /// every writer writes zeros there, so the preamble is damaged.
    #[error(
        "the image preamble's reserved bytes 12-15 are {}, not zero: the preamble is damaged",
        hex_bytes(found)
    )]
    PreambleReserved {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// A frame's CRC32C does not match its contents.
    #[error(
        "{} frame at byte {offset} has a bad checksum (stored {stored:#010x}, computed {computed:#010x})",
        FrameKind::from_u8(*kind).map_or_else(|| format!("kind-{kind}"), |k| k.to_string())
    )]
    BadChecksum {
        /// Stream offset of the frame header.
        offset: u64,
        /// Kind byte of the frame (may itself be damaged).
        kind: u8,
        /// Checksum carried by the frame.
        stored: u32,
        /// Checksum of the bytes received.
        computed: u32,
    },
    /// A page of a strictly checked (not live) PAGES frame does not match
    /// the hash the frame lists for it.
    #[error(
        "page {page} of the PAGES frame at byte {offset} fails its hash (listed {stored:#018x}, computed {computed:#018x})"
    )]
    BadPageHash {
        /// Stream offset of the frame header.
        offset: u64,
        /// Index of the page in the frame.
        page: u64,
        /// Hash the frame lists.
        stored: u64,
        /// Hash of the page received.
        computed: u64,
    },
    /// A frame kind this version does not define.
    #[error("unknown frame kind {kind} at byte {offset}")]
    UnknownFrame {
        /// Stream offset of the frame header.
        offset: u64,
        /// The kind byte.
        kind: u8,
    },
    /// A frame announcing a payload larger than any valid frame carries.
    #[error("frame at byte {offset} announces a {len}-byte payload, more than the {max} allowed")]
    FrameTooLarge {
        /// Stream offset of the frame header.
        offset: u64,
        /// Announced payload length.
        len: u64,
        /// Largest payload accepted.
        max: u64,
    },
    /// A frame whose fields contradict each other or the protocol.
    #[error("malformed {kind} frame at byte {offset}: {reason}")]
    Malformed {
        /// Stream offset of the frame header.
        offset: u64,
        /// The frame kind.
        kind: FrameKind,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The two ends disagree on the page size.
    #[error("peer uses {theirs}-byte pages, this end expects {ours}")]
    WrongPageSize {
        /// Page size this end expects.
        ours: u64,
        /// Page size the peer announced.
        theirs: u64,
    },
    /// A page or zero range that is not inside the announced layout.
    #[error("pages {offset:#x}+{len:#x} of region {region} are outside the announced layout")]
    PageOutsideLayout {
        /// The region the frame names.
        region: u32,
        /// Offset of the frame's pages inside it.
        offset: u64,
        /// Length of the frame's pages.
        len: u64,
    },
    /// A state blob whose own checksum does not match its bytes.
    #[error(
        "state blob at byte {offset} is damaged (stored CRC32C {stored:#010x}, computed {computed:#010x})"
    )]
    StateChecksum {
        /// Stream offset of the STATE frame.
        offset: u64,
        /// The blob's checksum as sent.
        stored: u32,
        /// The checksum of the bytes received.
        computed: u32,
    },
    /// A valid frame that is not allowed in the receiver's current state.
    #[error("unexpected {kind} frame at byte {offset} while {state}")]
    Unexpected {
        /// Stream offset of the frame header.
        offset: u64,
        /// The frame kind.
        kind: FrameKind,
        /// What the receiver was waiting for.
        state: &'static str,
    },
    /// A round begins or ends out of sequence.
    #[error("round {got} out of order (expected round {expected})")]
    RoundOutOfOrder {
        /// Round number expected.
        expected: u64,
        /// Round number received.
        got: u64,
    },
    /// The end-of-round counts do not match the frames that arrived.
    #[error(
        "round {round} end announces {claimed_pages} pages and {claimed_zero} zero pages but {pages} and {zero} arrived"
    )]
    CountMismatch {
        /// The round.
        round: u64,
        /// Pages announced.
        claimed_pages: u64,
        /// Zero pages announced.
        claimed_zero: u64,
        /// Pages received.
        pages: u64,
        /// Zero pages received.
        zero: u64,
    },
    /// A compressed page frame that does not decompress to its announced size.
    #[error("{codec} page frame at byte {offset} does not decompress to {raw_len} bytes")]
    Decompress {
        /// Stream offset of the frame header.
        offset: u64,
        /// The codec named by the frame.
        codec: &'static str,
        /// The announced decompressed length.
        raw_len: u64,
    },
    /// The layout announced in the handshake is invalid.
    #[error("the announced layout is invalid")]
    BadLayout(#[source] LayoutError),
    /// Parallel streams of one transfer that do not belong together.
    #[error("stream {index} does not belong with the others: {reason}")]
    StreamMismatch {
        /// Index the stream announced.
        index: u32,
        /// How it differs.
        reason: &'static str,
    },
    /// A sender's resume that this receiver cannot honour (or a new
    /// transfer while it waits for one).
    #[error("resume refused for stream {index}: {reason}")]
    ResumeRefused {
        /// Index the stream announced.
        index: u32,
        /// Why.
        reason: ResumeRefusal,
    },
}

/// Why a receiver refuses a resume HELLO (or a new HELLO while it waits for
/// one); the sender receives it as an ERROR with `error_code::RESUME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResumeRefusal {
    /// The receiver holds no session to resume (it was not run with
    /// [`Receiver::run_resumable`](crate::Receiver::run_resumable), gave up
    /// waiting, or this is a new receiver).
    #[error("the receiver holds no session to resume")]
    NoSession,
    /// The receiver waits for another session.
    #[error("the receiver waits for another session")]
    UnknownSession,
    /// The layout is not the one the session announced.
    #[error("the layout differs from the session's")]
    DifferentLayout,
    /// The number of connections is not the session's.
    #[error("the stream count differs from the session's")]
    DifferentStreams,
    /// A new transfer arrived while the receiver waits for a session to resume.
    #[error("a new transfer while a session waits for its sender to resume")]
    SessionWaiting,
}

/// Reading or writing a checkpoint image failed, or the image is not good.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The path names something other than a regular file (a directory, a device, a FIFO):
    /// an image is only ever a regular file, and opening a FIFO could wait forever.
    #[error("{path} is not a regular file ({kind})")]
    NotAFile {
        /// The path.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// A file that is neither empty nor a precopy image is where an image would be written:
    /// writing the image would replace it (a tool asks its user to confirm, e.g. `--force`).
    #[error(
        "{path} exists and is not a precopy image ({len} bytes, not starting with \"PRCPIMG\"): writing the image would replace it"
    )]
    NotAnImage {
        /// The file.
        path: PathBuf,
        /// Its length in bytes.
        len: u64,
    },
    /// Another image writer (another precopy, or another writer in this process) holds the
    /// lock on the partial file: two writers to one path would mix their images.
    #[error("another precopy is writing {path} ({partial} is locked)")]
    Locked {
        /// The image's path.
        path: PathBuf,
        /// Its partial file, which the other writer holds locked (`flock`).
        partial: PathBuf,
    },
    /// The finished image was withdrawn before it was published (the command was interrupted,
    /// see [`PublishGate`](crate::PublishGate)): the earlier file at `path`, if any, is
    /// untouched; what was written stays at `path` + `.partial`.
    #[error("the image {path} was withdrawn before it was published")]
    Withdrawn {
        /// The image's path.
        path: PathBuf,
    },
    /// The directory an image would be written in does not exist.
    #[error("directory {dir} does not exist")]
    NoDirectory {
        /// The directory.
        dir: PathBuf,
    },
    /// The directory an image would be written in is not writable by this user.
    #[error("directory {dir} is not writable by this user")]
    DirectoryNotWritable {
        /// The directory.
        dir: PathBuf,
    },
    /// The directory an image would be written in is on a file system where no image can be
    /// created: mounted read-only, or a kernel's pseudo file system (`/proc`, `/sys`, ...)
    /// whose files are the kernel's and where a program creates none.
    #[error("directory {dir} is on {what}, where no file can be created")]
    FileSystemNotWritable {
        /// The directory.
        dir: PathBuf,
        /// What the file system is, e.g. "a read-only file system", "the proc file system".
        what: &'static str,
    },
    /// The image's file name is too long for its file system once the writer's suffixes
    /// (`.partial.compacting`, the longest) are appended: the partial file could never be
    /// created.
    #[error(
        "the file name is {len} bytes and the writer appends up to {suffix} (\".partial.compacting\"): at most {fits} bytes fit the file system's limit of {name_max} bytes per name (NAME_MAX)"
    )]
    NameTooLong {
        /// The image's path.
        path: PathBuf,
        /// Bytes of its file name.
        len: usize,
        /// Bytes of the longest suffix the writer appends.
        suffix: usize,
        /// Longest file name that fits: `name_max - suffix`.
        fits: usize,
        /// The file system's longest name (`pathconf(_PC_NAME_MAX)`, 255 on most).
        name_max: usize,
    },
    /// A span that ends before it starts.
    #[error("span {range:#x?} ends before it starts")]
    InvertedSpan {
        /// The span.
        range: Range<u64>,
    },
    /// An I/O operation on the image file failed.
    #[error("{what} {path} failed")]
    Io {
        /// The image file.
        path: PathBuf,
        /// The operation.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file is shorter than the preamble every image starts with, and what it holds is
    /// not the start of one.
    #[error(
        "{path} is not a precopy image: it is {len} bytes long, shorter than the {preamble}-byte preamble (magic and format version) every image starts with"
    )]
    TooShort {
        /// The file.
        path: PathBuf,
        /// Its length in bytes.
        len: u64,
        /// The preamble's length in bytes.
        preamble: u64,
    },
    /// The file is not a precopy image or its records are damaged.
    #[error("image {path} is corrupt")]
    Corrupt {
        /// The image file.
        path: PathBuf,
        /// The fault, with its offset in the file.
        #[source]
        source: ProtocolError,
    },
    /// The image has no valid final checksum and trailer: it was cut short or
    /// is still being written.
    #[error("image {path} is incomplete: {reason}")]
    Incomplete {
        /// The image file.
        path: PathBuf,
        /// Why it is not complete.
        reason: String,
    },
    /// The image's index disagrees with its records.
    #[error("image {path} index disagrees with its records at memory offset {offset:#x}")]
    IndexMismatch {
        /// The image file.
        path: PathBuf,
        /// Memory offset of the first page where they differ.
        offset: u64,
    },
    /// The memory assembled from the image does not match the recorded checksum.
    #[error("image memory checksum {actual:#018x} does not match the recorded {expected:#018x}")]
    ChecksumMismatch {
        /// Checksum recorded by the writer.
        expected: u64,
        /// Checksum of the memory the image holds.
        actual: u64,
    },
    /// A page the image holds fails its hash: the file was altered after
    /// it was written.
    #[error("image {path} is damaged: the page at memory offset {offset:#x} fails its check")]
    PageDamaged {
        /// The image file.
        path: PathBuf,
        /// Memory offset of the page.
        offset: u64,
        /// The failed check, with its file offset.
        #[source]
        source: ProtocolError,
    },
    /// A requested span is not inside the image's layout.
    #[error("span {range:#x?} is not inside the image layout")]
    SpanOutsideLayout {
        /// The requested span.
        range: Range<u64>,
    },
    /// The file system the image is written to has too little room for the next step: a
    /// round and the finish after it, or a compaction (checked with `fstatvfs` before the
    /// step; `free` is what an unprivileged user may still write, as `df` shows it).
    #[error(
        "no space left for the image on the file system of {}: {step} need{} {}, {} free",
        dir.display(),
        if matches!(step, SpaceFor::Compaction) { "s" } else { "" },
        Bytes(*need),
        Bytes(*free)
    )]
    NoSpace {
        /// The directory the image is written in.
        dir: PathBuf,
        /// What the room was wanted for.
        step: SpaceFor,
        /// Bytes the step can write (for a round: at most, with the finish after it).
        need: u64,
        /// Bytes free for this user.
        free: u64,
    },
}

/// What an image writer wanted room for ([`ImageError::NoSpace`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpaceFor {
    /// A whole round of at most `pages` pages, each stored uncompressed in a record of its
    /// own (the worst case), and the finish after it; checked before the round writes
    /// anything, after a compaction that would have made enough room.
    Round {
        /// The round.
        round: u64,
        /// The most pages it holds.
        pages: u64,
    },
    /// A compacted copy of the image (written beside it before it replaces it).
    Compaction,
    /// The next record and the finish (a round whose size was not stated in advance).
    Write,
}

impl std::fmt::Display for SpaceFor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpaceFor::Round { round, pages } => {
                write!(f, "round {round} (at most {pages} pages) and the finish")
            }
            SpaceFor::Compaction => f.write_str("a compacted copy"),
            SpaceFor::Write => f.write_str("the next record and the finish"),
        }
    }
}

/// A byte count for people: `12.3 MiB (12897484 bytes)`.
struct Bytes(u64);

impl std::fmt::Display for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0 as f64;
        let (v, unit) = if b >= (1u64 << 30) as f64 {
            (b / (1u64 << 30) as f64, "GiB")
        } else if b >= (1u64 << 20) as f64 {
            (b / (1u64 << 20) as f64, "MiB")
        } else {
            (b / 1024.0, "KiB")
        };
        write!(f, "{v:.1} {unit} ({} bytes)", self.0)
    }
}

/// Any failure of a transfer: sending, receiving, or a sink.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The memory layout or a dirty range is invalid.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// Reading the source failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The peer's bytes broke the protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The checkpoint image failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A socket or file operation failed.
    #[error("{what} failed")]
    Io {
        /// The operation.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A receiver on a TCP address (loopback included: any local user can
    /// connect to it) was started without a key.
    #[error(
        "receiver at {addr} needs a shared key: any process that can reach a TCP port, another local user's included, could otherwise write its memory. Make one with `(umask 077; head -c 32 /dev/urandom > KEYFILE)` and give the same file to both ends, or use a Unix socket"
    )]
    KeyRequired {
        /// The listening or local address.
        addr: String,
    },
    /// The key file cannot be used.
    #[error("key file {path} is unusable: {reason}")]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// The key path names something other than a regular file (a FIFO, a
    /// device, a directory, a socket): a key is only ever read from a
    /// regular file, and reading a FIFO could wait forever.
    #[error("key file {path} is not a regular file ({kind})")]
    KeyNotAFile {
        /// The path.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// Reading the key file failed.
    #[error("reading key file {path} failed")]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The receiver did not prove it holds the sender's key (it has another, or none).
    #[error("the receiver at {peer} did not prove it holds this sender's key")]
    AuthFailed {
        /// The receiver's address.
        peer: String,
    },
    /// The sender presented a key, and not this receiver's.
    #[error(
        "the sender at {sender} presented a different key from this receiver's (the key files at the two ends differ)"
    )]
    WrongKey {
        /// The sender's address.
        sender: String,
    },
    /// The sender presented no key, and this receiver requires one.
    #[error("the sender at {sender} presented no key, and this receiver requires one")]
    NoKey {
        /// The sender's address.
        sender: String,
    },
    /// The receiver requires a key and the sender has none.
    #[error("the receiver at {receiver} requires a shared key, and this sender was given none")]
    AuthRequired {
        /// The receiver's address.
        receiver: String,
    },
    /// The receiver refused the key this sender presented (an ERROR answering its proof).
    #[error("the receiver at {receiver} refused this sender's key: {message}")]
    KeyRefused {
        /// The receiver's address.
        receiver: String,
        /// The receiver's message, naming why.
        message: String,
    },
    /// A receiver busy with another transfer refused this connection (it takes one sender
    /// at a time: [`Receiver::run_refusing_others`](crate::Receiver::run_refusing_others)).
    /// The receiver's side of it; the sender gets [`TransferError::ReceiverBusy`].
    #[error("this receiver is busy with another transfer and takes one sender at a time")]
    Busy,
    /// The receiver answered this sender's handshake that it is busy with another transfer
    /// (an ERROR with code `BUSY`): nothing was sent.
    #[error(
        "the receiver at {receiver} is busy with another transfer (it takes one sender at a time): wait until that transfer ends, or send to another receiver"
    )]
    ReceiverBusy {
        /// The receiver's address.
        receiver: String,
    },
    /// The peer reported an error and stopped.
    #[error("peer reported an error: {message}")]
    PeerRejected {
        /// Error code sent by the peer (see `protocol::error_code`).
        code: u32,
        /// The peer's message.
        message: String,
    },
    /// The destination memory does not match the sender's checksum.
    #[error("memory checksum mismatch: sender {expected:#018x}, destination {actual:#018x}")]
    ChecksumMismatch {
        /// The sender's checksum.
        expected: u64,
        /// The destination's checksum.
        actual: u64,
    },
    /// Pages that changed while a live round sent them (see [`crate::live`]) were never sent
    /// again: a write the tracker did not report, a source that was not paused for the final
    /// round, or bytes damaged on the way.
    #[error(
        "{pages} page(s) changed while they were sent and were never sent again (first at memory offset {first:#x}): a write was not tracked, or the source was not paused for the final round"
    )]
    ChangedWhileSent {
        /// Pages still torn at FINISH.
        pages: u64,
        /// Memory offset of the first.
        first: u64,
    },
    /// A full final check found source memory that differs from the pages
    /// sent: a write the tracker did not report, or a source still running.
    #[error(
        "source memory changed after it was sent (digest of pages sent {recorded:#018x}, of memory now {actual:#018x}): a write was not tracked, or the source is not stopped"
    )]
    SourceChanged {
        /// Digest of the page hashes recorded while sending.
        recorded: u64,
        /// Digest of the source memory read at finish.
        actual: u64,
    },
    /// The source's memory grew mid-stream (a region added between rounds) and this
    /// destination cannot take a new region: its memory was mapped for the layout announced
    /// at the start.
    #[error(
        "the destination cannot take memory region {region}, added after the start (its memory was sized for the first layout)"
    )]
    CannotGrow {
        /// The added region's id.
        region: u32,
    },
    /// The destination cannot drop memory the source unmapped (the protocol's MAPPED): its
    /// sink keeps whatever it was given ([`Sink::retain`](crate::Sink::retain)).
    #[error("the destination cannot drop memory the source unmapped mid-stream ({dropped} bytes)")]
    CannotDrop {
        /// Bytes of the layout outside the memory that exists now.
        dropped: u64,
    },
    /// The API was used out of order (e.g. pages outside a round).
    #[error("{operation} is not allowed {state}")]
    Misuse {
        /// What was attempted.
        operation: &'static str,
        /// The state that forbids it.
        state: &'static str,
    },
    /// The workload's state blob is larger than a STATE frame carries
    /// ([`MAX_STATE_LEN`](crate::MAX_STATE_LEN)); nothing was sent.
    #[error("the state blob is {len} bytes, more than the {max} a STATE frame carries")]
    StateTooLarge {
        /// The blob's length in bytes.
        len: u64,
        /// [`MAX_STATE_LEN`](crate::MAX_STATE_LEN).
        max: u64,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: {reason}")]
    Config {
        /// What is wrong.
        reason: &'static str,
    },
    /// The peer made no progress for the I/O timeout: it stopped reading,
    /// stopped answering, or the network between is down.
    #[error("{what} {peer}: no progress for {after:?} (I/O timeout)")]
    Stalled {
        /// The step, e.g. "sending frames to" or "waiting for the acknowledgement of".
        what: &'static str,
        /// The peer's address.
        peer: String,
        /// The timeout that passed.
        after: Duration,
    },
    /// The transfer was interrupted from another thread (a cancel, or a
    /// deadline of the migration driver) while talking to `peer`.
    #[error("transfer to {peer} interrupted (cancelled or past a deadline)")]
    Interrupted {
        /// The peer's address.
        peer: String,
    },
    /// The receiver acknowledged the final checksum but the sender never
    /// confirmed it took the acknowledgement in time (no COMMIT): the sender
    /// gave up and may have resumed its source, so this copy is not complete.
    #[error("sender {peer} did not commit the transfer after the acknowledgement")]
    NotCommitted {
        /// The peer's address.
        peer: String,
        /// What happened instead.
        #[source]
        source: Box<TransferError>,
    },
    /// The receiver refused the sender's resume (see [`ResumeRefusal`],
    /// which the message names): a receiver that holds no such session (it
    /// was restarted, gave up waiting, or was not run resumable), or a
    /// session with another layout or stream count.
    #[error("{peer} refused to resume the transfer: {message}")]
    ResumeRefused {
        /// The receiver's address.
        peer: String,
        /// The receiver's message, naming the reason.
        message: String,
    },
    /// The sender's connections broke and it did not come back to resume
    /// within [`ReceiverConfig::resume_wait`](crate::ReceiverConfig::resume_wait).
    #[error("the sender did not resume within {after:?} after its connections broke")]
    ResumeTimedOut {
        /// The wait.
        after: Duration,
        /// The break.
        #[source]
        source: Box<TransferError>,
    },
    /// Another stream of the same transfer failed first; see its error.
    #[error("transfer aborted because another stream failed")]
    Aborted,
    /// A worker thread panicked (a bug in this crate).
    #[error("a transfer worker thread panicked")]
    WorkerPanicked,
}

impl TransferError {
    /// Whether this is the connection breaking (end of stream, also inside a
    /// frame; reset; broken pipe) rather than a fault in what was sent, a
    /// refusal, a stall past the I/O timeout or an interrupt: the one failure
    /// a resumed connection repairs (see
    /// [`Transfer::resume`](crate::Transfer::resume)).
    pub fn is_connection_break(&self) -> bool {
        match self {
            TransferError::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::NotConnected
            ),
            TransferError::Protocol(
                ProtocolError::Truncated { .. } | ProtocolError::SenderClosed { .. },
            ) => true,
            _ => false,
        }
    }

    pub(crate) fn io(what: &'static str) -> impl FnOnce(io::Error) -> TransferError {
        move |source| TransferError::Io { what, source }
    }

    /// `self`, or [`TransferError::Stalled`] (`what` `peer`, after `after`) when it is a read
    /// or a write that ran into its socket timeout: the kernel reports that as `EAGAIN`
    /// ("Resource temporarily unavailable") or `ETIMEDOUT`, and a timeout must say that it
    /// timed out and after how long.
    pub(crate) fn or_stalled(
        self,
        what: &'static str,
        peer: impl FnOnce() -> String,
        after: Duration,
    ) -> TransferError {
        match &self {
            TransferError::Io { source, .. }
                if matches!(
                    source.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                TransferError::Stalled {
                    what,
                    peer: peer(),
                    after,
                }
            }
            _ => self,
        }
    }

    /// The same failure once more, for every later call of a sender whose stream stopped on
    /// it (the first call returned the original): the same variant and fields, so that the
    /// message still names the cause (the receiver's own, after an ERROR) and
    /// [`TransferError::is_connection_break`] still answers the same. An I/O error keeps its
    /// kind and message but not causes of its own. A failure no stream ends with (an image's,
    /// a key file's) comes back as [`TransferError::Io`] with its whole message.
    pub(crate) fn again(&self) -> TransferError {
        use TransferError as E;
        match self {
            E::Layout(e) => E::Layout(e.clone()),
            E::Source(e) => E::Source(e.clone()),
            E::Protocol(e) => E::Protocol(e.clone()),
            E::Io { what, source } => E::Io {
                what,
                source: io_again(source),
            },
            E::PeerRejected { code, message } => E::PeerRejected {
                code: *code,
                message: message.clone(),
            },
            &E::ChecksumMismatch { expected, actual } => E::ChecksumMismatch { expected, actual },
            &E::ChangedWhileSent { pages, first } => E::ChangedWhileSent { pages, first },
            &E::SourceChanged { recorded, actual } => E::SourceChanged { recorded, actual },
            &E::Misuse { operation, state } => E::Misuse { operation, state },
            &E::StateTooLarge { len, max } => E::StateTooLarge { len, max },
            &E::Config { reason } => E::Config { reason },
            E::Stalled { what, peer, after } => E::Stalled {
                what,
                peer: peer.clone(),
                after: *after,
            },
            E::Interrupted { peer } => E::Interrupted { peer: peer.clone() },
            E::AuthFailed { peer } => E::AuthFailed { peer: peer.clone() },
            E::WrongKey { sender } => E::WrongKey {
                sender: sender.clone(),
            },
            E::NoKey { sender } => E::NoKey {
                sender: sender.clone(),
            },
            E::AuthRequired { receiver } => E::AuthRequired {
                receiver: receiver.clone(),
            },
            E::KeyRefused { receiver, message } => E::KeyRefused {
                receiver: receiver.clone(),
                message: message.clone(),
            },
            E::NotCommitted { peer, source } => E::NotCommitted {
                peer: peer.clone(),
                source: Box::new(source.again()),
            },
            E::ResumeRefused { peer, message } => E::ResumeRefused {
                peer: peer.clone(),
                message: message.clone(),
            },
            E::ResumeTimedOut { after, source } => E::ResumeTimedOut {
                after: *after,
                source: Box::new(source.again()),
            },
            E::Aborted => E::Aborted,
            E::WorkerPanicked => E::WorkerPanicked,
            E::Busy => E::Busy,
            E::ReceiverBusy { receiver } => E::ReceiverBusy {
                receiver: receiver.clone(),
            },
            other => E::Io {
                what: "an earlier step of this transfer",
                source: io::Error::other(precopy_sys::error_chain(other)),
            },
        }
    }
}

/// `e` once more: the same OS error, or the same kind and message.
fn io_again(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

/// `bytes` as space-separated hex pairs, e.g. `50 4b 03 04`.
fn hex_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `bytes` as ASCII, `.` for anything not printable.
fn ascii_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        })
        .collect()
}

impl ImageError {
    /// The damage this error names, in one line (a corrupt image's fault, an index or memory
    /// checksum that disagrees with the records, a page that fails its check): what `precopy
    /// image info` shows as the image's `CORRUPT` status. `None` for anything else (a cut,
    /// an I/O error).
    pub fn damage_reason(&self) -> Option<String> {
        match self {
            ImageError::Corrupt { source, .. } => Some(source.to_string()),
            ImageError::IndexMismatch { .. }
            | ImageError::ChecksumMismatch { .. }
            | ImageError::PageDamaged { .. } => Some(self.to_string()),
            _ => None,
        }
    }
}
