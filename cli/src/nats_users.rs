//! `evgrid nats-users`: the NATS users of evgrid's roles for a NATS you run yourself (docker
//! compose, a cluster, a deployment): a password per user in a directory, and the nats-server
//! `authorization` block that gives each user its role's permissions (docs/security.md), the
//! same that `evgrid up` writes for its own NATS.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use evgrid_substation::config::parse_substation_id;

use crate::credentials::Credentials;

/// The substations of a grid, each of which gets its NATS user (`evgrid nats-users`, `evgrid
/// secrets`).
#[derive(Args, Debug, Clone)]
pub struct Substations {
    /// A substation's id, one per substation (repeated, or comma-separated): each gets its
    /// user `substation-<id>`.
    #[arg(long = "substation", value_name = "ID", value_delimiter = ',', required = true,
          value_parser = parse_substation_id)]
    pub substations: Vec<String>,
}

/// Options of `evgrid nats-users`.
#[derive(Args, Debug, Clone)]
pub struct NatsUsersArgs {
    #[command(flatten)]
    pub substations: Substations,
    /// Directory of the passwords, one file per user (mode 0600): kept when they exist, made
    /// when they do not.
    #[arg(long, default_value = "credentials")]
    pub dir: PathBuf,
    /// Write the authorization block to this file (for nats-server's `include`) instead of
    /// standard output.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// Writes the passwords and prints (or writes) the authorization block.
pub fn main(args: NatsUsersArgs) -> Result<()> {
    let block = users_block(&args.substations, &args.dir)?;
    match &args.out {
        Some(path) => {
            // It holds the passwords too.
            crate::credentials::write_private(path, &block)?;
            eprintln!(
                "wrote {}; passwords in {}/",
                path.display(),
                args.dir.display()
            );
        }
        None => print!("{block}"),
    }
    Ok(())
}

/// The passwords of `substations`' grid in `dir` (kept, or made), and the nats-server
/// authorization block of its users.
pub fn users_block(substations: &Substations, dir: &Path) -> Result<String> {
    let credentials = Credentials::load_or_create(dir, &substations.substations)?;
    Ok(format!(
        "# evgrid's NATS users and their permissions (evgrid nats-users, evgrid secrets; docs/security.md).\n{}",
        credentials.authorization()
    ))
}
