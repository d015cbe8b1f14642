//! Attack 12 of issue #11: request heads sent half and held open. Each connection is closed
//! once its header is late, and the connection limit keeps the process within its file
//! descriptors, so `/healthz` answers throughout.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{config, spawn_app_with};

#[tokio::test]
async fn half_sent_request_heads_are_cut_off_and_healthz_still_answers() {
    let app = spawn_app_with(evgrid_ingest::Config {
        http_header_timeout: Duration::from_millis(500),
        http_max_connections: 16,
        // No NATS needed: /healthz answers without it.
        ..config("nats://127.0.0.1:1")
    })
    .await;
    let mut heads = Vec::new();
    for _ in 0..64 {
        let mut stream = TcpStream::connect(app.addr).await.unwrap();
        let _ = stream
            .write_all(b"POST /v1/charge-requests HTTP/1.1\r\nHost: x\r\n")
            .await;
        heads.push(stream);
    }
    let healthz = tokio::time::timeout(Duration::from_secs(5), app.get("/healthz"))
        .await
        .expect("/healthz answers within 5 s of 64 held heads");
    assert_eq!(healthz.status, 200);
    for mut stream in heads {
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
            .await
            .expect("each held head is closed within 10 s");
    }
}
