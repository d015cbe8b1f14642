//! Log setup shared by every binary: `tracing` to stderr as text or JSON, level from `RUST_LOG`.
//! `evgrid up`, which also draws a live status line, can send its logs to a file instead and
//! keep only warnings and errors on the terminal.

use std::fs::File;
use std::io::{IsTerminal, Write};

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, fmt};

use crate::config::LogFormat;

fn env_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(format: LogFormat) {
    let builder = fmt()
        .with_env_filter(env_filter())
        .with_writer(std::io::stderr)
        // Colours only on a terminal: in a log file or journal they are escape codes, and every
        // span (one per request in the dispatcher) would pay for formatting them.
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

/// Installs the global subscriber of a process that draws a live line on the terminal: with a
/// `file`, every event at the `RUST_LOG` level (default info) goes there and only warnings and
/// errors to stderr; without, everything goes to stderr. On a terminal each stderr line first
/// clears the row, so a log line never runs into the live line (which is redrawn below it).
pub fn init_with_file(format: LogFormat, file: Option<File>) {
    let terminal = std::io::stderr().is_terminal();
    let stderr = layer(format, ClearLine { terminal }, terminal);
    let layers = match file {
        Some(file) => vec![
            layer(format, file, false).with_filter(env_filter()).boxed(),
            stderr.with_filter(LevelFilter::WARN).boxed(),
        ],
        None => vec![stderr.with_filter(env_filter()).boxed()],
    };
    let result = Registry::default().with(layers).try_init();
    if let Err(e) = result {
        eprintln!("logging not set up: {e}");
    }
}

fn layer<W>(format: LogFormat, writer: W, ansi: bool) -> Box<dyn Layer<Registry> + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = fmt::layer().with_writer(writer).with_ansi(ansi);
    match format {
        LogFormat::Text => layer.boxed(),
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
    }
}

/// Stderr that, on a terminal, clears the current row before each log line.
struct ClearLine {
    terminal: bool,
}

/// One log line's writer: the row is cleared before its first byte.
struct ClearLineWriter {
    clear: bool,
}

impl Write for ClearLineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut err = std::io::stderr().lock();
        if std::mem::take(&mut self.clear) {
            err.write_all(b"\r\x1b[2K")?;
        }
        err.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'w> MakeWriter<'w> for ClearLine {
    type Writer = ClearLineWriter;

    fn make_writer(&'w self) -> Self::Writer {
        ClearLineWriter {
            clear: self.terminal,
        }
    }
}

/// For tests: logs only when `TEST_LOG` is set, and never panics when called twice.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = fmt()
            .with_env_filter(env_filter())
            .with_test_writer()
            .try_init();
    }
}
