//! Who may do what on NATS: evgrid's roles and the publish and subscribe permissions each is
//! given, written out as a nats-server `authorization { users = [...] }` block. `evgrid up` and
//! operators' configs (`nats/`) are generated from here, so the permissions are the code's, next
//! to the subjects and streams they name (docs/security.md).
//!
//! Each service connects as its role's user; NATS refuses anything else with a permissions
//! violation before any evgrid code sees it. What a role may publish is what its job sends;
//! what it may subscribe to is its own replies (`_INBOX_<user>.>`: JetStream answers and
//! delivers there; clients with a user take that prefix by default) and nothing it does not
//! read. JetStream is reached through its API subjects, allowed per stream and, for durable
//! consumers, per consumer.

use evgrid_model::subjects;

use crate::config::inbox_prefix_of;
use crate::streams;

/// A role of the grid, and the NATS user of that name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The HTTP API: stores requests, reads and writes request states, reads heartbeats.
    Ingest,
    /// Routes requests to substations; the one service that creates and updates the streams.
    Dispatcher,
    /// One substation, by id: its own heartbeats, sessions and dispatch consumer only.
    Substation(String),
    /// An app or fleet system submitting requests straight to NATS (`nats pub ev.requests`,
    /// `evgrid load --nats-url`): stores requests, nothing else.
    Client,
    /// A person or tool running the grid: grid-operator limits, stream management, reads
    /// everything.
    Operator,
    /// Read-only: the `nats` CLI, dashboards, `evgrid replay` without `--to-…`.
    Observer,
}

impl Role {
    /// Every role of a grid whose substations are `substation_ids`: one user each.
    pub fn of_grid(substation_ids: &[String]) -> Vec<Role> {
        let mut roles = vec![
            Self::Ingest,
            Self::Dispatcher,
            Self::Client,
            Self::Operator,
            Self::Observer,
        ];
        roles.extend(substation_ids.iter().cloned().map(Self::Substation));
        roles
    }

    /// The NATS user name: `ingest`, `dispatcher`, `substation-<id>`, `operator`, `observer`.
    pub fn user(&self) -> String {
        match self {
            Self::Ingest => "ingest".into(),
            Self::Dispatcher => "dispatcher".into(),
            Self::Substation(id) => format!("substation-{id}"),
            Self::Client => "client".into(),
            Self::Operator => "operator".into(),
            Self::Observer => "observer".into(),
        }
    }

    /// The subjects this role may publish to, and subscribe to.
    pub fn permissions(&self) -> (Vec<String>, Vec<String>) {
        let replies = vec![format!("{}.>", inbox_prefix_of(&self.user()))];
        let mut publish = vec!["$JS.API.INFO".to_owned()];
        match self {
            Self::Ingest => {
                publish.extend([subjects::REQUESTS.to_owned(), subjects::REJECTED.to_owned()]);
                // A request accepted here, read back by its sequence until it has a state.
                publish.push(format!("$JS.API.DIRECT.GET.{}", streams::REQUESTS));
                publish.extend(stream_info());
                publish.extend(request_state_reads());
                publish.extend(ordered(streams::TELEMETRY));
                (publish, replies)
            }
            Self::Dispatcher => {
                publish.extend([
                    subjects::DISPATCH_ALL.to_owned(),
                    subjects::REJECTED.to_owned(),
                    // A failed substation's requests go back on the request stream, and its
                    // sessions are interrupted on its behalf.
                    subjects::REQUESTS.to_owned(),
                    subjects::SESSIONS_ALL.to_owned(),
                ]);
                publish.extend(stream_info());
                publish.extend(stream_management());
                publish.extend(request_state_reads());
                // Every request's own record, and a failed substation's sessions fenced when
                // their requests move away.
                publish.push(format!("$KV.{}.>", streams::REQUEST_STATE_BUCKET));
                publish.extend(durable(streams::REQUESTS, streams::DISPATCHER_CONSUMER));
                publish.extend(ordered(streams::TELEMETRY));
                publish.extend(ordered(streams::DISPATCH));
                // Stored dispatches read back: its own, and a failed substation's to move.
                publish.push(format!("$JS.API.DIRECT.GET.{}", streams::DISPATCH));
                publish.push(format!("$JS.API.DIRECT.GET.{}.>", streams::DISPATCH));
                (publish, replies)
            }
            Self::Substation(id) => {
                publish.extend([format!("ev.telemetry.{id}"), format!("ev.sessions.{id}.*")]);
                publish.extend(stream_info());
                publish.extend(request_state_reads());
                // Only its own sessions' records: `<request id>.<id>` (a request's record and
                // other substations' sessions are not its to write).
                publish.push(format!("$KV.{}.*.{id}", streams::REQUEST_STATE_BUCKET));
                publish.extend(durable(
                    streams::DISPATCH,
                    &streams::substation_consumer_name(id),
                ));
                publish.extend(ordered(streams::LIMITS));
                // The last limit stored for this substation, read at start.
                publish.push(format!("$JS.API.STREAM.MSG.GET.{}", streams::LIMITS));
                publish.push(format!("$JS.API.DIRECT.GET.{}.>", streams::LIMITS));
                (publish, replies)
            }
            Self::Client => {
                publish.push(subjects::REQUESTS.to_owned());
                // `evgrid load` finds the stream that stores its subject.
                publish.push("$JS.API.STREAM.NAMES".to_owned());
                publish.push(format!("$JS.API.STREAM.INFO.{}", streams::REQUESTS));
                // Following its requests to completion (`evgrid load --wait-complete`) reads
                // session events, rejections and heartbeats: of every client, since their
                // subjects are per substation, not per client.
                for stream in [streams::SESSIONS, streams::REJECTED, streams::TELEMETRY] {
                    publish.push(format!("$JS.API.STREAM.INFO.{stream}"));
                    publish.extend(
                        ordered(stream)
                            .into_iter()
                            .filter(|s| !s.starts_with("$JS.API.CONSUMER.DELETE.")),
                    );
                }
                (publish, replies)
            }
            Self::Operator => (
                vec![subjects::LIMITS_ALL.to_owned(), "$JS.API.>".to_owned()],
                vec![">".to_owned()],
            ),
            Self::Observer => {
                publish.extend(stream_info());
                publish.extend([
                    "$JS.API.STREAM.NAMES".to_owned(),
                    "$JS.API.STREAM.LIST".to_owned(),
                    "$JS.API.DIRECT.GET.>".to_owned(),
                    "$JS.API.STREAM.MSG.GET.*".to_owned(),
                    "$JS.API.CONSUMER.INFO.*.*".to_owned(),
                    "$JS.API.CONSUMER.NAMES.*".to_owned(),
                    "$JS.API.CONSUMER.LIST.*".to_owned(),
                ]);
                // Ordered consumers to read streams, without deleting any: a consumer's name
                // does not tell an ephemeral one from the pipeline's durables.
                for stream in all_streams() {
                    publish.extend(
                        ordered(&stream)
                            .into_iter()
                            .filter(|s| !s.starts_with("$JS.API.CONSUMER.DELETE.")),
                    );
                }
                (publish, vec![">".to_owned()])
            }
        }
    }
}

/// Every stream evgrid keeps, the request-state bucket's included.
fn all_streams() -> Vec<String> {
    let mut names: Vec<String> = streams::stream_configs(&streams::Retention::default())
        .into_iter()
        .map(|c| c.name)
        .collect();
    names.push(format!("KV_{}", streams::REQUEST_STATE_BUCKET));
    names
}

fn stream_info() -> Vec<String> {
    all_streams()
        .iter()
        .map(|s| format!("$JS.API.STREAM.INFO.{s}"))
        .collect()
}

fn stream_management() -> Vec<String> {
    all_streams()
        .iter()
        .flat_map(|s| {
            [
                format!("$JS.API.STREAM.CREATE.{s}"),
                format!("$JS.API.STREAM.UPDATE.{s}"),
            ]
        })
        .collect()
}

/// Reads of request states (direct gets, and gets from the leader of a replicated bucket).
fn request_state_reads() -> Vec<String> {
    let bucket = streams::REQUEST_STATE_BUCKET;
    vec![
        format!("$JS.API.DIRECT.GET.KV_{bucket}"),
        format!("$JS.API.DIRECT.GET.KV_{bucket}.>"),
        format!("$JS.API.STREAM.MSG.GET.KV_{bucket}"),
    ]
}

/// A durable pull consumer `name` on `stream`: create or update it, pull, ack.
fn durable(stream: &str, name: &str) -> Vec<String> {
    vec![
        format!("$JS.API.CONSUMER.CREATE.{stream}.{name}"),
        format!("$JS.API.CONSUMER.CREATE.{stream}.{name}.>"),
        format!("$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{name}"),
        format!("$JS.API.CONSUMER.INFO.{stream}.{name}"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}"),
        format!("$JS.ACK.{stream}.{name}.>"),
    ]
}

/// Ordered (ephemeral) consumers on `stream`: their names are random, so any name.
fn ordered(stream: &str) -> Vec<String> {
    vec![
        format!("$JS.API.CONSUMER.CREATE.{stream}"),
        format!("$JS.API.CONSUMER.CREATE.{stream}.>"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.*"),
        format!("$JS.API.CONSUMER.DELETE.{stream}.*"),
        format!("$JS.API.CONSUMER.INFO.{stream}.*"),
    ]
}

/// A user of a role, with its password.
#[derive(Debug, Clone)]
pub struct User {
    pub role: Role,
    pub password: String,
}

/// The nats-server `authorization` block giving each of `users` its role's permissions;
/// anonymous connections are refused (there is no `no_auth_user`).
pub fn authorization(users: &[User]) -> String {
    let quote = |s: &str| serde_json::to_string(s).expect("a string");
    let list = |subjects: &[String]| {
        subjects
            .iter()
            .map(|s| quote(s))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = String::from("authorization {\n  users = [\n");
    for user in users {
        let (publish, subscribe) = user.role.permissions();
        out.push_str(&format!(
            "    {{\n      user: {}\n      password: {}\n      permissions: {{\n        \
             publish: {{ allow: [{}] }}\n        subscribe: {{ allow: [{}] }}\n      }}\n    }}\n",
            quote(&user.role.user()),
            quote(&user.password),
            list(&publish),
            list(&subscribe),
        ));
    }
    out.push_str("  ]\n}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_sends_only_what_its_job_needs() {
        let (publish, subscribe) = Role::Substation("s1".into()).permissions();
        let pipeline: Vec<&String> = publish.iter().filter(|s| s.starts_with("ev.")).collect();
        assert_eq!(pipeline, ["ev.telemetry.s1", "ev.sessions.s1.*"]);
        assert!(publish.contains(&"$JS.ACK.EV_DISPATCH.substation-s1.>".to_owned()));
        assert!(
            !publish
                .iter()
                .any(|s| s.contains("substation-s2") || s.contains(".UPDATE."))
        );
        assert_eq!(subscribe, ["_INBOX_substation-s1.>"]);

        // The observer reads: no evgrid subject, no state write, no deletion, no management.
        let (publish, subscribe) = Role::Observer.permissions();
        for subject in &publish {
            assert!(
                subject.starts_with("$JS.API.")
                    && !subject.contains("DELETE")
                    && !subject.contains(".UPDATE.")
                    && !subject.starts_with("$JS.API.STREAM.CREATE"),
                "observer may publish {subject}"
            );
        }
        assert_eq!(subscribe, [">"]);

        // Only the dispatcher and the operator manage streams; only the operator sets limits.
        for role in [Role::Ingest, Role::Client, Role::Substation("s1".into())] {
            let (publish, _) = role.permissions();
            assert!(
                !publish
                    .iter()
                    .any(|s| s.contains(".UPDATE.") || s.starts_with("ev.limits")),
                "{role:?}"
            );
        }
        let (client, _) = Role::Client.permissions();
        assert!(client.contains(&"ev.requests".to_owned()));
        assert!(!client.iter().any(|s| s.starts_with("$KV")));

        // Request states: a substation writes only its own sessions' records, ingest none.
        let writes = |role: Role| -> Vec<String> {
            role.permissions()
                .0
                .into_iter()
                .filter(|s| s.starts_with("$KV"))
                .collect()
        };
        assert_eq!(
            writes(Role::Substation("s1".into())),
            ["$KV.EV_REQUEST_STATE.*.s1"]
        );
        assert_eq!(writes(Role::Dispatcher), ["$KV.EV_REQUEST_STATE.>"]);
        assert!(writes(Role::Ingest).is_empty());
    }

    #[test]
    fn the_block_quotes_every_user_and_subject() {
        let block = authorization(&[User {
            role: Role::Substation("s1".into()),
            password: "p\"w".into(),
        }]);
        assert!(block.contains("user: \"substation-s1\""), "{block}");
        assert!(block.contains("password: \"p\\\"w\""), "{block}");
        assert!(block.contains("\"$JS.API.INFO\""), "{block}");
    }
}
