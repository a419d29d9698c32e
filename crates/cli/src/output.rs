//! One shape for every command's outcome.
//!
//! - Errors go to stderr once, as a chain: `precopy: error: outer: cause: root cause`.
//! - With `--json`, stdout holds exactly one JSON object, on success and on failure. Every such
//!   object has `"ok"` (bool) and `"error"` (`null`, or `{"message": the whole chain as one
//!   line, "chain": [outer, ..., root cause]}`), whatever the subcommand; the rest is the
//!   subcommand's own report.
//! - Reports go to stdout through [`outln!`](crate::output::outln): a reader that stops early
//!   (`precopy image info IMG | head -1`) ends this process quietly with status 0 instead of a
//!   panic; any other write failure is an error like the rest. A failure's JSON object (or
//!   text report: `demo`) that finds stdout gone is dropped, and the command keeps its
//!   failure's exit status. A stdout closed at the start (`>&-`) is refused by `main` before
//!   the command runs (`precopy_sys::stdio`): Rust's runtime makes it `/dev/null`, where a
//!   report would be lost without a word.
//! - Messages go to stderr through [`errln!`](crate::output::errln), never `eprintln!`: a
//!   closed stderr (`2>&-`, a reader that went away) loses the message, never panics (the lints
//!   `print_stdout` and `print_stderr` keep it that way).

use std::io::Write;

use serde_json::{Map, Value, json};

/// The `"error"` object for `e`.
pub fn error_value(e: &anyhow::Error) -> Value {
    json!({
        "message": format!("{e:#}"),
        "chain": e.chain().map(|c| c.to_string()).collect::<Vec<_>>(),
    })
}

/// Prints `e` to stderr once, as a chain: unless a signal came meanwhile and its report is
/// the one (then this never returns: `interrupt::defer_to_signal`).
pub fn print_error(e: &anyhow::Error) {
    crate::interrupt::defer_to_signal();
    print_error_now(e);
}

/// Prints `e` to stderr as a chain (the signal thread's own report).
pub fn print_error_now(e: &anyhow::Error) {
    err_write(format_args!("precopy: error: {e:#}"), true);
}

/// Prints one JSON object on stdout: `report`'s fields (an object, or nothing) with `"ok"`
/// and `"error"` set from `error`.
pub fn print_json(report: Value, error: Option<&anyhow::Error>) {
    let mut obj = match report {
        Value::Object(m) => m,
        Value::Null => Map::new(),
        other => {
            let mut m = Map::new();
            m.insert("report".into(), other);
            m
        }
    };
    obj.insert("ok".into(), Value::Bool(error.is_none()));
    obj.insert("error".into(), error.map_or(Value::Null, error_value));
    let text = Value::Object(obj);
    if error.is_some() {
        // A failure's object: a reader that went away must not turn the failure's exit
        // status into 0, so a failed write is ignored and the caller exits as it would.
        let _ = try_write(format_args!("{text}"), true);
    } else {
        line(format_args!("{text}"));
    }
}

/// Writes `args` and a newline to stdout (see [`outln!`]).
pub fn line(args: std::fmt::Arguments<'_>) {
    write(args, true);
}

/// Writes `args` to stdout, then a newline if `newline` (see [`outln!`] and [`out!`]).
pub fn write(args: std::fmt::Arguments<'_>, newline: bool) {
    if let Err(e) = try_write(args, newline) {
        stdout_failed(&e);
    }
}

/// Writes `args` (and a newline if `newline`) to stdout and flushes it.
pub fn try_write(args: std::fmt::Arguments<'_>, newline: bool) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    let nl: &[u8] = if newline { b"\n" } else { b"" };
    out.write_fmt(args)
        .and_then(|()| out.write_all(nl))
        .and_then(|()| out.flush())
}

/// Writes `args` (and a newline if `newline`) to stderr, ignoring failure: a closed stderr
/// (`2>&-`) or one whose reader went away loses the message, never the command (see
/// [`errln!`]).
pub fn err_write(args: std::fmt::Arguments<'_>, newline: bool) {
    let mut err = std::io::stderr().lock();
    let nl: &[u8] = if newline { b"\n" } else { b"" };
    let _ = err
        .write_fmt(args)
        .and_then(|()| err.write_all(nl))
        .and_then(|()| err.flush());
}

/// What a failed write to stdout does: a reader that went away (`EPIPE`) ends the process
/// quietly with status 0, as it would for `cat`; anything else (a full disk) is an error.
pub fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    err_write(format_args!("precopy: error: writing to stdout: {e}"), true);
    std::process::exit(1);
}

/// Whether `e` is a write to a reader that went away (`EPIPE`) somewhere in its chain.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

/// `println!` for reports: a closed stdout (`| head`) is a quiet exit, never a panic.
macro_rules! outln {
    () => { $crate::output::line(format_args!("")) };
    ($($t:tt)*) => { $crate::output::line(format_args!($($t)*)) };
}
pub(crate) use outln;

/// `eprintln!` that never panics: a failed write to stderr is ignored (see [`err_write`]).
macro_rules! errln {
    ($($t:tt)*) => { $crate::output::err_write(format_args!($($t)*), true) };
}
pub(crate) use errln;

/// `print!` for reports, like [`outln!`].
macro_rules! out {
    ($($t:tt)*) => { $crate::output::write(format_args!($($t)*), false) };
}
pub(crate) use out;

/// A failure already reported in full (stderr, and the JSON object if asked for): `main`
/// only sets the exit code, 1.
#[derive(Debug)]
pub struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("failure already reported")
    }
}

impl std::error::Error for Reported {}

/// A usage error (a refused flag) already reported in full: `main` exits with 2.
#[derive(Debug)]
pub struct ReportedUsage;

impl std::fmt::Display for ReportedUsage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("usage error already reported")
    }
}

impl std::error::Error for ReportedUsage {}

/// The exit status for `e`: 2 for a usage error ([`crate::args::Invalid`] anywhere in its
/// chain), as clap uses; 1 for a failure while running.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.is::<ReportedUsage>() || e.chain().any(|c| c.is::<crate::args::Invalid>()) {
        2
    } else {
        1
    }
}

/// Reports `e` (stderr, plus the JSON object with `report`'s fields when `json`) and returns
/// the error `main` treats as already reported.
pub fn fail(json: bool, report: Value, e: anyhow::Error) -> anyhow::Error {
    print_error(&e);
    if json {
        print_json(report, Some(&e));
    }
    if exit_code(&e) == 2 {
        anyhow::Error::new(ReportedUsage)
    } else {
        anyhow::Error::new(Reported)
    }
}
