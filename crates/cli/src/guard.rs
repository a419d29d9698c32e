//! `precopy __guard --pid PID`: a watchdog `precopy send` starts beside itself so that a target
//! the send stopped (the duty-cycle throttle's `SIGSTOP`, the final round) does not stay stopped
//! forever if the send dies without cleaning up (`SIGKILL`, an OOM kill, a crash).
//!
//! The send holds the write end of the guard's stdin for its whole life and writes lines to it.
//! When it ends normally (success, failure or interruption, each of which leaves the target as
//! the user asked) it writes `K` ("keep as it is"), and the guard exits. If the pipe closes
//! without it, the send died: the guard continues the target (`SIGCONT`), unless the target has
//! exited meanwhile (checked through a pidfd, so a reused PID is never signalled) or the send's
//! last word on it was `S` ("stopped by someone else": a target found stopped when the send
//! took hold of it, which the send leaves stopped; `O`, "ours", undoes it, for a target found
//! running again later). The guard runs in its own process group, so a Ctrl-C meant for the
//! send does not reach it.
//!
//! A raised pause (`precopy_migrate::ProcessControl`, "Raised pause") makes the target's
//! threads real-time for a moment (at most 5 ms). Before it raises them, the send writes one
//! line per thread, `R TID POLICY PRIORITY RAISED_POLICY RAISED_PRIORITY` (the policy it has
//! and the one it gets), and once every one is back, `C`. So a send killed in between leaves
//! the guard the list: before its `SIGCONT`, it puts back each listed thread of the target
//! whose policy is still exactly the raised one (a thread that changed its own policy since,
//! or an ID that no longer names a thread of the target, is left alone), and the target never
//! runs raised. The send's end of the pipe is non-blocking: a line that cannot be written at
//! once (a full pipe) means that pause raises nothing.

use anyhow::Context;
use precopy_sys::sched::{ThreadPolicy, Tid};
use std::fs::File;
use std::io::{BufRead, Write};
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
    let mut raised: Vec<(Tid, ThreadPolicy, ThreadPolicy)> = Vec::new();
    let mut stopped_by_others = false;
    // An error reading counts as the send gone.
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match line.split_whitespace().collect::<Vec<_>>()[..] {
            ["K"] => return Ok(ExitCode::SUCCESS),
            ["C"] => raised.clear(),
            ["S"] => stopped_by_others = true,
            ["O"] => stopped_by_others = false,
            ["R", tid, policy, priority, to_policy, to_priority] => {
                let n = |w: &str| w.parse::<i32>().ok();
                if let (
                    Some(tid),
                    Some(policy),
                    Some(priority),
                    Some(to_policy),
                    Some(to_priority),
                ) = (n(tid), n(policy), n(priority), n(to_policy), n(to_priority))
                {
                    raised.retain(|r| r.0 != tid);
                    raised.push((
                        tid,
                        ThreadPolicy { policy, priority },
                        ThreadPolicy {
                            policy: to_policy,
                            priority: to_priority,
                        },
                    ));
                }
            }
            _ => {}
        }
    }
    if !precopy_sys::process::pidfd_exited(pidfd.as_fd()).unwrap_or(true) {
        for (tid, before, to) in raised {
            // Only a thread of the target: its ID may have been reused if it exited.
            if std::path::Path::new(&format!("/proc/{}/task/{tid}", args.pid)).exists() {
                let _ = precopy_sys::sched::put_back_if_raised(tid, before, to);
            }
        }
        if stopped_by_others {
            return Ok(ExitCode::SUCCESS);
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(args.pid),
            nix::sys::signal::Signal::SIGCONT,
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The send's journal of raised target threads, written to its guard (see the module docs).
#[derive(Debug)]
pub struct Journal {
    pipe: File,
}

/// Bytes a pipe writes at once or not at all (`PIPE_BUF`, pipe(7)).
const PIPE_BUF: usize = 4096;

impl Journal {
    /// Writes `lines` (each ending in a newline) in writes of whole lines of at most
    /// [`PIPE_BUF`] bytes, each all or nothing; whether all went.
    fn write_lines(&self, lines: &[String]) -> bool {
        let mut chunk = String::new();
        for line in lines {
            if chunk.len() + line.len() > PIPE_BUF && !self.write_once(&chunk) {
                return false;
            }
            if chunk.len() + line.len() > PIPE_BUF {
                chunk.clear();
            }
            chunk.push_str(line);
        }
        chunk.is_empty() || self.write_once(&chunk)
    }

    fn write_once(&self, bytes: &str) -> bool {
        matches!((&self.pipe).write(bytes.as_bytes()), Ok(n) if n == bytes.len())
    }

    /// Tells the guard whether the target is stopped by someone else (leave it stopped if the
    /// send dies) or the send's to continue (see the module docs); whether it was told.
    pub fn stopped_by_others(&self, stopped: bool) -> bool {
        self.write_once(if stopped { "S\n" } else { "O\n" })
    }
}

impl precopy_migrate::RaiseJournal for Journal {
    fn raising(&self, threads: &[(Tid, ThreadPolicy)], to: ThreadPolicy) -> bool {
        let lines: Vec<String> = threads
            .iter()
            .map(|(tid, b)| {
                format!(
                    "R {tid} {} {} {} {}\n",
                    b.policy, b.priority, to.policy, to.priority
                )
            })
            .collect();
        self.write_lines(&lines)
    }

    fn restored(&self) {
        // Not told, the guard would put back only threads still exactly as raised.
        let _ = self.write_once("C\n");
    }
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

    /// A journal of raised target threads for `ProcessControl::with_raise_journal`, on the
    /// same pipe (made non-blocking: see the module docs).
    pub fn journal(&self) -> anyhow::Result<Journal> {
        let stdin = self.stdin.as_ref().context("the guard's pipe is closed")?;
        let fd = stdin
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the guard's pipe")?;
        set_nonblocking(&fd, true).context("making the guard's pipe non-blocking")?;
        Ok(Journal {
            pipe: File::from(fd),
        })
    }
}

fn set_nonblocking(fd: &impl AsFd, on: bool) -> nix::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    let flags = if on {
        flags | OFlag::O_NONBLOCK
    } else {
        flags & !OFlag::O_NONBLOCK
    };
    fcntl(fd, FcntlArg::F_SETFL(flags)).map(drop)
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut w) = self.stdin.take() {
            // The journal made the pipe non-blocking; this word must not be lost to a full one.
            let _ = set_nonblocking(&w, false);
            let _ = w.write_all(b"K\n");
        }
        let _ = self.child.wait();
    }
}
