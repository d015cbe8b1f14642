//! The compact live line `evgrid up` prints: requests per second and each substation's load
//! against its capacity, from the same heartbeats the dispatcher routes on.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use evgrid_common::config::NatsAuth;
use evgrid_common::heartbeats;
use evgrid_common::streams;
use evgrid_model::liveness::Observed;
use tokio_util::sync::CancellationToken;

/// Prints the live line every 2 s (in place on a terminal) until `shutdown`.
pub async fn live_line(nats_url: String, auth: NatsAuth, shutdown: CancellationToken) {
    let Ok(nats) =
        evgrid_common::nats::connect(&nats_url, &auth, "evgrid-up-status", &shutdown).await
    else {
        return;
    };
    let grid: Arc<Mutex<BTreeMap<String, Observed>>> = Arc::default();
    let follower = {
        let grid = grid.clone();
        let nats = nats.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(heartbeats::follow(
            nats,
            shutdown,
            move |o| {
                grid.lock()
                    .expect("status map")
                    .insert(o.heartbeat.substation_id.clone(), o);
            },
            |_| {},
        ))
    };
    let terminal = std::io::stdout().is_terminal();
    let mut last: Option<(Instant, u64)> = None;
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let seq = match nats.js.get_stream(streams::REQUESTS).await {
            Ok(mut s) => s.info().await.map(|i| i.state.last_sequence).unwrap_or(0),
            Err(_) => continue,
        };
        let now = Instant::now();
        let rate = last.map_or(0.0, |(t, s)| {
            seq.saturating_sub(s) as f64 / now.duration_since(t).as_secs_f64()
        });
        last = Some((now, seq));
        let line = render(rate, &grid.lock().expect("status map"));
        let mut out = std::io::stdout().lock();
        if terminal {
            let _ = write!(out, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }
    if terminal {
        println!();
    }
    let _ = follower.await;
}

fn render(rate: f64, grid: &BTreeMap<String, Observed>) -> String {
    let now = Utc::now();
    let mut line = format!("{rate:>7.1} req/s");
    for (id, o) in grid {
        let hb = &o.heartbeat;
        let mark = if o.is_up(now) { "" } else { " (stale)" };
        line.push_str(&format!(
            " | {id} {:.0}/{:.0} kW {}+{}q{mark}",
            hb.load_kw, hb.capacity_kw, hb.active_sessions, hb.queued_sessions
        ));
    }
    line
}
