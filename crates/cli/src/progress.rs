//! The progress display of long commands, in the spirit of QEMU's `query-migrate`: what is being
//! done and how far it is, never a silent screen for more than a moment.
//!
//! Three modes: a one-line bar redrawn in place (stderr is a terminal), one plain line per update
//! at most once a second plus one line at the start and end of every phase (stderr is a file or
//! a pipe, or `--progress lines`), or nothing (`--json`, `--progress none`).

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// A bar on a terminal, plain lines otherwise.
    Auto,
    /// A line redrawn in place.
    Bar,
    /// One line per update (at most one a second) and per phase.
    Lines,
    /// Nothing.
    None,
}

#[derive(Debug)]
enum Out {
    Bar(ProgressBar),
    Lines {
        last: Option<Instant>,
        start: Instant,
    },
    Hidden,
}

/// A progress display, shared between threads.
#[derive(Debug, Clone)]
pub struct Progress {
    out: Arc<Mutex<Out>>,
    /// The last phase and the last update, shown or not (for an interrupted run's report).
    last: Arc<Mutex<(String, String)>>,
}

/// Least time between two plain lines of the same phase.
const LINE_INTERVAL: Duration = Duration::from_secs(1);

impl Progress {
    /// A display in `mode`; `--json` turns it off (stdout belongs to the JSON object, and a
    /// caller that parses it does not want stderr chatter either).
    pub fn new(mode: Mode, json: bool) -> Progress {
        let mode = match mode {
            Mode::Auto if json => Mode::None,
            Mode::Auto if std::io::stderr().is_terminal() => Mode::Bar,
            Mode::Auto => Mode::Lines,
            m => m,
        };
        let out = match mode {
            Mode::Bar => {
                let bar = ProgressBar::new_spinner();
                bar.set_style(
                    ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar.enable_steady_tick(Duration::from_millis(100));
                Out::Bar(bar)
            }
            Mode::Lines => Out::Lines {
                last: None,
                start: Instant::now(),
            },
            Mode::Auto | Mode::None => Out::Hidden,
        };
        Progress {
            out: Arc::new(Mutex::new(out)),
            last: Arc::default(),
        }
    }

    fn with(&self, f: impl FnOnce(&mut Out)) {
        if let Ok(mut out) = self.out.lock() {
            f(&mut out);
        }
    }

    /// A new phase begins (always shown).
    pub fn phase(&self, msg: impl Into<String>) {
        self.show(msg.into(), true);
    }

    /// How far the current phase is (a plain line at most once a second).
    pub fn update(&self, msg: impl Into<String>) {
        self.show(msg.into(), false);
    }

    /// The last phase begun and the last update of it (empty if none yet).
    pub fn last(&self) -> (String, String) {
        self.last.lock().map(|l| l.clone()).unwrap_or_default()
    }

    fn show(&self, msg: String, force: bool) {
        if let Ok(mut last) = self.last.lock() {
            if force {
                *last = (msg.clone(), String::new());
            } else {
                last.1.clone_from(&msg);
            }
        }
        self.with(|out| match out {
            Out::Bar(bar) => bar.set_message(msg),
            Out::Lines { last, start } => {
                if force || last.is_none_or(|t| t.elapsed() >= LINE_INTERVAL) {
                    *last = Some(Instant::now());
                    let mut err = std::io::stderr().lock();
                    let _ = writeln!(err, "[{:7.1} s] {msg}", start.elapsed().as_secs_f64());
                }
            }
            Out::Hidden => {}
        });
    }

    /// Clears the bar (plain lines stay).
    pub fn finish(&self) {
        self.with(|out| {
            if let Out::Bar(bar) = out {
                bar.finish_and_clear();
            }
        });
    }
}
