//! Durable consumers as the code defines them ([`crate::streams`]): created on a fresh server,
//! and rolled forward when the server's copy has drifted.
//!
//! One policy for every durable consumer evgrid owns: **update in place**, never delete and
//! recreate. A durable consumer's delivery and ack state is the pipeline's progress (which
//! requests were dispatched, which sessions a substation still holds); recreating it would
//! deliver the whole stream again. When the server refuses the update (a setting it cannot edit,
//! such as the ack policy), the consumer is used as it is, with a warning that says how to
//! replace it deliberately.

use async_nats::jetstream::consumer::{self, PullConsumer, pull};
use async_nats::jetstream::{self};

/// The durable consumer `desired` on `stream`: created when missing, updated when one of the
/// settings evgrid relies on differs.
pub async fn ensure(
    js: &jetstream::Context,
    stream: &str,
    desired: &pull::Config,
) -> Result<PullConsumer, async_nats::Error> {
    let name = desired
        .durable_name
        .clone()
        .ok_or("a durable consumer needs a name")?;
    let handle = js.get_stream_no_info(stream).await?;
    let consumer: PullConsumer = handle
        .get_or_create_consumer(&name, desired.clone())
        .await?;
    if !drifted(&consumer.cached_info().config, desired) {
        return Ok(consumer);
    }
    let replicas_before = consumer.cached_info().config.num_replicas;
    match handle.update_consumer(desired.clone()).await {
        Ok(updated) => {
            tracing::info!(
                consumer = %name,
                replicas = desired.num_replicas,
                replicas_before,
                "updated the consumer to the current definition"
            );
            Ok(updated)
        }
        Err(e) => {
            // One line that says what was asked and what the server answered.
            tracing::warn!(
                consumer = %name,
                replicas_asked = desired.num_replicas,
                replicas_now = replicas_before,
                error = %e,
                "cannot update the consumer to the current definition; using it as it is (delete it with `nats consumer rm {stream} {name}` while no service runs to have it recreated)"
            );
            Ok(consumer)
        }
    }
}

/// Whether the server's consumer differs from ours in a setting evgrid relies on. Fields the
/// server fills in itself (max_waiting…) are not compared; replicas are (`--replicas`), with 0,
/// "as the stream", counted as one.
pub fn drifted(current: &consumer::Config, desired: &pull::Config) -> bool {
    current.description != desired.description
        || current.filter_subject != desired.filter_subject
        || current.ack_policy != desired.ack_policy
        || current.ack_wait != desired.ack_wait
        || current.max_deliver != desired.max_deliver
        || current.max_ack_pending != desired.max_ack_pending
        || current.backoff != desired.backoff
        || current.num_replicas.max(1) != desired.num_replicas.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_settings_count_as_drift() {
        let desired = crate::streams::dispatcher_consumer(1024, 1);
        let mut current = consumer::Config {
            durable_name: desired.durable_name.clone(),
            description: desired.description.clone(),
            filter_subject: desired.filter_subject.clone(),
            ack_policy: desired.ack_policy,
            ack_wait: desired.ack_wait,
            max_deliver: desired.max_deliver,
            max_ack_pending: desired.max_ack_pending,
            backoff: desired.backoff.clone(),
            // Filled in by the server: not ours to compare.
            max_waiting: 512,
            num_replicas: 0,
            ..Default::default()
        };
        assert!(!drifted(&current, &desired));
        current.num_replicas = 3;
        assert!(drifted(&current, &desired));
        current.num_replicas = 1;
        current.max_ack_pending = 1000;
        assert!(drifted(&current, &desired));
    }
}
