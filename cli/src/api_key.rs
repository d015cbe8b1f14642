//! `evgrid api-key`: makes an API key for ingest's HTTP API and adds its hash to a keys file
//! (`evgrid-ingest --api-keys`, docs/security.md). The key itself is shown once and stored
//! nowhere by ingest. `evgrid up` makes its operator key with the same code.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use evgrid_ingest::auth::{ApiKeys, Rate, Scope, Scopes, new_key, new_secret_line};

use crate::credentials::write_private;

/// Options of `evgrid api-key`.
#[derive(Args, Debug, Clone)]
pub struct ApiKeyArgs {
    /// The keys file to add the key to (made, with its secret, if it does not exist; mode 0600).
    #[arg(long, value_name = "FILE")]
    pub file: PathBuf,
    /// Whose key it is: the owner of the requests it submits. Give a new key the same name to
    /// rotate one: both work, and the requests of either stay readable by both.
    #[arg(long)]
    pub name: String,
    /// What it may do: submit, read (its own requests), operator (everything).
    #[arg(long, value_delimiter = ',', required = true)]
    pub scopes: Vec<Scope>,
    /// Requests a second it may make, or `none` for no limit; without it, ingest's
    /// `--api-rate-limit`.
    #[arg(long)]
    pub rate: Option<Rate>,
    /// Write the key to this file (mode 0600) instead of standard output.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// Makes the key, adds it to the file, and prints or writes it.
pub fn main(args: ApiKeyArgs) -> Result<()> {
    let key = add(
        &args.file,
        &args.name,
        Scopes::of(&args.scopes),
        args.rate.unwrap_or(Rate::Default),
    )?;
    match &args.out {
        Some(out) => {
            write_private(out, &format!("{key}\n"))?;
            eprintln!(
                "added {}'s key to {}; the key is in {}",
                args.name,
                args.file.display(),
                out.display()
            );
        }
        None => {
            eprintln!(
                "added {}'s key to {}; it is shown once, below:",
                args.name,
                args.file.display()
            );
            println!("{key}");
        }
    }
    Ok(())
}

/// Adds a new key for `name` to the keys file at `path` (made with a new secret if missing)
/// and returns the key. The file is checked whole before it is written.
pub fn add(path: &Path, name: &str, scopes: Scopes, rate: Rate) -> Result<String> {
    let mut text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => format!(
            "# evgrid API keys (evgrid api-key; docs/security.md). Private: the secret keys\n\
             # request ids. One line per key: name, scopes, SHA-256 of the key, rate.\n{}\n",
            new_secret_line()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let (key, line) = new_key(name, scopes, rate).map_err(anyhow::Error::msg)?;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&line);
    text.push('\n');
    ApiKeys::parse(&text).with_context(|| format!("{} would not be usable", path.display()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    write_private(path, &text)?;
    Ok(key)
}

/// The operator key of a grid `evgrid up` runs, in `key_file`, with its hash in `keys_file`:
/// kept across runs while both are there, made anew otherwise.
pub fn operator_key(keys_file: &Path, key_file: &Path) -> Result<String> {
    if let (Ok(key), Ok(keys)) = (std::fs::read_to_string(key_file), ApiKeys::read(keys_file))
        && keys.knows(key.trim())
    {
        return Ok(key.trim().to_owned());
    }
    let key = add(
        keys_file,
        "operator",
        Scopes::of(&[Scope::Operator]),
        Rate::Unlimited,
    )?;
    write_private(key_file, &format!("{key}\n"))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_added_to_one_private_file_with_one_secret() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("api-keys");
        let a = add(&file, "a", Scopes::of(&[Scope::Submit]), Rate::Default).unwrap();
        let b = add(&file, "b", Scopes::of(&[Scope::Read]), Rate::PerSecond(5.0)).unwrap();
        assert_ne!(a, b);
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(text.matches("\nsecret ").count(), 1, "{text}");
        assert!(
            !text.contains(&a) && !text.contains(&b),
            "only hashes at rest"
        );
        let keys = ApiKeys::parse(&text).unwrap();
        assert!(keys.knows(&a) && keys.knows(&b));
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(add(&file, "a b", Scopes::of(&[Scope::Read]), Rate::Default).is_err());
    }

    #[test]
    fn the_operator_key_of_up_is_kept_across_runs() {
        let dir = tempfile::tempdir().unwrap();
        let (keys, key) = (dir.path().join("api-keys"), dir.path().join("api-key"));
        let first = operator_key(&keys, &key).unwrap();
        assert_eq!(operator_key(&keys, &key).unwrap(), first);
        std::fs::remove_file(&key).unwrap();
        assert_ne!(operator_key(&keys, &key).unwrap(), first);
    }
}
