//! `precopy __demo-dest`: the destination. Listens, announces `LISTENING <address>`, receives a
//! transfer into memory of its own, announces `RECEIVED <addr> <len> <checksum> <rounds> <pages>
//! <zero pages> <bytes> <state>` (`state`: the state blob in hex, `-` for none; or `FAILED
//! <message>`), then checks the state blob as the demo source's writer records against the
//! memory it received and announces `STATE ok`, `STATE none` or `STATE mismatch <why>`, and keeps
//! its memory until its stdin closes, so the driver can compare it with the source.

use super::writer;
use anyhow::{Context, Result};
use precopy_transfer::{Key, Listener, MemorySink, Receiver, ReceiverConfig};
use std::io::{Read, Write};
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct DestArgs {
    /// `tcp:HOST:PORT` or `unix:PATH`.
    #[arg(long)]
    listen: String,
    /// The shared key, in a file only this user can read; deleted once read.
    #[arg(long)]
    key_file: std::path::PathBuf,
    /// Seconds the sender may stay silent.
    #[arg(long, default_value_t = 60.0)]
    io_timeout: f64,
    /// Seconds to wait for the sender to come back after its connections broke.
    #[arg(long, default_value_t = 60.0)]
    resume_wait: f64,
    /// The demo that started this destination: killed with it (see the source's `--parent`).
    #[arg(long)]
    parent: Option<i32>,
}

fn announce(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

pub fn run(args: DestArgs) -> Result<ExitCode> {
    if let Some(parent) = args.parent {
        super::source::die_with(parent, "destination")?;
    }
    let listener = match args.listen.split_once(':') {
        Some(("tcp", addr)) => Listener::bind_tcp(addr),
        Some(("unix", path)) => Listener::bind_unix(path),
        _ => anyhow::bail!("--listen takes tcp:HOST:PORT or unix:PATH"),
    }
    .with_context(|| format!("listening on {}", args.listen))?;
    let key = Key::from_file(&args.key_file);
    let _ = std::fs::remove_file(&args.key_file);
    let config = ReceiverConfig {
        key: Some(key?),
        io_timeout: Some(std::time::Duration::from_secs_f64(args.io_timeout)),
        resume_wait: std::time::Duration::from_secs_f64(args.resume_wait),
        ..ReceiverConfig::default()
    };
    announce(&format!("LISTENING {}", listener.address()))?;
    let result = Receiver::accept(&listener, &config).and_then(|receiver| {
        let mut sink = MemorySink::new(receiver.layout().clone())?;
        // Connections that break while iterating: keep what arrived, let the sender resume.
        let report = receiver.run_resumable(&listener, &mut sink)?;
        Ok((sink, report))
    });
    let (sink, report) = match result {
        Ok(r) => r,
        Err(e) => {
            let mut msg = e.to_string();
            let mut cur = std::error::Error::source(&e);
            while let Some(c) = cur {
                msg.push_str(": ");
                msg.push_str(&c.to_string());
                cur = c.source();
            }
            announce(&format!("FAILED {msg}"))?;
            return Ok(ExitCode::FAILURE);
        }
    };
    let mem = sink.memory().context("the sink owns its memory")?;
    let state = match sink.state() {
        Some(s) if !s.is_empty() => s.iter().map(|b| format!("{b:02x}")).collect(),
        _ => "-".to_owned(),
    };
    announce(&format!(
        "RECEIVED {} {} {} {} {} {} {} {}",
        mem.as_ptr() as u64,
        mem.len(),
        report.checksum,
        report.rounds,
        report.pages,
        report.zero_pages,
        report.bytes,
        state
    ))?;
    // Restore the "registers": each writer's last write must be in the memory that came with
    // them.
    let check = match sink.state() {
        Some(s) if !s.is_empty() => writer::decode_state(s)
            .and_then(|writers| {
                writer::check_state(&writers, |offset| {
                    let at = usize::try_from(offset).ok()?;
                    Some(u64::from_ne_bytes(
                        mem.get(at..at.checked_add(8)?)?.try_into().ok()?,
                    ))
                })
            })
            .map_or_else(|why| format!("mismatch {why}"), |()| "ok".to_owned()),
        _ => "none".to_owned(),
    };
    announce(&format!("STATE {check}"))?;
    let mut buf = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut buf);
    drop(sink);
    Ok(ExitCode::SUCCESS)
}
