//! The C programs some tests run as targets (a multi-threaded writer for the CLI's attach
//! tests, a process held in `vfork` for the pause tests), compiled with the system's `cc` at
//! test time (`.ci/run` installs one): one helper, so every crate's tests compile them alike.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Compiles the C source `src` with `cc -O2 FLAGS` into the executable `out` and returns
/// `out`; once per process and output path (a later call returns at once). The compiler
/// writes a temporary file beside `out`, renamed over it when done, so another test process
/// running an older `out` never meets a half-written file.
///
/// Panics, failing the calling test, when `cc` cannot be run (saying to install a C compiler)
/// or the compile fails.
pub fn compile_c(src: &Path, out: &Path, flags: &[&str]) -> PathBuf {
    static DONE: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);
    let mut done = DONE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let done = done.get_or_insert_with(HashSet::new);
    if done.contains(out) {
        return out.to_path_buf();
    }
    let mut partial = out.as_os_str().to_owned();
    partial.push(format!(".{}.partial", std::process::id()));
    let partial = PathBuf::from(partial);
    let status = Command::new("cc")
        .arg("-O2")
        .args(flags)
        .arg("-o")
        .arg(&partial)
        .arg(src)
        .status()
        .expect("running cc (install a C compiler: .ci/run does)");
    assert!(status.success(), "compiling {}", src.display());
    std::fs::rename(&partial, out)
        .unwrap_or_else(|e| panic!("renaming {} to {}: {e}", partial.display(), out.display()));
    done.insert(out.to_path_buf());
    out.to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A program compiled by the helper runs; a second call for the same output neither
    /// compiles again (the file is the same one) nor fails.
    #[test]
    fn compiles_once_and_the_program_runs() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("exit7.c");
        std::fs::write(&src, "int main(void) { return 7; }\n").unwrap();
        let out = dir.path().join("exit7");
        let bin = compile_c(&src, &out, &[]);
        assert_eq!(bin, out);
        let status = Command::new(&bin).status().unwrap();
        assert_eq!(status.code(), Some(7));
        let first = std::fs::metadata(&bin).unwrap().modified().unwrap();
        // Unreadable source now: a second compile would fail, so this call must not compile.
        std::fs::remove_file(&src).unwrap();
        assert_eq!(compile_c(&src, &out, &[]), out);
        assert_eq!(std::fs::metadata(&bin).unwrap().modified().unwrap(), first);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".partial"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
