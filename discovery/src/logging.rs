//! Logging of upsync-dns and upsync-sidecar: `tracing` to stderr, as text or JSON lines, the
//! filter from `RUST_LOG` when set, else the program's default.
use std::str::FromStr;

use serde::Deserialize;

/// `--log-format` / `log_format` of both programs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            o => Err(format!("log format `{o}`: use text or json")),
        }
    }
}

/// Installs the global subscriber: `RUST_LOG` when set and not empty, else `default_filter`
/// (a tracing filter such as `info` or `info,hickory_server=warn`). A filter that does not parse
/// is reported on stderr (naming `program`) and `info` is used.
#[cfg(feature = "logging")]
pub fn init(program: &str, format: LogFormat, default_filter: &str) {
    use std::io::IsTerminal;
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => f,
        _ => default_filter.to_string(),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("{program}: log filter `{filter}`: {e}; using `info`");
        tracing_subscriber::EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
