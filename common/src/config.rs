//! Command-line options every service shares (clap, with env fallbacks and defaults shown in
//! `--help`). Values are checked while parsing, so bad config exits with one clear line before
//! any port is bound.

use std::net::{SocketAddr, ToSocketAddrs};
use std::str::FromStr;

/// Default NATS URL when neither `--nats-url` nor `NATS_URL` is given.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

#[derive(clap::Args, Debug, Clone)]
pub struct NatsArgs {
    /// NATS server URL (JetStream enabled, nats-server 2.10 or newer).
    #[arg(long, env = "NATS_URL", default_value = DEFAULT_NATS_URL, value_parser = parse_nats_url)]
    pub nats_url: String,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(clap::Args, Debug, Clone)]
pub struct LogArgs {
    /// Log format. The level is set with RUST_LOG (default: info).
    #[arg(long, env = "EVGRID_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Parses `HOST:PORT` (a name such as `localhost:8080` is resolved once, now).
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = SocketAddr::from_str(s) {
        return Ok(addr);
    }
    s.to_socket_addrs()
        .map_err(|e| format!("expected HOST:PORT, e.g. 127.0.0.1:8080 ({e})"))?
        .next()
        .ok_or_else(|| format!("{s} resolves to no address"))
}

/// Checks that a NATS URL is one the client can use (`nats://host:port`, `host:port`, `tls://…`).
pub fn parse_nats_url(s: &str) -> Result<String, String> {
    async_nats::ServerAddr::from_str(s)
        .map(|_| s.to_owned())
        .map_err(|e| format!("not a NATS URL (e.g. nats://127.0.0.1:4222): {e}"))
}

/// A positive, finite number (capacities, time scales).
pub fn parse_positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("expected a number greater than 0, got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen("127.0.0.1:8080").unwrap().port(), 8080);
        assert!(parse_listen("localhost:9000").is_ok());
        assert!(parse_listen("8080").is_err());
        assert!(parse_listen("127.0.0.1:99999").is_err());
    }

    #[test]
    fn nats_urls() {
        assert!(parse_nats_url("nats://127.0.0.1:4222").is_ok());
        assert!(parse_nats_url("nats:4222").is_ok());
        assert!(parse_nats_url("http://[::1").is_err());
    }

    #[test]
    fn positive_numbers() {
        assert_eq!(parse_positive("2.5"), Ok(2.5));
        assert!(parse_positive("0").is_err());
        assert!(parse_positive("-3").is_err());
        assert!(parse_positive("inf").is_err());
        assert!(parse_positive("ten").is_err());
    }
}
