//! Command-line options every service shares (clap, with env fallbacks and defaults shown in
//! `--help`). Values are checked while parsing, so bad config exits with one clear line before
//! any port is bound.

use std::ffi::OsString;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;

/// The value parsers of durations and positive numbers are the model's, shared with the
/// simulator (which has no I/O): every option of evgrid reads them the same way.
pub use evgrid_model::units::{
    SERVICE_DURATIONS, parse_duration, parse_duration_in, parse_positive, parse_positive_duration,
};

/// Every evgrid environment variable is `EVGRID_` and its option's name, except this one:
/// `NATS_URL` is what nats.go, the `nats` CLI and most NATS clients read, so one variable
/// points every tool at the same server.
pub const NATS_URL_ENV: &str = "NATS_URL";
/// Default NATS URL when neither `--nats-url` nor `NATS_URL` is given: a local server on the
/// standard port.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// `--log-format`; defaults to text, for the person at the terminal.
pub const LOG_FORMAT_ENV: &str = "EVGRID_LOG_FORMAT";
/// `--listen` of every service (each has its own default port, in its `main.rs`).
pub const LISTEN_ENV: &str = "EVGRID_LISTEN";

/// `--replicas`: how many servers of a cluster keep each stream, the state bucket and each
/// durable consumer.
pub const REPLICAS_ENV: &str = "EVGRID_REPLICAS";
/// One copy: what a single nats-server can hold. A cluster asks for more explicitly (3 is the
/// usual choice: one node may fail without losing an acknowledged write).
pub const DEFAULT_REPLICAS: usize = 1;
/// JetStream's own bound on replicas.
pub const MAX_REPLICAS: usize = 5;

#[derive(clap::Args, Debug, Clone)]
pub struct NatsArgs {
    /// NATS server URL, or several comma-separated (the servers of one cluster: the client
    /// connects to any and reconnects to any). JetStream enabled, nats-server 2.10 or newer.
    #[arg(long, env = NATS_URL_ENV, default_value = DEFAULT_NATS_URL, value_parser = parse_nats_url)]
    pub nats_url: String,
    /// Replicas of every stream, the request-state bucket and every durable consumer (1..=5).
    /// More than 1 needs a clustered NATS with at least that many servers. A changed value rolls
    /// forward at start where the server allows it.
    #[arg(long, env = REPLICAS_ENV, default_value_t = DEFAULT_REPLICAS, value_parser = parse_replicas)]
    pub replicas: usize,
    /// Create and update the streams and the request-state bucket at start (`true`), or only
    /// check that they exist, waiting for them (`false`: for a NATS user that may not manage
    /// streams; in evgrid's roles only the dispatcher and the operator may).
    #[arg(long, env = "EVGRID_MANAGE_STREAMS", default_value_t = true,
          action = clap::ArgAction::Set, value_name = "true|false")]
    pub manage_streams: bool,
    #[command(flatten)]
    pub auth: NatsAuth,
}

impl NatsArgs {
    /// The defaults, talking to `nats_url` (tests, embedders).
    pub fn new(nats_url: impl Into<String>) -> Self {
        Self {
            nats_url: nats_url.into(),
            replicas: DEFAULT_REPLICAS,
            manage_streams: true,
            auth: NatsAuth::default(),
        }
    }
}

/// Who a client is to NATS, and how it checks the server: the server's own authorization
/// (users with permissions, or decentralized JWT credentials) and TLS, nothing home-made
/// (docs/security.md). Files are read and checked while the options are parsed.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct NatsAuth {
    /// NATS user, with --nats-password or --nats-password-file.
    #[arg(
        long,
        env = "EVGRID_NATS_USER",
        requires = "nats_password_given",
        help_heading = "NATS credentials"
    )]
    pub nats_user: Option<String>,
    /// NATS password. A command line is visible to every user of the machine: prefer the
    /// variable or --nats-password-file.
    #[arg(long, env = "EVGRID_NATS_PASSWORD", hide_env_values = true, requires = "nats_user",
          group = "nats_password_given", value_parser = parse_secret,
          help_heading = "NATS credentials")]
    pub nats_password: Option<Secret>,
    /// File whose first line is the NATS password (a mounted secret).
    #[arg(long, env = "EVGRID_NATS_PASSWORD_FILE", value_name = "FILE", requires = "nats_user",
          group = "nats_password_given", value_parser = read_secret_file,
          help_heading = "NATS credentials")]
    pub nats_password_file: Option<Secret>,
    /// NATS credentials file (a user JWT and its nkey seed, as `nsc` writes them), for servers
    /// with decentralized authorization.
    #[arg(long, env = "EVGRID_NATS_CREDS", value_name = "FILE", conflicts_with = "nats_user",
          value_parser = readable_file, help_heading = "NATS credentials")]
    pub nats_creds: Option<PathBuf>,
    /// CA certificate (PEM) that signed the NATS server's certificate: connect over TLS and
    /// verify the server with it.
    #[arg(long, env = "EVGRID_NATS_TLS_CA", value_name = "FILE", value_parser = readable_file,
          help_heading = "NATS credentials")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for servers that verify their clients (with --nats-tls-key).
    #[arg(long, env = "EVGRID_NATS_TLS_CERT", value_name = "FILE", requires = "nats_tls_key",
          value_parser = readable_file, help_heading = "NATS credentials")]
    pub nats_tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "EVGRID_NATS_TLS_KEY", value_name = "FILE", requires = "nats_tls_cert",
          value_parser = readable_file, help_heading = "NATS credentials")]
    pub nats_tls_key: Option<PathBuf>,
    /// Subject prefix of this client's replies. Default: `_INBOX_<user>` with --nats-user (what
    /// evgrid's roles allow each user to subscribe to, so no one reads another's replies),
    /// else `_INBOX`.
    #[arg(
        long,
        env = "EVGRID_NATS_INBOX_PREFIX",
        value_name = "PREFIX",
        help_heading = "NATS credentials"
    )]
    pub nats_inbox_prefix: Option<String>,
}

impl NatsAuth {
    /// A user and password (tests, embedders).
    pub fn user(user: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            nats_user: Some(user.into()),
            nats_password: Some(Secret(password.into())),
            ..Self::default()
        }
    }

    /// The prefix of this client's reply subjects: [`Self::nats_inbox_prefix`], else
    /// `_INBOX_<user>` with a user, else NATS's `_INBOX`.
    pub fn inbox_prefix(&self) -> String {
        match (&self.nats_inbox_prefix, &self.nats_user) {
            (Some(prefix), _) => prefix.clone(),
            (None, Some(user)) => inbox_prefix_of(user),
            (None, None) => "_INBOX".to_owned(),
        }
    }

    /// The password given, from the option or its file.
    pub fn password(&self) -> Option<&str> {
        self.nats_password
            .as_ref()
            .or(self.nats_password_file.as_ref())
            .map(Secret::expose)
    }
}

/// The reply subject prefix of NATS user `user`, as evgrid's roles allow it.
pub fn inbox_prefix_of(user: &str) -> String {
    format!("_INBOX_{user}")
}

/// A secret from the command line, the environment or a file: never printed (its `Debug` is
/// `"***"`), so a logged config does not leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// A secret given as is: anything but empty.
pub fn parse_secret(s: &str) -> Result<Secret, String> {
    if s.is_empty() {
        return Err("empty".into());
    }
    Ok(Secret(s.to_owned()))
}

/// Reads a secret file: its first line, without the line end.
pub fn read_secret_file(path: &str) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path:?}: {e}"))?;
    let line = text.lines().next().unwrap_or_default();
    if line.is_empty() {
        return Err(format!("{path:?} is empty (its first line is the secret)"));
    }
    Ok(Secret(line.to_owned()))
}

/// A file that exists and can be read now (checked at start, not at the first reconnect).
fn readable_file(path: &str) -> Result<PathBuf, String> {
    std::fs::File::open(path).map_err(|e| format!("cannot read {path:?}: {e}"))?;
    Ok(PathBuf::from(path))
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
    #[arg(long, env = LOG_FORMAT_ENV, value_enum, default_value_t = LogFormat::Text)]
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

/// Checks that a NATS URL, or a comma-separated list of them, is one the client can use
/// (`nats://host:port`, `host:port`, `tls://…`). A bad entry is named.
pub fn parse_nats_url(s: &str) -> Result<String, String> {
    nats_servers(s).map(|_| s.to_owned())
}

/// The servers of a `--nats-url` value: one URL, or several separated by commas (blanks around
/// each are ignored). Errors name the entry that is not a NATS URL.
pub fn nats_servers(s: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    let entries: Vec<&str> = s.split(',').map(str::trim).collect();
    let many = entries.len() > 1;
    entries
        .into_iter()
        .map(|entry| {
            if entry.is_empty() {
                return Err(format!(
                    "empty server in {s:?} (e.g. nats://127.0.0.1:4222,nats://127.0.0.1:4223)"
                ));
            }
            async_nats::ServerAddr::from_str(entry).map_err(|e| {
                let which = if many {
                    format!("{entry:?} in {s:?} is not a NATS URL")
                } else {
                    format!("{entry:?} is not a NATS URL")
                };
                format!("{which} (e.g. nats://127.0.0.1:4222): {e}")
            })
        })
        .collect()
}

/// Parses `--replicas`: 1 to [`MAX_REPLICAS`].
pub fn parse_replicas(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_REPLICAS).contains(&n) => Ok(n),
        _ => Err(format!(
            "expected a number of replicas from 1 to {MAX_REPLICAS} (JetStream's bound), got {s:?}"
        )),
    }
}

/// An environment variable renamed to the `EVGRID_` convention. The old name is still read for
/// one release, with a warning, when neither the option nor the new name is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenamedEnv {
    /// The name read until now, e.g. `SUBSTATION_ID`.
    pub old: &'static str,
    /// The name from now on, e.g. `EVGRID_SUBSTATION_ID`.
    pub new: &'static str,
    /// The long option both stand for, e.g. `--id`.
    pub flag: &'static str,
}

/// Passes the value of each old environment variable as its option (`--flag=value`, appended to
/// `args`) when neither the option nor the new variable is given: the environment cannot be
/// changed without `unsafe` (edition 2024), and clap then reports a bad value against the
/// option as usual. Returns the arguments and one warning per old variable that is set.
pub fn apply_renamed_env(
    mut args: Vec<OsString>,
    renamed: &[RenamedEnv],
    var: impl Fn(&str) -> Option<OsString>,
) -> (Vec<OsString>, Vec<String>) {
    let mut warnings = Vec::new();
    for r in renamed {
        let Some(value) = var(r.old) else { continue };
        let given = args.iter().skip(1).take_while(|a| *a != "--").any(|a| {
            a.to_str().is_some_and(|a| {
                a == r.flag || a.strip_prefix(r.flag).is_some_and(|v| v.starts_with('='))
            })
        });
        let used = !given && var(r.new).is_none();
        if used {
            let mut arg = OsString::from(format!("{}=", r.flag));
            arg.push(value);
            args.push(arg);
        }
        warnings.push(format!(
            "warning: {} is deprecated and read until the next release only: set {} instead{}",
            r.old,
            r.new,
            if used {
                String::new()
            } else {
                format!(" (ignored now: {} or {} is given)", r.flag, r.new)
            }
        ));
    }
    (args, warnings)
}

/// Parses the command line like `P::parse()`, except that bad config exits with one line
/// (clap's error without its usage hint) and status 2, before the caller binds anything.
/// `--help` and `--version` print as usual.
pub fn parse_or_exit<P: clap::Parser>() -> P {
    parse_or_exit_renamed(&[])
}

/// [`parse_or_exit`] that also reads the `renamed` environment variables under their old names
/// (see [`apply_renamed_env`]), printing each warning once on stderr.
pub fn parse_or_exit_renamed<P: clap::Parser>(renamed: &[RenamedEnv]) -> P {
    let (args, warnings) =
        apply_renamed_env(std::env::args_os().collect(), renamed, |name: &str| {
            std::env::var_os(name)
        });
    for warning in warnings {
        eprintln!("{warning}");
    }
    match P::try_parse_from(args) {
        Ok(parsed) => parsed,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let rendered = e.render().to_string();
            // The first paragraph, joined: a missing argument is named on the line after
            // "the following required arguments were not provided:".
            let line = rendered
                .lines()
                .map(str::trim)
                .skip_while(|l| l.is_empty())
                .take_while(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            if line.is_empty() {
                eprintln!("error: invalid arguments");
            } else {
                eprintln!("{line}");
            }
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        nats: NatsArgs,
    }

    fn parse(args: &[&str]) -> Result<NatsArgs, String> {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("evgrid").chain(args.iter().copied()))
            .map(|cli| cli.nats)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn nats_credentials_come_from_a_file_and_are_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "hunter2-long\nignored\n").unwrap();
        let file = file.to_str().unwrap();
        let args = parse(&["--nats-user", "ingest", "--nats-password-file", file]).unwrap();
        assert_eq!(args.auth.password(), Some("hunter2-long"));
        assert!(!format!("{args:?}").contains("hunter2"), "{args:?}");
        let args = parse(&["--nats-user", "ingest", "--nats-password", "hunter2-long"]).unwrap();
        assert!(!format!("{args:?}").contains("hunter2"), "{args:?}");

        // Each mistake is one line naming the option, at start.
        for (bad, names) in [
            (vec!["--nats-user", "ingest"], "--nats-password"),
            (vec!["--nats-password", "x"], "--nats-user"),
            (
                vec![
                    "--nats-user",
                    "a",
                    "--nats-password",
                    "x",
                    "--nats-password-file",
                    file,
                ],
                "--nats-password-file",
            ),
            (
                vec!["--nats-user", "a", "--nats-password-file", "/nonexistent"],
                "/nonexistent",
            ),
            (vec!["--nats-creds", "/nonexistent"], "/nonexistent"),
            (vec!["--nats-tls-cert", file], "--nats-tls-key"),
        ] {
            let err = parse(&bad).unwrap_err();
            assert!(err.contains(names), "{bad:?}: {err}");
        }
    }

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
    fn a_list_of_servers_connects_to_any() {
        let list = "nats://127.0.0.1:4222, nats://127.0.0.1:4223,127.0.0.1:4224";
        assert_eq!(parse_nats_url(list).unwrap(), list);
        let servers = nats_servers(list).unwrap();
        let ports: Vec<u16> = servers.iter().map(|s| s.port()).collect();
        assert_eq!(ports, [4222, 4223, 4224]);
    }

    #[test]
    fn a_bad_entry_in_a_list_is_named() {
        let err = parse_nats_url("nats://127.0.0.1:4222,http://[::1,nats://b:4222").unwrap_err();
        assert!(err.contains("\"http://[::1\" in"), "{err}");
        let err = parse_nats_url("nats://127.0.0.1:4222,,nats://b:4222").unwrap_err();
        assert!(err.starts_with("empty server in"), "{err}");
        let err = parse_nats_url("http://[::1").unwrap_err();
        assert!(
            err.starts_with("\"http://[::1\" is not a NATS URL"),
            "{err}"
        );
    }

    #[test]
    fn replicas_are_one_to_five() {
        assert_eq!(parse_replicas("1"), Ok(1));
        assert_eq!(parse_replicas("3"), Ok(3));
        assert_eq!(parse_replicas("5"), Ok(5));
        for bad in ["0", "6", "-1", "three", ""] {
            let err = parse_replicas(bad).unwrap_err();
            assert!(err.contains("from 1 to 5"), "{bad}: {err}");
        }
    }

    const RENAMED: &[RenamedEnv] = &[RenamedEnv {
        old: "SUBSTATION_ID",
        new: "EVGRID_SUBSTATION_ID",
        flag: "--id",
    }];

    fn renamed(args: &[&str], env: &[(&str, &str)]) -> (Vec<String>, usize) {
        let args = args.iter().map(OsString::from).collect();
        let var = |name: &str| {
            env.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        };
        let (args, warnings) = apply_renamed_env(args, RENAMED, var);
        let args = args.into_iter().map(|a| a.into_string().unwrap());
        (args.collect(), warnings.len())
    }

    #[test]
    fn an_old_env_name_stands_for_its_option_with_a_warning() {
        assert_eq!(
            renamed(&["bin"], &[("SUBSTATION_ID", "s1")]),
            (vec!["bin".into(), "--id=s1".into()], 1)
        );
        assert_eq!(
            renamed(&["bin", "--id", "s2"], &[("SUBSTATION_ID", "s1")]),
            (vec!["bin".into(), "--id".into(), "s2".into()], 1)
        );
        assert_eq!(
            renamed(&["bin", "--id=s2"], &[("SUBSTATION_ID", "s1")]),
            (vec!["bin".into(), "--id=s2".into()], 1)
        );
        let both = [("SUBSTATION_ID", "s1"), ("EVGRID_SUBSTATION_ID", "s3")];
        assert_eq!(renamed(&["bin"], &both), (vec!["bin".into()], 1));
        assert_eq!(
            renamed(&["bin", "--idle"], &[("SUBSTATION_ID", "s1")]),
            (vec!["bin".into(), "--idle".into(), "--id=s1".into()], 1)
        );
        assert_eq!(
            renamed(&["bin"], &[("EVGRID_SUBSTATION_ID", "s3")]),
            (vec!["bin".into()], 0)
        );
    }
}
