//! The VMM against KVM: the guest computes what the Rust model says, a live migration between
//! two VMM processes ends with the unmigrated checksum, and KVM's dirty log never sees a page
//! the engine's rounds missed.
//!
//! Needs `/dev/kvm` (read/write). Without it every test prints a loud SKIP and returns.

use precopy_vmm::{GuestProgram, RamBacking, Vm, VmConfig};

fn kvm_or_skip(test: &str) -> bool {
    match precopy_vmm::kvm_unavailable() {
        None => true,
        Some(why) => {
            eprintln!("\n*** SKIP {test}: KVM not usable here: {why} ***\n");
            false
        }
    }
}

fn run(program: GuestProgram, backing: RamBacking) -> precopy_vmm::RunOutcome {
    let vm = Vm::new(VmConfig {
        program,
        backing,
        dirty_rate: None,
        kvm_dirty_log: false,
    })
    .unwrap();
    vm.load_program().unwrap();
    vm.start(None).unwrap().wait().unwrap()
}

#[test]
fn guest_computes_the_model_checksum() {
    if !kvm_or_skip("guest_computes_the_model_checksum") {
        return;
    }
    let program = GuestProgram::new(2, 64 << 20, 8 << 20, 5).unwrap();
    let outcome = run(program.clone(), RamBacking::Anonymous);
    assert_eq!(outcome.checksums, program.expected());
    let per_vcpu = program.writes_per_vcpu() / u64::from(program.chunk);
    assert_eq!(outcome.progress_reports, per_vcpu * 2);
}

fn destination(memfd: bool) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_precopy-vmm"));
    cmd.arg("destination");
    if memfd {
        cmd.arg("--memfd");
    }
    cmd
}

/// A live migration of a guest between two VMM processes, checked. The guest's work is the
/// test's one timing assumption: the migration must reach its switch-over before the guest
/// ends. 12 passes (~1.5 s at 64 MiB/s) suffice on a quiet machine; beside two CPU hogs at
/// load 9 round 0 of a memfd guest once took 1.35 s and the guest finished first. Such a run
/// shows nothing about the migration: it is run again, once, with five times the passes.
fn demo(backing: RamBacking) -> precopy_vmm::VmDemoReport {
    let mut passes = 12;
    let report = loop {
        // 2 vCPUs over 8 MiB of a 64 MiB guest, `passes` passes at 64 MiB/s, migrated after
        // 0.3 s.
        let program = GuestProgram::new(2, 64 << 20, 8 << 20, passes).unwrap();
        let opts = precopy_vmm::VmDemoOptions {
            config: VmConfig {
                program,
                backing,
                dirty_rate: Some(64 << 20),
                kvm_dirty_log: true,
            },
            destination_backing: backing,
            warmup: std::time::Duration::from_millis(300),
            migrate: precopy_vmm::MigrateOptions::default(),
        };
        let cmd = destination(backing == RamBacking::Memfd);
        let report = precopy_vmm::demo(&opts, cmd, |_| {}).unwrap();
        eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
        if !report.source.finished_before_switch_over || passes > 12 {
            break report;
        }
        eprintln!(
            "the guest finished before the switch-over in {passes} passes (a loaded machine): again with {}",
            passes * 5
        );
        passes *= 5;
    };
    assert!(
        !report.source.finished_before_switch_over,
        "the guest finished before the migration: nothing was live"
    );
    assert_ne!(report.source_ram_addr, report.destination.ram_addr);
    assert_eq!(report.unmigrated.checksum, report.expected);
    assert_eq!(report.destination.checksum, report.unmigrated.checksum);
    assert!(report.checksums_match);
    assert!(report.source.migration.rounds.len() >= 2);
    assert!(
        report.source.cross_check.iter().any(|r| r.kvm_pages > 0),
        "KVM's log saw nothing: the check checked nothing"
    );
    // The vCPU state went through the state hook and the STATE frame: the driver counted the
    // blob it sent, the destination the one it received and resumed from.
    let sent = report.source.migration.state_bytes.expect("no state sent");
    assert!(sent > 0);
    assert_eq!(report.destination.state_bytes, sent);
    // Guest RAM was received into the destination's own memory, every page of it at least once.
    assert!(report.destination.pages_received > 0);
    report
}

#[test]
fn migrated_guest_ends_with_the_unmigrated_checksum() {
    if !kvm_or_skip("migrated_guest_ends_with_the_unmigrated_checksum") {
        return;
    }
    demo(RamBacking::Anonymous);
}

#[test]
fn memfd_guest_ram_migrates() {
    if !kvm_or_skip("memfd_guest_ram_migrates") {
        return;
    }
    demo(RamBacking::Memfd);
}

/// One vCPU scattering writes over `working_set` bytes as fast as it runs, with KVM's dirty log
/// on, for far more passes than a test lasts.
fn fast_guest(working_set: u64) -> precopy_vmm::RunningVm {
    let program =
        GuestProgram::new(1, 2 * working_set + (1 << 20), working_set, 1_000_000).unwrap();
    let vm = Vm::new(VmConfig {
        program,
        backing: RamBacking::Anonymous,
        dirty_rate: None,
        kvm_dirty_log: true,
    })
    .unwrap();
    vm.load_program().unwrap();
    vm.start(None).unwrap()
}

/// Waits until the guest made `reports` more progress reports (each is `chunk` page writes).
fn wait_for_progress(control: &precopy_vmm::VmControl, reports: u64) {
    let target = control.progress_reports() + reports;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while control.progress_reports() < target {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest made no progress for 60 s"
        );
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

/// Many rounds against a guest writing as fast as it runs; every round's KVM pages must be
/// covered by ours (strictly per round in lockstep, else by this round or the previous one).
/// Drives the dirty log directly (no transport): the migration tests run the same check inside
/// the driver.
fn kvm_log_subset(lockstep: bool) {
    use precopy_migrate::DirtyLog;
    const ROUNDS: usize = 40;
    let running = fast_guest(16 << 20);
    let ram = running.ram().clone();
    let mut log =
        precopy_vmm::KvmCheckedLog::new(precopy_vmm::uffd_dirty_log(&ram).unwrap(), ram).unwrap();
    if lockstep {
        log = log.lockstep(running.control());
    }
    log.start().unwrap();
    let mut out = Vec::new();
    let control = running.control();
    for i in 0..ROUNDS {
        // Rounds of different lengths (1 to 4 progress reports of 16 pages each), and every
        // one with writes in it however slowly a loaded machine runs the vCPU.
        wait_for_progress(&control, 1 + i as u64 % 4);
        out.clear();
        if let Err(e) = log.collect(&mut out) {
            panic!("round {}: {}", i + 1, precopy_sys::error_chain(&e));
        }
    }
    running.stop().unwrap();
    let rounds = log.rounds();
    for r in rounds {
        eprintln!("{r:?}");
    }
    assert_eq!(rounds.len(), ROUNDS);
    let idle = rounds.iter().filter(|r| r.kvm_pages == 0).count();
    assert_eq!(
        idle, 0,
        "KVM saw no write in {idle} rounds: the check checked nothing there"
    );
    if lockstep {
        assert!(rounds.iter().all(|r| r.kvm_only_this_round == 0));
    }
    let kvm: u64 = rounds.iter().map(|r| r.kvm_pages).sum();
    let ours: u64 = rounds.iter().map(|r| r.our_pages).sum();
    eprintln!(
        "lockstep {lockstep}: {} rounds, KVM {kvm} pages, ours {ours}",
        rounds.len()
    );
}
#[test]
fn kvm_dirty_log_is_a_subset_of_ours_every_round() {
    if !kvm_or_skip("kvm_dirty_log_is_a_subset_of_ours_every_round") {
        return;
    }
    kvm_log_subset(false);
}

#[test]
fn kvm_dirty_log_is_a_subset_of_ours_in_lockstep() {
    if !kvm_or_skip("kvm_dirty_log_is_a_subset_of_ours_in_lockstep") {
        return;
    }
    kvm_log_subset(true);
}

/// An engine log that loses every page it reports: the cross-check must fail, naming KVM's page.
#[derive(Debug)]
struct Lossy(precopy_migrate::UffdDirtyLog);

impl precopy_migrate::DirtyLog for Lossy {
    type Error = precopy_migrate::TrackingError;
    fn memory(&self) -> Vec<std::ops::Range<u64>> {
        self.0.memory()
    }
    fn page_size(&self) -> u64 {
        self.0.page_size()
    }
    fn unvouched(&self) -> Vec<std::ops::Range<u64>> {
        self.0.unvouched()
    }
    fn start(&mut self) -> Result<(), Self::Error> {
        self.0.start()
    }
    fn stop(&mut self) -> Result<(), Self::Error> {
        self.0.stop()
    }
    fn collect(
        &mut self,
        _out: &mut Vec<std::ops::Range<u64>>,
    ) -> Result<precopy_migrate::CollectStats, Self::Error> {
        let mut lost = Vec::new();
        self.0.collect(&mut lost)?;
        Ok(Default::default())
    }
}

#[test]
fn cross_check_fails_when_our_log_misses_a_write() {
    use precopy_migrate::DirtyLog;
    if !kvm_or_skip("cross_check_fails_when_our_log_misses_a_write") {
        return;
    }
    let running = fast_guest(1 << 20);
    let ram = running.ram().clone();
    let mut log =
        precopy_vmm::KvmCheckedLog::new(Lossy(precopy_vmm::uffd_dirty_log(&ram).unwrap()), ram)
            .unwrap()
            .lockstep(running.control());
    log.start().unwrap();
    let mut failure = None;
    let control = running.control();
    for _ in 0..100 {
        wait_for_progress(&control, 1);
        if let Err(e) = log.collect(&mut Vec::new()) {
            failure = Some(e);
            break;
        }
    }
    running.stop().unwrap();
    let e = failure.expect("a log that drops every page passed the cross-check");
    assert!(
        matches!(e, precopy_vmm::Error::MissedByUffd { missed, .. } if missed > 0),
        "{e}"
    );
}

/// A source that is not a VMM: `len` bytes of memory sent in one round, then `state` (if any)
/// and the final checksum, to a destination VMM's [`precopy_vmm::receive`]. Returns the
/// source's and the destination's errors.
fn send_to_destination(len: u64, state: Option<&[u8]>) -> (String, String) {
    use precopy_transfer::{
        Connection, FinalCheck, Key, Layout, Listener, Sender, SenderConfig, SliceSource,
    };
    let listener = Listener::bind_tcp("127.0.0.1:0").unwrap();
    let addr = listener.address();
    let key = Key::random();
    let dest_key = Some(key.clone());
    let dest = std::thread::spawn(move || {
        precopy_vmm::receive(&listener, dest_key, RamBacking::Anonymous)
    });
    let base = 0x4000_0000;
    let mut memory = vec![0u8; len as usize];
    memory[4096..4100].copy_from_slice(b"page");
    let layout = Layout::single(4096, base, len).unwrap();
    let conn = Connection::connect_tcp(&addr).unwrap();
    let mut sender = Sender::connect(
        vec![conn],
        layout,
        SliceSource::new(base, memory),
        &SenderConfig {
            key: Some(key),
            ..SenderConfig::default()
        },
    )
    .unwrap();
    let sent = sender.send_round(&[base..base + len]).and_then(|_| {
        if let Some(s) = state {
            sender.send_state(s)?;
        }
        sender.finish(FinalCheck::Recorded)
    });
    let source = match sent {
        Ok(_) => panic!("the destination acknowledged a migration it cannot resume"),
        Err(e) => precopy_sys::error_chain(&e),
    };
    let destination = match dest.join().unwrap() {
        Ok(r) => panic!("the destination resumed a guest from a bad state: {r:?}"),
        Err(e) => precopy_sys::error_chain(&e),
    };
    eprintln!("source: {source}\ndestination: {destination}");
    (source, destination)
}

#[test]
fn destination_refuses_a_state_it_cannot_resume_before_acknowledging() {
    if !kvm_or_skip("destination_refuses_a_state_it_cannot_resume_before_acknowledging") {
        return;
    }
    let ram = 4 << 20;
    // Not a VM state at all.
    let (src, dst) = send_to_destination(ram, Some(b"{\"not\": \"a VM state\"}"));
    assert!(dst.contains("checking the received VM state"), "{dst}");
    assert!(src.contains("malformed state blob"), "{src}");
    // A VM state of a guest with twice this RAM.
    let other = precopy_vmm::VmState {
        program: GuestProgram::new(1, 2 * ram, 64 << 10, 1).unwrap(),
        dirty_rate: None,
        vcpus: Vec::new(),
    };
    let (src, dst) = send_to_destination(ram, Some(&other.to_bytes().unwrap()));
    assert!(dst.contains("bytes of guest RAM"), "{dst}");
    assert!(src.contains("bytes of guest RAM"), "{src}");
    // Guest RAM this VMM cannot run a guest in: refused before it maps anything.
    let (_, dst) = send_to_destination(512 << 10, None);
    assert!(dst.contains("more than 1 MiB and at most 4 GiB"), "{dst}");
    // No state: nothing to resume the vCPUs from.
    let (src, dst) = send_to_destination(ram, None);
    assert!(dst.contains("sent no VM state"), "{dst}");
    assert!(src.contains("sent no VM state"), "{src}");
}

/// The VM's own workload, whose state hook hands out a state no destination can resume from.
#[derive(Debug)]
struct CorruptState(precopy_vmm::VmControl);

impl precopy_migrate::Workload for CorruptState {
    type Error = precopy_vmm::Error;
    fn pause(&mut self) -> Result<(), precopy_vmm::Error> {
        precopy_migrate::Workload::pause(&mut self.0)
    }
    fn resume(&mut self) -> Result<(), precopy_vmm::Error> {
        precopy_migrate::Workload::resume(&mut self.0)
    }
    fn save_state(&mut self) -> Result<Vec<u8>, precopy_vmm::Error> {
        let mut state = self.0.state()?;
        state.vcpus.pop();
        state.to_bytes()
    }
}

#[test]
fn a_refused_state_fails_the_migration_and_the_source_guest_runs_on() {
    use precopy_migrate::{Migration, MigrationConfig, TransferTransport};
    use precopy_transfer::{Connection, ProcessMemory, Sender, SenderConfig};
    if !kvm_or_skip("a_refused_state_fails_the_migration_and_the_source_guest_runs_on") {
        return;
    }
    let program = GuestProgram::new(2, 32 << 20, 4 << 20, 20).unwrap();
    let vm = Vm::new(VmConfig {
        program: program.clone(),
        backing: RamBacking::Anonymous,
        dirty_rate: Some(32 << 20),
        kvm_dirty_log: false,
    })
    .unwrap();
    vm.load_program().unwrap();
    let running = vm.start(None).unwrap();
    let dest = precopy_vmm::DestinationProcess::spawn(destination(false)).unwrap();
    let ram = running.ram().clone();
    let sender = Sender::connect(
        vec![Connection::connect_tcp(dest.address()).unwrap()],
        precopy_vmm::guest_ram_layout(&ram, RamBacking::Anonymous).unwrap(),
        ProcessMemory::current(),
        &SenderConfig {
            key: dest.key(),
            ..SenderConfig::default()
        },
    )
    .unwrap();
    let mut migration = Migration::new(
        precopy_vmm::uffd_dirty_log(&ram).unwrap(),
        TransferTransport::new(sender),
        CorruptState(running.control()),
        MigrationConfig {
            max_downtime: std::time::Duration::from_millis(50),
            ..MigrationConfig::default()
        },
    );
    let e = migration
        .run()
        .expect_err("a state missing a vCPU was accepted");
    let chain = precopy_sys::error_chain(&e);
    assert!(
        chain.contains("1 vCPUs saved, the program has 2"),
        "{chain}"
    );
    let d = dest
        .finish()
        .expect_err("the destination resumed a guest missing a vCPU");
    assert!(
        d.to_string().contains("checking the received VM state"),
        "{d}"
    );
    drop(migration);
    // The driver resumed the source's vCPUs: the guest runs on here, to the model's checksums.
    let control = running.control();
    assert!(
        !control.finished(),
        "the guest finished before the migration ended"
    );
    let outcome = running.wait().unwrap();
    assert_eq!(outcome.checksums, program.expected());
}
