//! Line-oriented logging to stderr (journald collects it), as text or JSON.
//!
//! Deliberately tiny: one global format and level set at start-up. Secrets are never passed
//! in: callers log ids, routes and digests only.

use std::io::Write;
use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

struct Settings {
    format: Format,
    verbosity: u8,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

pub fn init(format: Format, verbosity: u8) {
    let _ = SETTINGS.set(Settings { format, verbosity });
}

fn settings() -> &'static Settings {
    SETTINGS.get_or_init(|| Settings {
        format: Format::Text,
        verbosity: 1,
    })
}

/// Writes one event. `fields` are key/value pairs rendered as `k=v` or JSON members.
pub fn event(level: &str, min_verbosity: u8, msg: &str, fields: &[(&str, String)]) {
    let s = settings();
    if s.verbosity < min_verbosity {
        return;
    }
    let now = crate::clock::Timestamp::now().rfc3339();
    let line = match s.format {
        Format::Json => {
            let mut m = serde_json::Map::new();
            m.insert("ts".into(), now.into());
            m.insert("level".into(), level.into());
            m.insert("msg".into(), msg.into());
            for (k, v) in fields {
                m.insert((*k).into(), v.clone().into());
            }
            serde_json::Value::Object(m).to_string()
        }
        Format::Text => {
            let mut line = format!("{now} {level} {msg}");
            for (k, v) in fields {
                if v.contains(' ') || v.is_empty() {
                    line.push_str(&format!(" {k}={v:?}"));
                } else {
                    line.push_str(&format!(" {k}={v}"));
                }
            }
            line
        }
    };
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

pub fn info(msg: &str) {
    event("info", 1, msg, &[]);
}

pub fn warn(msg: &str) {
    event("warn", 0, msg, &[]);
}

pub fn error(msg: &str) {
    event("error", 0, msg, &[]);
}
