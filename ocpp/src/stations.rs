//! Which charging stations may connect, and how each proves it is itself: OCPP 2.0.1 Security
//! Profile 1, HTTP Basic authentication with the station's identity as the user and a
//! per-station password. The stations file (`--ocpp-stations`) has one `station_id:password`
//! line each; a password may be given as an argon2 (`$argon2id$…`) or bcrypt (`$2b$…`) hash,
//! so the file need not hold the secret itself.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use argon2::password_hash::PasswordHash;
use argon2::{Argon2, PasswordVerifier};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Longest station identity OCPP allows (`identityString`, 48 characters).
pub const MAX_STATION_ID_CHARS: usize = 48;

/// Why a stations file cannot be used, naming its line.
#[derive(Debug, thiserror::Error)]
pub enum StationsFileError {
    #[error("cannot read stations file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("stations file line {line}: {detail}")]
    Line { line: usize, detail: String },
    #[error("stations file names no station")]
    Empty,
}

/// How one station's password is checked.
#[derive(Debug, Clone)]
enum Secret {
    /// The password's SHA-256, compared in constant time.
    Plain([u8; 32]),
    /// An argon2 PHC string.
    Argon2(String),
    /// A bcrypt hash.
    Bcrypt(String),
}

/// The stations that may connect.
#[derive(Debug, Clone, Default)]
pub struct Stations {
    secrets: HashMap<String, Secret>,
}

impl Stations {
    /// Reads a stations file.
    pub fn read(path: &Path) -> Result<Self, StationsFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| StationsFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses `station_id:password` lines ([`entries`]).
    pub fn parse(text: &str) -> Result<Self, StationsFileError> {
        let mut secrets = HashMap::new();
        for entry in entries(text)? {
            let secret = secret_of(entry.password).map_err(|detail| StationsFileError::Line {
                line: entry.line,
                detail,
            })?;
            secrets.insert(entry.station.to_owned(), secret);
        }
        Ok(Self { secrets })
    }

    /// Whether `station_id` is known and `password` is its password.
    pub fn verify(&self, station_id: &str, password: &str) -> bool {
        match self.secrets.get(station_id) {
            Some(Secret::Plain(hash)) => {
                let given: [u8; 32] = Sha256::digest(password.as_bytes()).into();
                bool::from(given.ct_eq(hash))
            }
            Some(Secret::Argon2(phc)) => PasswordHash::new(phc).is_ok_and(|hash| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &hash)
                    .is_ok()
            }),
            Some(Secret::Bcrypt(hash)) => bcrypt::verify(password, hash).unwrap_or(false),
            None => false,
        }
    }

    /// Whether `station_id` may connect at all.
    pub fn knows(&self, station_id: &str) -> bool {
        self.secrets.contains_key(station_id)
    }

    pub fn len(&self) -> usize {
        self.secrets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }
}

/// One station of a stations file, as written: its line number, its id, and its password or
/// the password's hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    pub line: usize,
    pub station: &'a str,
    pub password: &'a str,
}

/// The stations of a stations file's text, in file order: one `station_id:password` line each,
/// blank lines and `#` comments skipped. A line that is not that, an id OCPP does not allow, a
/// station on two lines, or no station at all is an error naming the line. The CSMS
/// ([`Stations::parse`]) and the stations' side (`evgrid stations`, which needs the plain
/// passwords) read the same file with it.
pub fn entries(text: &str) -> Result<Vec<Entry<'_>>, StationsFileError> {
    let mut entries = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |detail: String| StationsFileError::Line {
            line: i + 1,
            detail,
        };
        let (station, password) = line
            .split_once(':')
            .ok_or_else(|| bad("expected `station_id:password`".into()))?;
        check_station_id(station).map_err(bad)?;
        if !seen.insert(station) {
            return Err(bad(format!("station {station} is on an earlier line too")));
        }
        entries.push(Entry {
            line: i + 1,
            station,
            password,
        });
    }
    if entries.is_empty() {
        return Err(StationsFileError::Empty);
    }
    Ok(entries)
}

/// Whether a stations file gives this password as a hash (argon2 or bcrypt) rather than itself.
pub fn is_hash(password: &str) -> bool {
    password.starts_with("$argon2") || is_bcrypt(password)
}

fn is_bcrypt(password: &str) -> bool {
    ["$2a$", "$2b$", "$2y$"]
        .iter()
        .any(|p| password.starts_with(p))
}

/// A plain password as OCPP 2.0.1 allows it (BasicAuthPassword: 16 to 40 characters); the
/// error says what it must be.
pub fn check_plain_password(password: &str) -> Result<(), &'static str> {
    if (16..=40).contains(&password.chars().count()) {
        Ok(())
    } else {
        Err("must be 16 to 40 characters (OCPP 2.0.1)")
    }
}

/// A station identity as OCPP allows it in a URL path: 1 to 48 printable ASCII characters
/// without `:` (Basic authentication's separator) or `/`.
pub fn check_station_id(id: &str) -> Result<(), String> {
    let ok = (1..=MAX_STATION_ID_CHARS).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b':' && b != b'/' && b != b'%');
    ok.then_some(()).ok_or_else(|| {
        format!(
            "station id {id:?} must be 1 to {MAX_STATION_ID_CHARS} printable ASCII characters without ':', '/' or '%'"
        )
    })
}

fn secret_of(password: &str) -> Result<Secret, String> {
    if password.starts_with("$argon2") {
        let hash = PasswordHash::new(password).map_err(|e| format!("not an argon2 hash: {e}"))?;
        if hash.salt.is_none() || hash.hash.is_none() {
            return Err("not an argon2 hash: no salt or no hash".into());
        }
        return Ok(Secret::Argon2(password.to_owned()));
    }
    if is_bcrypt(password) {
        // A bcrypt hash is 60 characters; `verify` rejects anything else at every attempt.
        if password.len() != 60 {
            return Err("not a bcrypt hash (60 characters)".into());
        }
        return Ok(Secret::Bcrypt(password.to_owned()));
    }
    check_plain_password(password)
        .map_err(|why| format!("a password {why}, or an argon2 or bcrypt hash"))?;
    Ok(Secret::Plain(Sha256::digest(password.as_bytes()).into()))
}

#[cfg(test)]
mod tests {
    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};

    use super::*;

    #[test]
    fn plain_argon2_and_bcrypt_passwords_verify() {
        let argon = Argon2::default()
            .hash_password(b"argon-password-0123", &SaltString::generate(&mut OsRng))
            .unwrap()
            .to_string();
        let bcrypt = bcrypt::hash("bcrypt-password-0123", 4).unwrap();
        let stations = Stations::parse(&format!(
            "# stations\ncs-1:plain-password-0123\n\ncs-2:{argon}\ncs-3:{bcrypt}\n"
        ))
        .unwrap();
        assert_eq!(stations.len(), 3);
        assert!(stations.verify("cs-1", "plain-password-0123"));
        assert!(stations.verify("cs-2", "argon-password-0123"));
        assert!(stations.verify("cs-3", "bcrypt-password-0123"));
        assert!(!stations.verify("cs-1", "plain-password-0124"));
        assert!(!stations.verify("cs-2", "plain-password-0123"));
        assert!(!stations.verify("cs-3", ""));
        assert!(!stations.verify("cs-9", "plain-password-0123"));
        assert!(stations.knows("cs-3") && !stations.knows("cs-9"));
    }

    #[test]
    fn a_bad_line_is_named() {
        for (text, expected) in [
            ("", "names no station"),
            ("cs-1", "line 1: expected"),
            ("cs-1:short", "16 to 40"),
            ("cs 1:plain-password-0123", "station id"),
            (
                "cs-1:plain-password-0123\ncs-1:plain-password-0123",
                "line 2: station cs-1",
            ),
            ("cs-1:$argon2id$nonsense", "argon2"),
            ("cs-1:$2b$04$short", "bcrypt"),
        ] {
            let error = Stations::parse(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }
}
