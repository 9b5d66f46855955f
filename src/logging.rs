//! Logging that cooperates with the progress bar: while a bar is shown, every log line is
//! written with the bar suspended, so lines and bar never garble each other.

use std::io::Write;
use std::sync::Mutex;

static BAR: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);
static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `-q`: only errors are logged, and no progress bar or run summary is shown.
pub fn quiet() -> bool {
    QUIET.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether log lines are JSON objects (`--log-format json`).
pub fn json() -> bool {
    JSON.load(std::sync::atomic::Ordering::Relaxed)
}

/// One of the command's result lines (the run's summary, finalize's outcome): on stdout, or with
/// `--log-format json` as an info event among the log lines, so that a log collector reads every
/// line as JSON.
pub fn result_line(line: &str) {
    if json() {
        say(tracing::Level::INFO, line)
    } else {
        // A closed stdout (`| head`) loses the line, not the command's outcome.
        let _ = writeln!(std::io::stdout().lock(), "{line}");
    }
}

/// A message of the command itself on stderr (its error and causes, the count of failed
/// samples, an interruption): as it is, or with `--log-format json` as a log event of `level`,
/// so that every line on stderr is a JSON object (whatever `-q` or RUST_LOG filter).
pub fn say(level: tracing::Level, message: &str) {
    if !json() {
        let mut err = BarAwareStderr;
        let _ = writeln!(err, "{message}");
        return;
    }
    // Written directly, in the log lines' shape, so that no RUST_LOG filter can hide the
    // command's own error.
    let line = serde_json::json!({
        "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
        "level": level.as_str(),
        "message": message,
        "target": "saliency_audit",
    });
    let mut err = BarAwareStderr;
    let _ = writeln!(err, "{line}");
}

/// Shows (Some) or removes (None) the progress bar that log lines suspend.
pub fn set_progress_bar(bar: Option<indicatif::ProgressBar>) {
    *BAR.lock().unwrap_or_else(|e| e.into_inner()) = bar;
}

/// stderr, suspending the progress bar for each write.
pub struct BarAwareStderr;

impl Write for BarAwareStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = BAR.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match bar {
            Some(b) => b.suspend(|| std::io::stderr().write_all(buf)).map(|_| buf.len()),
            None => std::io::stderr().write_all(buf).map(|_| buf.len()),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the tracing subscriber: `RUST_LOG` wins, else -v/-q pick the level.
pub fn init(verbose: u8, quiet: bool, format: LogFormat) {
    QUIET.store(quiet, std::sync::atomic::Ordering::Relaxed);
    JSON.store(format == LogFormat::Json, std::sync::atomic::Ordering::Relaxed);
    let default = if quiet {
        "error"
    } else {
        match verbose {
            0 => "info",
            1 => "debug",
            _ => "trace",
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: a log file (a pod's log, a Slurm output file) gets plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(|| BarAwareStderr).with_ansi(colour);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
