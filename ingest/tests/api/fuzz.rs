//! The HTTP API fuzzed from docs/openapi.yaml by schemathesis (PyPI, installed by
//! scripts/install-test-deps): generated valid and invalid requests, every answer checked against
//! the document (status codes, content types, schemas, headers), no 5xx for bad input, valid data
//! accepted and invalid data rejected, and the documented links followed (POST, then GET the
//! request), and every operation refusing a missing or made-up API key. A real ingest on a real
//! nats-server.

use std::process::Command;

use evgrid_test_support::NatsServer;

use evgrid_ingest::auth::{Rate, Scope};

use crate::helpers::spawn_app_with_keys;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_failure_against_the_openapi_document() {
    let nats = NatsServer::start().expect("nats-server starts");
    // With an operator key, so that every operation is reachable; schemathesis also sends none
    // and made-up ones, and expects 401 then.
    let (app, keys) =
        spawn_app_with_keys(&nats, &[("fuzz", &[Scope::Operator], Rate::Unlimited)]).await;
    let authorization = format!("Authorization: Bearer {}", keys["fuzz"]);
    let api = format!("http://{}", app.addr);
    let tests = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/api");
    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml");
    // Its caches are written where it runs: not in the repository.
    let scratch = tempfile::tempdir().unwrap();
    let cwd = scratch.path().to_owned();
    let run = tokio::task::spawn_blocking(move || {
        Command::new(evgrid_test_support::tool("schemathesis"))
            .current_dir(cwd)
            .args(["run", spec, "--url", &api, "--checks", "all"])
            .args(["--header", &authorization])
            // A fixed seed: a failure reproduces, and CI runs the same cases every time.
            .args(["--max-examples", "60", "--seed", "20261126"])
            .arg("--no-color")
            .env("SCHEMATHESIS_HOOKS", "schemathesis_hooks")
            .env("PYTHONPATH", tests)
            .output()
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| {
        panic!("cannot run schemathesis ({e}): run scripts/install-test-deps, which installs it")
    });
    let report = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "schemathesis found failures:\n{report}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(report.contains("No issues found"), "{report}");
    app.stopped().await.unwrap();
}
