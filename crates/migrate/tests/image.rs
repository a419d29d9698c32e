//! Migrations into a checkpoint image: the image is published at its path only after the driver
//! decided the migration completed, never by a finish the driver has already given up on.

mod common;

use common::{Guest, PAGE, Pattern, supported};
use precopy_migrate::{
    AfterMigration, Error, Migration, MigrationConfig, Step, TransferTransport, UffdDirtyLog,
};
use precopy_scanner::{ScanOptions, Scanner};
use precopy_tracker::{Tracker, Uffd};
use precopy_transfer::{
    FinalCheck, Image, ImageWriter, Layout, PageBuf, PageHash, ProcessMemory, Sink, Transfer,
    TransferError,
};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// An image writer whose finish takes `delay` longer (a final `fdatasync` on a slow disk).
struct SlowFinish {
    inner: ImageWriter,
    delay: Duration,
}

impl Sink for SlowFinish {
    fn begin_round(&mut self, round: u64) -> Result<(), TransferError> {
        self.inner.begin_round(round)
    }
    fn expect_round(&mut self, pages: u64) -> Result<(), TransferError> {
        self.inner.expect_round(pages)
    }
    fn send_pages(
        &mut self,
        offset: u64,
        pages: PageBuf,
        hashes: &[PageHash],
    ) -> Result<(), TransferError> {
        self.inner.send_pages(offset, pages, hashes)
    }
    fn retain(&mut self, memory: &[Range<u64>]) -> Result<bool, TransferError> {
        self.inner.retain(memory)
    }
    fn send_zero_range(&mut self, range: Range<u64>) -> Result<(), TransferError> {
        self.inner.send_zero_range(range)
    }
    fn end_round(&mut self, round: u64) -> Result<u64, TransferError> {
        self.inner.end_round(round)
    }
    fn finish(&mut self, checksum: u64, check: FinalCheck) -> Result<(), TransferError> {
        precopy_transfer::sink::finish_in_two_steps(self, checksum, check)
    }
    fn finish_uncommitted(
        &mut self,
        checksum: u64,
        check: FinalCheck,
    ) -> Result<(), TransferError> {
        let r = self.inner.finish_uncommitted(checksum, check);
        std::thread::sleep(self.delay);
        r
    }
    fn commit(&mut self) -> Result<(), TransferError> {
        self.inner.commit()
    }
}

type MigrationError =
    Error<precopy_migrate::TrackingError, TransferError, std::convert::Infallible>;

fn image_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "precopy-migrate-{name}-{}-{}.img",
        std::process::id(),
        rand::random::<u32>()
    ))
}

/// Migrates a small writing guest into an image at `path` whose finish is `delay` slow, with
/// the final round bounded by `bound`.
fn migrate_into_image(
    path: &Path,
    delay: Duration,
    bound: Duration,
) -> Result<(), Box<MigrationError>> {
    let guest = Guest::start(256 * PAGE, 1, Pattern::Uniform, 500.0);
    let mut tracker = Tracker::new(Uffd::new().unwrap());
    tracker.register(guest.mem.range()).unwrap();
    let scanner = Scanner::new(ScanOptions::default()).unwrap();
    let layout = Layout::single(PAGE, guest.mem.addr(), guest.mem.len()).unwrap();
    let sink = SlowFinish {
        inner: ImageWriter::create(path, layout.clone()).unwrap(),
        delay,
    };
    let transfer = Transfer::new(ProcessMemory::current(), sink, layout, 64).unwrap();
    let config = MigrationConfig {
        max_downtime: Duration::from_millis(50),
        after: AfterMigration::Resume,
        final_round_timeout: Some(bound),
        ..MigrationConfig::default()
    };
    let mut m = Migration::new(
        UffdDirtyLog::new(tracker, scanner),
        TransferTransport::new(transfer),
        guest.callbacks(),
        config,
    );
    m.run().map(|_| ()).map_err(Box::new)
}

#[test]
fn an_image_whose_finish_outlasts_the_final_bound_is_never_published() {
    if !supported("an_image_whose_finish_outlasts_the_final_bound_is_never_published") {
        return;
    }
    // An earlier image at the path: a given-up migration must leave it as it was.
    let path = image_path("late");
    std::fs::write(&path, b"the earlier image").unwrap();
    let partial = ImageWriter::partial_path(&path);
    let result = migrate_into_image(
        &path,
        Duration::from_millis(800),
        Duration::from_millis(200),
    );
    match result.map_err(|e| *e) {
        Err(Error::Timeout {
            step: Step::Acknowledge,
            ..
        }) => {}
        other => panic!("expected a timeout waiting for the acknowledgement, got {other:?}"),
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"the earlier image",
        "a finish the driver gave up on published the image"
    );
    assert!(
        partial.exists(),
        "what was written stays at the partial path"
    );
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_file(&partial).unwrap();

    // The same finish within the bound: published, complete, nothing left at the partial path.
    let path = image_path("in-time");
    migrate_into_image(&path, Duration::from_millis(50), Duration::from_secs(30)).unwrap();
    assert!(!ImageWriter::partial_path(&path).exists());
    let image = Image::open(&path).unwrap();
    assert!(image.is_complete());
    image.verify().unwrap();
    std::fs::remove_file(&path).unwrap();
}
