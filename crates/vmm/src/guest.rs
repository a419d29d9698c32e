//! The guest program: a few dozen instructions of 32-bit protected-mode x86 that the VMM
//! assembles (with `iced-x86`'s code assembler) and writes into guest RAM before the first
//! `KVM_RUN`. No firmware, no kernel: the VMM sets flat segments in `KVM_SET_SREGS` and points
//! `EIP` at the code, so KVM runs it as is (the nested KVM of the project machines cannot boot a
//! stock kernel, but runs this).
//!
//! # What it does
//!
//! Each vCPU owns a disjoint region of guest RAM and a parameter block ([`ParamBlock`]) whose
//! address it receives in `ESI`. It makes `passes` passes over the first `pages` pages of its
//! region, visiting page `idx`, then `idx + stride` (mod `pages`), and so on; with `stride`
//! coprime to `pages` a pass visits every page once. On each visit it reads one 32-bit word of
//! the page (at byte `(idx * 8) & 0xff8`), computes
//!
//! ```text
//! x = old * 0x9E3779B1 + pass + idx          (mod 2^32)
//! ```
//!
//! stores `x` back and folds it into a running checksum
//! `sum = (rotl(sum, 5) ^ x) * 0x01000193`. Because every new value depends on the value the
//! page held, a page that a migration delivered stale, or not at all, changes the checksum.
//!
//! Every `chunk` pages it writes the running checksum to [`PORT_PROGRESS`] (an `OUT`, so a
//! `KVM_EXIT_IO` the VMM sees: progress, a place to pace the guest and a place to pause it).
//! After its passes it idles for `idle_ticks` ticks: an `OUT` to [`PORT_IDLE`] per tick, where
//! the VMM waits [`IDLE_TICK`], and no memory access (an idle guest: `--dirty-rate 0`). At the
//! end it writes the final checksum to [`PORT_DONE`] and executes `HLT`.
//!
//! [`GuestProgram::expected`] computes the same checksums in Rust, so a run can be checked
//! without trusting either side alone.

use crate::error::Error;
use iced_x86::code_asm::*;

/// Guest-physical address the code is loaded at.
pub const CODE_GPA: u64 = 0x1000;
/// Guest-physical address of vCPU 0's parameter block; vCPU `i`'s is `PARAMS_GPA + 64 * i`.
pub const PARAMS_GPA: u64 = 0x8000;
/// Guest-physical address where the vCPUs' data regions start (1 MiB).
pub const DATA_GPA: u64 = 0x10_0000;
/// Most vCPUs a program supports (the parameter blocks fill one page).
pub const MAX_VCPUS: u32 = 64;
/// I/O port the guest writes its running checksum to every `chunk` pages.
pub const PORT_PROGRESS: u16 = 0x10;
/// I/O port the guest writes its final checksum to before `HLT`.
pub const PORT_DONE: u16 = 0x11;
/// I/O port the guest writes to once per idle tick, after its passes.
pub const PORT_IDLE: u16 = 0x12;
/// How long the VMM holds the vCPU at each idle tick.
pub const IDLE_TICK: std::time::Duration = std::time::Duration::from_millis(10);
/// Guest page size.
pub const PAGE: u64 = 4096;

/// Offsets of the 32-bit fields of a vCPU's parameter block.
#[derive(Debug, Clone, Copy)]
pub struct ParamBlock;

impl ParamBlock {
    /// Guest-physical address of the region's first page.
    pub const BASE: u64 = 0;
    /// Pages visited per pass.
    pub const PAGES: u64 = 4;
    /// Step between visited pages.
    pub const STRIDE: u64 = 8;
    /// Passes.
    pub const PASSES: u64 = 12;
    /// Pages between progress reports.
    pub const CHUNK: u64 = 16;
    /// Initial checksum.
    pub const SEED: u64 = 20;
    /// Pages left until the next progress report (the guest counts it down).
    pub const COUNTDOWN: u64 = 24;
    /// Idle ticks after the passes.
    pub const IDLE: u64 = 28;
    /// Size of a block.
    pub const SIZE: u64 = 64;
}

/// What the guest does; the same program on every vCPU, each on its own region.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestProgram {
    /// vCPUs (1..=[`MAX_VCPUS`]).
    pub vcpus: u32,
    /// Guest RAM in bytes (a multiple of 4 KiB, more than [`DATA_GPA`]).
    pub ram_size: u64,
    /// Pages each vCPU visits per pass (at least 1, at most its region).
    pub pages_per_vcpu: u32,
    /// Step between visited pages: 1 is sequential; must be coprime with `pages_per_vcpu`.
    pub stride: u32,
    /// Passes over the pages.
    pub passes: u32,
    /// Pages between progress reports (each one is a `KVM_EXIT_IO`).
    pub chunk: u32,
    /// Ticks of [`IDLE_TICK`] the guest idles after its passes, writing nothing (0: none).
    #[serde(default)]
    pub idle_ticks: u32,
}

impl GuestProgram {
    /// A program whose vCPUs together visit `working_set` bytes per pass (rounded down to whole
    /// pages per vCPU) with a stride that scatters the writes, for `passes` passes.
    pub fn new(vcpus: u32, ram_size: u64, working_set: u64, passes: u32) -> Result<Self, Error> {
        let pages = (working_set / PAGE / u64::from(vcpus.max(1))).max(1);
        let pages = u32::try_from(pages).map_err(|_| Error::Program {
            reason: "working set too large",
        })?;
        let program = GuestProgram {
            vcpus,
            ram_size,
            pages_per_vcpu: pages,
            stride: scatter_stride(pages),
            passes,
            chunk: 16,
            idle_ticks: 0,
        };
        program.validate()?;
        Ok(program)
    }

    /// The same program, idling `ticks` ticks of [`IDLE_TICK`] after its passes. The idle
    /// ticks change no byte the guest writes and not its checksum.
    pub fn with_idle_ticks(mut self, ticks: u32) -> Self {
        self.idle_ticks = ticks;
        self
    }

    /// Checks the fields against each other.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |reason| Err(Error::Program { reason });
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return bad("vcpus must be 1..=64");
        }
        if !self.ram_size.is_multiple_of(PAGE)
            || self.ram_size <= DATA_GPA
            || self.ram_size > 1 << 32
        {
            return bad("guest RAM must be a multiple of 4 KiB, above 1 MiB and at most 4 GiB");
        }
        if self.pages_per_vcpu == 0 || u64::from(self.pages_per_vcpu) > self.region_pages() {
            return bad("pages per vCPU must be at least 1 and fit the vCPU's region");
        }
        if self.stride == 0
            || self.stride >= self.pages_per_vcpu.max(2)
            || gcd(self.stride, self.pages_per_vcpu) != 1
        {
            return bad("stride must be below the page count and coprime with it");
        }
        if self.chunk == 0 {
            return bad("chunk must be at least 1 page");
        }
        Ok(())
    }

    /// Pages of each vCPU's region.
    pub fn region_pages(&self) -> u64 {
        (self.ram_size - DATA_GPA) / PAGE / u64::from(self.vcpus.max(1))
    }

    /// Guest-physical address of vCPU `cpu`'s region.
    pub fn region_gpa(&self, cpu: u32) -> u64 {
        DATA_GPA + u64::from(cpu) * self.region_pages() * PAGE
    }

    /// Guest-physical address of vCPU `cpu`'s parameter block.
    pub fn params_gpa(cpu: u32) -> u64 {
        PARAMS_GPA + u64::from(cpu) * ParamBlock::SIZE
    }

    /// The initial checksum of vCPU `cpu`.
    pub fn seed(cpu: u32) -> u32 {
        0x811c_9dc5 ^ cpu.wrapping_mul(0x9E37_79B9)
    }

    /// Page writes each vCPU makes in total.
    pub fn writes_per_vcpu(&self) -> u64 {
        u64::from(self.pages_per_vcpu) * u64::from(self.passes)
    }

    /// Bytes of guest RAM the vCPUs visit per pass.
    pub fn working_set(&self) -> u64 {
        u64::from(self.pages_per_vcpu) * u64::from(self.vcpus) * PAGE
    }

    /// The machine code, to be loaded at [`CODE_GPA`].
    pub fn code(&self) -> Result<Vec<u8>, Error> {
        assemble().map_err(|e| Error::Assemble {
            reason: e.to_string(),
        })
    }

    /// The parameter block of vCPU `cpu` as bytes, to be loaded at [`GuestProgram::params_gpa`].
    pub fn params(&self, cpu: u32) -> [u8; ParamBlock::SIZE as usize] {
        let mut b = [0u8; ParamBlock::SIZE as usize];
        let region = u32::try_from(self.region_gpa(cpu)).unwrap_or(u32::MAX);
        for (off, v) in [
            (ParamBlock::BASE, region),
            (ParamBlock::PAGES, self.pages_per_vcpu),
            (ParamBlock::STRIDE, self.stride),
            (ParamBlock::PASSES, self.passes),
            (ParamBlock::CHUNK, self.chunk),
            (ParamBlock::SEED, Self::seed(cpu)),
            (ParamBlock::COUNTDOWN, self.chunk),
            (ParamBlock::IDLE, self.idle_ticks),
        ] {
            b[off as usize..off as usize + 4].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// The final checksum of every vCPU, computed in Rust the way the guest computes it on
    /// zero-filled RAM. Costs one step per page write.
    pub fn expected(&self) -> Vec<u32> {
        (0..self.vcpus)
            .map(|cpu| {
                let n = self.pages_per_vcpu;
                let mut words = vec![0u32; n as usize];
                let mut sum = Self::seed(cpu);
                for pass in 0..self.passes {
                    let mut idx = 0u32;
                    for _ in 0..n {
                        let w = &mut words[idx as usize];
                        *w = w
                            .wrapping_mul(0x9E37_79B1)
                            .wrapping_add(pass)
                            .wrapping_add(idx);
                        sum = (sum.rotate_left(5) ^ *w).wrapping_mul(0x0100_0193);
                        idx += self.stride;
                        if idx >= n {
                            idx -= n;
                        }
                    }
                }
                sum
            })
            .collect()
    }
}

/// One number for the checksums of all vCPUs (FNV-1a over them, in vCPU order).
pub fn combined_checksum(per_vcpu: &[u32]) -> u32 {
    per_vcpu
        .iter()
        .fold(0x811c_9dc5u32, |h, &c| (h ^ c).wrapping_mul(0x0100_0193))
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// A stride near 61.8 % of `pages` that is coprime with it: consecutive writes land far apart.
pub(crate) fn scatter_stride(pages: u32) -> u32 {
    if pages < 3 {
        return 1;
    }
    let mut s = ((u64::from(pages) * 618) / 1000).max(1) as u32;
    while gcd(s, pages) != 1 {
        s -= 1;
    }
    s
}

fn assemble() -> Result<Vec<u8>, IcedError> {
    let p = |off: u64| dword_ptr(esi + off as i32);
    let mut a = CodeAssembler::new(32)?;
    let mut pass_loop = a.create_label();
    let mut page_loop = a.create_label();
    let mut no_wrap = a.create_label();
    let mut next = a.create_label();
    let mut done = a.create_label();
    let mut idle_loop = a.create_label();
    let mut finish = a.create_label();

    // edx = checksum, ebp = pass, ecx = page index, edi = pages left in this pass.
    a.mov(edx, p(ParamBlock::SEED))?;
    a.xor(ebp, ebp)?;
    a.set_label(&mut pass_loop)?;
    a.cmp(ebp, p(ParamBlock::PASSES))?;
    a.jae(done)?;
    a.xor(ecx, ecx)?;
    a.mov(edi, p(ParamBlock::PAGES))?;

    a.set_label(&mut page_loop)?;
    // ebx = base + idx * 4096 + ((idx * 8) & 0xff8): the word this visit reads and writes.
    a.mov(ebx, ecx)?;
    a.shl(ebx, 12)?;
    a.add(ebx, p(ParamBlock::BASE))?;
    a.mov(eax, ecx)?;
    a.shl(eax, 3)?;
    a.and(eax, 0xff8)?;
    a.add(ebx, eax)?;
    // x = old * 0x9E3779B1 + pass + idx
    a.mov(eax, dword_ptr(ebx))?;
    a.imul_3(eax, eax, 0x9E37_79B1u32 as i32)?;
    a.add(eax, ebp)?;
    a.add(eax, ecx)?;
    a.mov(dword_ptr(ebx), eax)?;
    // sum = (rotl(sum, 5) ^ x) * 0x01000193
    a.rol(edx, 5)?;
    a.xor(edx, eax)?;
    a.imul_3(edx, edx, 0x0100_0193)?;
    // idx = (idx + stride) mod pages
    a.add(ecx, p(ParamBlock::STRIDE))?;
    a.cmp(ecx, p(ParamBlock::PAGES))?;
    a.jb(no_wrap)?;
    a.sub(ecx, p(ParamBlock::PAGES))?;
    a.set_label(&mut no_wrap)?;
    // Every `chunk` pages: report the running checksum.
    a.dec(p(ParamBlock::COUNTDOWN))?;
    a.jnz(next)?;
    a.mov(eax, p(ParamBlock::CHUNK))?;
    a.mov(p(ParamBlock::COUNTDOWN), eax)?;
    a.mov(eax, edx)?;
    a.out(u32::from(PORT_PROGRESS), eax)?;
    a.set_label(&mut next)?;
    a.dec(edi)?;
    a.jnz(page_loop)?;
    a.inc(ebp)?;
    a.jmp(pass_loop)?;

    // Idle: one exit per tick, no memory access; ecx counts the ticks left (a register, so it
    // travels with the vCPU state when the guest migrates mid-idle).
    a.set_label(&mut done)?;
    a.mov(ecx, p(ParamBlock::IDLE))?;
    a.set_label(&mut idle_loop)?;
    a.test(ecx, ecx)?;
    a.jz(finish)?;
    a.mov(eax, edx)?;
    a.out(u32::from(PORT_IDLE), eax)?;
    a.dec(ecx)?;
    a.jmp(idle_loop)?;

    a.set_label(&mut finish)?;
    a.mov(eax, edx)?;
    a.out(u32::from(PORT_DONE), eax)?;
    a.hlt()?;
    a.assemble(CODE_GPA)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembles_and_validates() {
        let p = GuestProgram::new(2, 64 << 20, 8 << 20, 3).unwrap();
        assert_eq!(p.pages_per_vcpu, 1024);
        assert_eq!(gcd(p.stride, 1024), 1);
        assert!(!p.code().unwrap().is_empty());
        let mut bad = p.clone();
        bad.stride = 2;
        assert!(bad.validate().is_err());
        bad.stride = 1;
        bad.pages_per_vcpu = u32::MAX;
        assert!(bad.validate().is_err());
    }

    #[test]
    fn idle_ticks_change_no_checksum() {
        let p = GuestProgram::new(2, 4 << 20, 64 * PAGE, 2).unwrap();
        let idle = p.clone().with_idle_ticks(100);
        assert_eq!(p.expected(), idle.expected());
        assert_eq!(
            &idle.params(0)[ParamBlock::IDLE as usize..][..4],
            &100u32.to_le_bytes()
        );
        assert!(idle.validate().is_ok());
    }

    #[test]
    fn expected_depends_on_every_visit() {
        let p = GuestProgram::new(1, 4 << 20, 64 * PAGE, 2).unwrap();
        let mut q = p.clone();
        q.passes = 3;
        assert_ne!(p.expected(), q.expected());
        assert_eq!(p.expected(), p.expected());
    }
}
