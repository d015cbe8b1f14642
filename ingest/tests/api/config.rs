//! The binary's configuration: bad values exit non-zero with one line before anything is bound;
//! `--help` shows every option with its environment variable.

use std::process::Output;

use crate::helpers::WAIT;

async fn ingest(args: &[&str]) -> Output {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_evgrid-ingest"))
        .args(args)
        .env_remove("NATS_URL")
        .env_remove("EVGRID_LISTEN")
        .env_remove("EVGRID_INGEST_RECENT_ACCEPTS")
        .env_remove("EVGRID_RECENT_ACCEPTS")
        .env_remove("EVGRID_LOG_FORMAT")
        .env_remove("EVGRID_REPLICAS")
        .env_remove("EVGRID_API_KEYS")
        .env_remove("EVGRID_INSECURE_NO_AUTH")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(WAIT, child)
        .await
        .expect("exits at once")
        .expect("runs")
}

#[tokio::test]
async fn bad_config_exits_non_zero_with_one_line() {
    for (args, names) in [
        (&["--listen", "nonsense"][..], "--listen"),
        (&["--nats-url", "http://[::1"][..], "--nats-url"),
        (
            &["--nats-url", "nats://127.0.0.1:4222,http://[::1"][..],
            "\"http://[::1\" in",
        ),
        (&["--replicas", "0"][..], "--replicas"),
        (&["--replicas", "6"][..], "from 1 to 5"),
        (&["--recent-accepts", "0"][..], "--recent-accepts"),
        (&["--log-format", "xml"][..], "--log-format"),
        (&[][..], "no API keys: give --api-keys FILE"),
        (
            &["--api-keys", "/nonexistent/keys"][..],
            "cannot read API keys file",
        ),
        (&["--api-keys", "/dev/null"][..], "no `secret` line"),
        (
            &["--insecure-no-auth", "--api-rate-limit", "0"][..],
            "--api-rate-limit",
        ),
    ] {
        let out = ingest(args).await;
        assert!(!out.status.success(), "{args:?} must fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line, got {stderr:?}");
        assert!(lines[0].contains(names), "{args:?}: {}", lines[0]);
    }
}

#[tokio::test]
async fn help_shows_every_option_with_its_environment_variable() {
    let out = ingest(&["--help"]).await;
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for (option, env) in [
        ("--listen", "EVGRID_LISTEN"),
        ("--nats-url", "NATS_URL"),
        ("--replicas", "EVGRID_REPLICAS"),
        ("--recent-accepts", "EVGRID_RECENT_ACCEPTS"),
        ("--log-format", "EVGRID_LOG_FORMAT"),
        ("--api-keys", "EVGRID_API_KEYS"),
        ("--insecure-no-auth", "EVGRID_INSECURE_NO_AUTH"),
        ("--api-rate-limit", "EVGRID_API_RATE_LIMIT"),
    ] {
        assert!(help.contains(option), "{option} missing:\n{help}");
        assert!(
            help.contains(&format!("env: {env}")),
            "{env} missing:\n{help}"
        );
    }
    assert!(
        help.contains("127.0.0.1:8080"),
        "default listen address shown"
    );
}

#[tokio::test]
async fn replicas_a_single_server_cannot_hold_stop_ingest_with_one_line() {
    let server = evgrid_test_support::NatsServer::start().unwrap();
    let out = ingest(&[
        "--nats-url",
        server.url(),
        "--replicas",
        "3",
        "--listen",
        "127.0.0.1:0",
        "--insecure-no-auth",
    ])
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.starts_with("evgrid-ingest: "))
        .unwrap_or_else(|| panic!("no error line in {stderr:?}"));
    assert!(
        line.contains("asked for 3 replicas of stream EV_REQUESTS, but the server refused: ")
            && line.contains("non-clustered"),
        "{line}"
    );
}
