//! One shape for every command's outcome.
//!
//! - Errors go to stderr once, as a chain: `precopy: error: outer: cause: root cause`.
//! - With `--json`, stdout holds exactly one JSON object, on success and on failure. Every such
//!   object has `"ok"` (bool) and `"error"` (`null`, or `{"message": the whole chain as one
//!   line, "chain": [outer, ..., root cause]}`), whatever the subcommand; the rest is the
//!   subcommand's own report.

use std::io::Write;

use serde_json::{Map, Value, json};

/// The `"error"` object for `e`.
pub fn error_value(e: &anyhow::Error) -> Value {
    json!({
        "message": format!("{e:#}"),
        "chain": e.chain().map(|c| c.to_string()).collect::<Vec<_>>(),
    })
}

/// Prints `e` to stderr once, as a chain.
pub fn print_error(e: &anyhow::Error) {
    eprintln!("precopy: error: {e:#}");
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
    // A reader that went away (`| head`) is not worth a panic.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", Value::Object(obj)).and_then(|()| out.flush());
}

/// A failure already reported in full (stderr, and the JSON object if asked for): `main`
/// only sets the exit code.
#[derive(Debug)]
pub struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("failure already reported")
    }
}

impl std::error::Error for Reported {}

/// Reports `e` (stderr, plus the JSON object with `report`'s fields when `json`) and returns
/// the error `main` treats as already reported.
pub fn fail(json: bool, report: Value, e: anyhow::Error) -> anyhow::Error {
    print_error(&e);
    if json {
        print_json(report, Some(&e));
    }
    anyhow::Error::new(Reported)
}
