//! `precopy`: probe the kernel, run the pre-copy demo, benchmark tracking backends, inspect
//! checkpoint images.

// Unsafe code lives in precopy-sys only (ARCHITECTURE.md, "Code map").
#![forbid(unsafe_code)]
// `println!`/`eprintln!` panic on a closed stream: reports go through `output::outln!`,
// messages through `output::errln!`.
#![deny(clippy::print_stdout, clippy::print_stderr)]

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod args;
mod attach_bench;
mod bench;
mod demo;
mod guard;
mod image;
mod interrupt;
mod output;
mod probe;
mod progress;
mod rate;
mod send;
mod target_fixture;

#[derive(Debug, Parser)]
#[command(
    name = "precopy",
    version,
    about = "Find written pages and stream them elsewhere"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Report what this kernel offers and self-test the semantics the engine relies on.
    Probe(probe::Args),
    /// Live-migrate a writing source process to a destination process and verify the copy.
    Demo(Box<demo::Args>),
    /// Compare dirty-tracking backends: round cost, writer slowdown, accuracy.
    Bench(bench::Args),
    /// Inspect and verify checkpoint images.
    Image(image::Args),
    /// Measure attaching to a running process: attach time, the target's slowdown while
    /// tracked, dirty-rate accuracy against the target's own count.
    AttachBench(attach_bench::Args),
    /// Live pre-copy of a running process to a receiver or a checkpoint image.
    ///
    /// Attaching stops one thread of the target (ptrace) to create a userfaultfd in it:
    /// typically well under a millisecond on an idle machine, tens of milliseconds under load
    /// (the thread has to get a CPU to stop and to run the injected calls; the report gives
    /// the time). A blocking system call that thread was in is restarted (poll and select
    /// too: the kernel restarts them when no signal handler runs), except those Linux never
    /// restarts after a stop (epoll_wait, epoll_pwait, semop, semtimedop, sigtimedwait,
    /// sigwaitinfo, socket calls with SO_RCVTIMEO or SO_SNDTIMEO: signal(7), "Interruption of
    /// system calls and library functions by stop signals"), which return EINTR there; a
    /// program that does not retry on EINTR sees an error. While pages are sent, a target
    /// that writes faster than they go is slowed by stopping it (SIGSTOP/SIGCONT, --throttle
    /// duty) unless --throttle none; the final round runs with it stopped. A target someone else has stopped just before the
    /// send stops it (for the final round, or a pause before it) is left stopped, whether it
    /// was stopped before the send or during it; one stopped before the send and continued
    /// during it is the send's to continue, as if it had been running. Ctrl-C or SIGTERM leave
    /// it running (or stopped, if someone else had stopped it before the send; not yet one
    /// stopped during it, nor one stopped while the throttle runs), with no fd of ours and not
    /// traced, also during the attach. A process whose memory another process shares (a vfork
    /// child before its exec, its parent, a process made with clone(CLONE_VM)) is refused:
    /// stopping it could not stop the other's writes.
    Send(send::SendArgs),
    /// Receive a `precopy send` stream into a checkpoint image.
    Recv(send::RecvArgs),
    /// Measure a running process's exact dirty rate over several interval lengths.
    Rate(rate::RateArgs),
    /// The demo's source process (started by `precopy demo`).
    #[command(name = "__demo-source", hide = true)]
    DemoSource(demo::SourceArgs),
    /// The demo's destination process (started by `precopy demo`).
    #[command(name = "__demo-dest", hide = true)]
    DemoDest(demo::DestArgs),
    /// A multi-threaded writer for the attach tests and benchmarks.
    #[command(name = "__target", hide = true)]
    Target(target_fixture::Args),
    /// The watchdog `precopy send` starts beside itself (continues the target if the send dies).
    #[command(name = "__guard", hide = true)]
    Guard(guard::Args),
    /// The destination VMM process of `precopy demo --vm`.
    #[command(name = "__vm-dest", hide = true)]
    VmDest(demo::VmDestArgs),
}

impl Command {
    /// Whether the command's report (or output) goes to stdout: every command a user runs, not
    /// the processes `precopy` starts for itself.
    fn writes_report(&self) -> bool {
        !matches!(
            self,
            Command::DemoSource(_)
                | Command::DemoDest(_)
                | Command::Target(_)
                | Command::Guard(_)
                | Command::VmDest(_)
        )
    }
}

/// Gives clap's "the argument A cannot be used with B" the fix it lacks, as a `tip:` line: which
/// flag to leave out.
fn add_conflict_fix(e: &mut clap::Error) {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::ArgumentConflict {
        return;
    }
    // "--threads <THREADS>" -> "--threads".
    let flag = |s: &str| s.split_whitespace().next().unwrap_or(s).to_string();
    let Some(ContextValue::String(given)) = e.get(ContextKind::InvalidArg) else {
        return;
    };
    let given = flag(given);
    let others: Vec<String> = match e.get(ContextKind::PriorArg) {
        Some(ContextValue::String(s)) => vec![flag(s)],
        Some(ContextValue::Strings(v)) => v.iter().map(|s| flag(s)).collect(),
        _ => Vec::new(),
    };
    let tip = if others.is_empty() || others.iter().all(|o| *o == given) {
        format!("give {given} once")
    } else {
        format!(
            "leave out {given} or {}: they do not go together",
            others.join(" and ")
        )
    };
    e.insert(
        ContextKind::Suggested,
        ContextValue::StyledStrs(vec![tip.into()]),
    );
}

/// clap's rendered usage error in one line, like every other refusal: its message, then its
/// tips and other notes, then the usage, `; `-separated, ending with where to look
/// (`see --help`); without the `error: ` prefix (the caller adds the usual one) and without
/// the closing "For more information, try '--help'." line.
fn one_line_usage(rendered: &str) -> String {
    let mut message = Vec::new();
    let mut usage = None;
    for line in rendered.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with("For more information") {
            continue;
        }
        match line.strip_prefix("Usage: ") {
            Some(u) => usage = Some(u),
            None => message.push(line.trim_start_matches("error: ")),
        }
    }
    // A line ending in ':' introduces the next ("... not provided:" then "--vm").
    let mut one = String::new();
    for m in &message {
        if !one.is_empty() {
            one.push_str(if one.ends_with(':') { " " } else { "; " });
        }
        one.push_str(m);
    }
    if let Some(u) = usage {
        one.push_str(&format!("; usage: {u}"));
    }
    one.push_str(" (see --help)");
    one
}

fn main() -> ExitCode {
    // A parent that blocked SIGINT/SIGTERM/SIGHUP (`demo` does, see `interrupt`) or ignored
    // SIGINT (a script's background job) passed that on: undo it, so Ctrl-C and SIGTERM work
    // here as anywhere.
    interrupt::unblock_inherited();
    // Colour only for a terminal: a log file or a pipe gets plain text.
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PRECOPY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // Whether the user asked for JSON, known even when the arguments do not parse.
    let json = std::env::args_os().any(|a| a == "--json");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        // `precopy` or `precopy image` alone: no mistake to name in one line, but the help
        // that lists the subcommands, as clap prints it (stderr, status 2); not squashed into
        // an error line.
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            crate::output::errln!("{}", e.render().to_string().trim_end());
            if json {
                output::print_json(
                    serde_json::Value::Null,
                    Some(&anyhow::anyhow!("a subcommand is required (see --help)")),
                );
            }
            return ExitCode::from(2);
        }
        Err(mut e) => {
            // clap's message names the flag and the value as typed; keep all of it (tips and
            // usage too), in one line with the same prefix as every other error.
            add_conflict_fix(&mut e);
            let detail = one_line_usage(&e.render().to_string());
            crate::output::errln!("precopy: error: {detail}");
            if json {
                output::print_json(serde_json::Value::Null, Some(&anyhow::anyhow!("{detail}")));
            }
            return ExitCode::from(2);
        }
    };
    // A stdout closed at the start (`>&-`) is `/dev/null` by now (Rust's runtime opened it
    // there): refuse before any work rather than lose the report without a word.
    if cli.command.writes_report() && precopy_sys::stdio::stdout_closed_at_start() {
        crate::output::errln!(
            "precopy: error: stdout is closed (>&-): the report this command writes there would \
             be lost; give it somewhere to go (>/dev/null to discard it)"
        );
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Probe(args) => probe::run(args),
        Command::Demo(args) => demo::run(*args),
        Command::Bench(args) => bench::run(args),
        Command::Image(args) => image::run(args),
        Command::AttachBench(args) => attach_bench::run(args),
        Command::Send(args) => send::run_send(args),
        Command::Recv(args) => send::run_recv(args),
        Command::Rate(args) => rate::run(args),
        Command::DemoSource(args) => demo::run_source(args),
        Command::DemoDest(args) => demo::run_dest(args),
        Command::VmDest(args) => demo::run_vm_dest(args),
        Command::Target(args) => target_fixture::run(args),
        Command::Guard(args) => guard::run(args),
    };
    outcome(result, json)
}

/// The exit status of a command's `result`; an error is printed once (and as the JSON object
/// if `json`).
fn outcome(result: anyhow::Result<ExitCode>, json: bool) -> ExitCode {
    match result {
        Ok(code) => code,
        // A reader of our stdout that stopped early (`| head`) ends the process quietly where
        // the write failed (`output::stdout_failed`); an EPIPE that comes back as an error is a
        // peer's socket or pipe (a destination that went away), a failure like any other.
        Err(e) if e.is::<output::Reported>() || e.is::<output::ReportedUsage>() => {
            ExitCode::from(output::exit_code(&e))
        }
        Err(e) => {
            output::print_error(&e);
            if json {
                output::print_json(serde_json::Value::Null, Some(&e));
            }
            // A refused flag is a usage error, like clap's: 2; anything else 1.
            ExitCode::from(output::exit_code(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer's socket that went away (EPIPE) anywhere in an error's chain is a failure: it
    /// once ended a failed demo with status 0 and nothing printed.
    #[test]
    fn a_peers_broken_pipe_is_a_failure() {
        let e = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            .context("sending the handshake");
        assert_eq!(outcome(Err(e), false), ExitCode::from(1));
        assert_eq!(outcome(Ok(ExitCode::SUCCESS), false), ExitCode::SUCCESS);
    }
}
