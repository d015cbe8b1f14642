//! The NATS users of a grid: one per role (docs/security.md), each with a random password kept
//! in a file of its own (mode 0600, made once and kept, so a saved `nats` context keeps
//! working), and the nats-server `authorization` block that gives each its role's permissions.
//! `evgrid up` keeps them in `<data-dir>/credentials/` (`--fresh` makes new ones); `evgrid
//! nats-users` writes them for a NATS run elsewhere.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use evgrid_common::config::NatsAuth;
use evgrid_common::roles::{self, Role, User};

/// Where the credentials of a grid live, under its data directory.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("credentials")
}

/// The users of a grid and their passwords.
#[derive(Debug, Clone)]
pub struct Credentials {
    dir: PathBuf,
    users: Vec<User>,
}

impl Credentials {
    /// Reads the password of every role's user from `dir` (one file per user), writing a new
    /// random one for any that has none.
    pub fn load_or_create(dir: &Path, substation_ids: &[String]) -> Result<Self> {
        let dir = dir.to_path_buf();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let users = Role::of_grid(substation_ids)
            .into_iter()
            .map(|role| {
                let path = dir.join(role.user());
                let password = match std::fs::read_to_string(&path) {
                    Ok(text) if !text.trim().is_empty() => text.trim().to_owned(),
                    _ => write_new_password(&path)?,
                };
                Ok(User { role, password })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { dir, users })
    }

    /// The nats-server `authorization` block of these users.
    pub fn authorization(&self) -> String {
        roles::authorization(&self.users)
    }

    /// How `role`'s user connects.
    pub fn auth(&self, role: &Role) -> NatsAuth {
        let user = self
            .users
            .iter()
            .find(|u| &u.role == role)
            .expect("a user for every role of the grid");
        NatsAuth::user(role.user(), user.password.clone())
    }

    /// The file holding `user`'s password.
    pub fn file(&self, user: &str) -> PathBuf {
        self.dir.join(user)
    }
}

/// A new random password (122 random bits, as hex), written to `path` readable by its owner
/// only.
fn write_new_password(path: &Path) -> Result<String> {
    let password = uuid::Uuid::new_v4().simple().to_string();
    write_private(path, &format!("{password}\n"))?;
    Ok(password)
}

/// Writes `contents` to `path`, readable and writable by its owner only (mode 0600), also when
/// the file was already there with a wider mode: passwords, and server configurations that
/// hold them.
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_made_once_private_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let data = tempfile::tempdir().unwrap();
        let ids = ["substation-1".to_owned()];
        let first = Credentials::load_or_create(data.path(), &ids).unwrap();
        assert_eq!(first.file("observer"), data.path().join("observer"));
        let file = first.file("observer");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Credentials::load_or_create(data.path(), &ids).unwrap();
        assert_eq!(
            first.auth(&Role::Observer).password(),
            again.auth(&Role::Observer).password()
        );
        assert_ne!(
            first.auth(&Role::Observer).password(),
            first.auth(&Role::Operator).password()
        );
        assert_eq!(
            first.auth(&Role::Observer).password().map(str::len),
            Some(32)
        );
        assert!(
            first
                .authorization()
                .contains("\"substation-substation-1\"")
        );
    }
}
