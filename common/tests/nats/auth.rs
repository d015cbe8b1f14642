//! Credentials and TLS against a real nats-server: the server's own authorization and TLS,
//! reached through `--nats-user`/`--nats-password` and `--nats-tls-ca` (docs/security.md).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use evgrid_common::config::NatsAuth;
use evgrid_common::nats::{self, NatsError};
use evgrid_common::streams::{self, Retention};
use evgrid_test_support::NatsServer;
use tokio_util::sync::CancellationToken;

const USERS: &str = r#"
authorization {
  users = [ { user: ingest, password: "s3cret-1" } ]
}
"#;

/// Connects as `auth`, bounded: a refusal must come back at once, not after retrying.
async fn try_connect(url: &str, auth: &NatsAuth) -> Result<nats::Nats, NatsError> {
    tokio::time::timeout(
        Duration::from_secs(10),
        nats::connect(url, auth, "evgrid-test", &CancellationToken::new()),
    )
    .await
    .expect("connected or refused within 10 s")
}

#[tokio::test]
async fn a_user_with_its_password_gets_jetstream_and_anyone_else_is_refused_at_once() {
    let server = NatsServer::start_configured(USERS).unwrap();
    let nats = try_connect(server.url(), &NatsAuth::user("ingest", "s3cret-1"))
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(30),
        streams::ensure_until_done(
            &nats.js,
            &Retention::default(),
            true,
            &CancellationToken::new(),
        ),
    )
    .await
    .unwrap()
    .unwrap();

    for (auth, who) in [
        (NatsAuth::user("ingest", "wrong"), "a wrong password"),
        (NatsAuth::user("nobody", "s3cret-1"), "an unknown user"),
        (NatsAuth::default(), "no credentials"),
    ] {
        let err = try_connect(server.url(), &auth).await.unwrap_err();
        assert!(matches!(err, NatsError::Refused { .. }), "{who}: {err:?}");
        assert!(err.to_string().contains("--nats-user"), "{who}: {err}");
    }
}

/// A CA, and a server certificate it signed for 127.0.0.1 and localhost: PEM texts of the CA
/// certificate, the server certificate and the server key.
fn certificates() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    // Distinct names: a certificate whose subject is its issuer's looks self-signed.
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "evgrid test CA");
    let ca = ca.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let mut server = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    server
        .distinguished_name
        .push(DnType::CommonName, "nats-server");
    server
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    let server = server.signed_by(&server_key, &ca, &ca_key).unwrap();
    (ca.pem(), server.pem(), server_key.serialize_pem())
}

#[tokio::test]
async fn tls_verifies_the_server_with_the_given_ca_and_refuses_it_without() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates();
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("ca.pem"), ca).unwrap();
    std::fs::write(path("server.pem"), cert).unwrap();
    std::fs::write(path("server-key.pem"), key).unwrap();

    let server = NatsServer::start_configured(&format!(
        "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n}}\n{USERS}",
        path("server.pem"),
        path("server-key.pem"),
    ))
    .unwrap();

    let trusted = NatsAuth {
        nats_tls_ca: Some(path("ca.pem")),
        ..NatsAuth::user("ingest", "s3cret-1")
    };
    let nats = try_connect(server.url(), &trusted).await.unwrap();
    assert!(nats.client.server_info().tls_required);

    // The same credentials without the CA: the server's certificate is not trusted.
    let err = try_connect(server.url(), &NatsAuth::user("ingest", "s3cret-1"))
        .await
        .unwrap_err();
    assert!(matches!(err, NatsError::Refused { .. }), "{err:?}");
    assert!(err.to_string().contains("--nats-tls-ca"), "{err}");
}
