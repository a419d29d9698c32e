//! `precopy __guard --pid PID`: a watchdog `precopy send` starts beside itself so that a target
//! the send stopped (the duty-cycle throttle's `SIGSTOP`, the final round) does not stay stopped
//! forever if the send dies without cleaning up (`SIGKILL`, an OOM kill, a crash).
//!
//! The send holds the write end of the guard's stdin for its whole life. When it ends normally
//! (success, failure or interruption, each of which leaves the target as the user asked) it
//! writes `K` ("keep as it is") before the pipe closes, and the guard exits. If the pipe closes
//! without it, the send died: the guard continues the target (`SIGCONT`), unless the target has
//! exited meanwhile (checked through a pidfd, so a reused PID is never signalled). The guard runs
//! in its own process group, so a Ctrl-C meant for the send does not reach it.

use anyhow::Context;
use std::io::Read;
use std::os::fd::AsFd;
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};

/// Arguments of the hidden `__guard` subcommand.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The process to continue if the send dies.
    #[arg(long)]
    pid: i32,
}

/// Waits for the send's verdict on stdin (see the module docs).
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let pidfd = precopy_sys::process::pidfd_open(args.pid)
        .with_context(|| format!("opening process {}", args.pid))?;
    let mut verdict = Vec::new();
    // An error reading counts as the send gone.
    let _ = std::io::stdin().lock().read_to_end(&mut verdict);
    if verdict.last() == Some(&b'K') {
        return Ok(ExitCode::SUCCESS);
    }
    if !precopy_sys::process::pidfd_exited(pidfd.as_fd()).unwrap_or(true) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(args.pid),
            nix::sys::signal::Signal::SIGCONT,
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The send's side: a running guard, dismissed (told `K`) when dropped.
#[derive(Debug)]
pub struct Guard {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Guard {
    /// Starts a guard for `pid` (this executable, `__guard`, in its own process group).
    pub fn start(pid: i32) -> anyhow::Result<Guard> {
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe().context("finding this executable")?;
        let mut child = Command::new(exe)
            .args(["__guard", "--pid", &pid.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting the watchdog that continues the target if this send dies")?;
        let stdin = child.stdin.take();
        Ok(Guard { child, stdin })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut w) = self.stdin.take() {
            let _ = std::io::Write::write_all(&mut w, b"K");
        }
        let _ = self.child.wait();
    }
}
