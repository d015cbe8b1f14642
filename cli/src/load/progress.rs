//! The progress bar of `evgrid load` on a terminal (stderr): requests sent, accepted and, with
//! `--wait-complete`, completed at the end of the pipeline, and the current acceptance rate.
//! Nothing is drawn when stderr is not a terminal, so logs and pipes stay clean.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::follow::Tracker;
use super::stats::Recorder;

/// How often the bar is redrawn (and the current rate measured).
const TICK: Duration = Duration::from_millis(250);

/// A running progress bar; [`Progress::finish`] clears it.
#[derive(Debug)]
pub struct Progress {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// Starts drawing for a run of `total` requests, if `wanted` and stderr is a terminal.
    pub fn start(
        total: u64,
        wanted: bool,
        recorder: Arc<Recorder>,
        tracker: Option<Arc<Tracker>>,
    ) -> Self {
        let stop = CancellationToken::new();
        if !wanted || !std::io::stderr().is_terminal() {
            return Self { stop, task: None };
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {pos}/{len} {msg}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let (mut last_accepted, mut last_at) = (0, Instant::now());
            loop {
                tokio::select! {
                    _ = stopped.cancelled() => break,
                    _ = tokio::time::sleep(TICK) => {}
                }
                let (sent, accepted) = (recorder.sent_count(), recorder.accepted_count());
                let now = Instant::now();
                let rate = (accepted - last_accepted) as f64 / (now - last_at).as_secs_f64();
                (last_accepted, last_at) = (accepted, now);
                let completed = tracker
                    .as_ref()
                    .map(|t| format!(" completed {}", t.completed()))
                    .unwrap_or_default();
                bar.set_message(format!(
                    "sent {sent} accepted {accepted}{completed} | {rate:.0} req/s"
                ));
                bar.set_position(sent);
            }
            bar.finish_and_clear();
        });
        Self {
            stop,
            task: Some(task),
        }
    }

    /// Clears the bar.
    pub async fn finish(self) {
        self.stop.cancel();
        if let Some(task) = self.task {
            let _ = task.await;
        }
    }
}
