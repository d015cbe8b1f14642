//! `evgrid secrets`: everything a secured grid needs, made once into one directory and kept
//! across runs: a NATS user per role (passwords, and the authorization block nats-server
//! includes) and the API keys file with an operator key. docker compose runs it before NATS
//! starts (service `secrets`); `evgrid up` keeps the same things in its data directory.

use std::path::PathBuf;

use crate::credentials::write_private;
use crate::nats_users::{Substations, users_block};
use anyhow::Result;
use clap::Args;

/// Options of `evgrid secrets`.
#[derive(Args, Debug, Clone)]
pub struct SecretsArgs {
    #[command(flatten)]
    pub substations: Substations,
    /// Where the secrets are: `nats/<user>` (each user's password), `nats-users.conf` (the
    /// nats-server authorization block), `api-keys` (ingest's `--api-keys`) and `api-key`
    /// (the operator's key). What is there is kept; what is missing is made.
    #[arg(long, default_value = "secrets")]
    pub dir: PathBuf,
}

/// Makes what is missing in `args.dir`.
pub fn main(args: SecretsArgs) -> Result<()> {
    let block = users_block(&args.substations, &args.dir.join("nats"))?;
    write_private(&args.dir.join("nats-users.conf"), &block)?;
    crate::api_key::operator_key(&args.dir.join("api-keys"), &args.dir.join("api-key"))?;
    eprintln!(
        "secrets in {}: NATS passwords in nats/, the authorization block in nats-users.conf, \
         API keys in api-keys, the operator's key in api-key",
        args.dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let args = SecretsArgs {
            substations: Substations {
                substations: vec!["s1".into()],
            },
            dir: dir.path().join("secrets"),
        };
        main(args.clone()).unwrap();
        let read = |name: &str| std::fs::read_to_string(args.dir.join(name)).unwrap();
        let (key, password) = (read("api-key"), read("nats/substation-s1"));
        let block = read("nats-users.conf");
        assert!(block.contains("\"substation-s1\"") && block.contains(password.trim()));
        main(args.clone()).unwrap();
        assert_eq!(read("api-key"), key);
        assert_eq!(read("nats/substation-s1"), password);
        assert_eq!(read("nats-users.conf"), block);
    }
}
