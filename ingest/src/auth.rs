//! Who is calling the HTTP API, and what it may do (issue #11). It stands in front of every
//! `/v1` handler of `routes`: an API key arrives as `Authorization: Bearer <key>`, is
//! looked up by its SHA-256 in the keys file (`--api-keys`, which holds only hashes), and
//! brings its owner's name, scopes and rate limit.
//!
//! A key's requests get ids that carry their owner: the first 48 bits of every id ingest makes
//! for a key are a tag keyed with the file's secret on the owner's name
//! ([`evgrid_model::messages::owner_tag`]). So a key reads only its own requests without any
//! lookup (the id says whose it is), and a request id sent by a client (`Idempotency-Key`, or
//! a body `request_id` without the caller's tag) is mapped into the caller's own ids: nobody
//! can name, and so overwrite, a request of someone else.
//!
//! `--insecure-no-auth` serves everyone as one caller with every scope, ids as before.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use evgrid_model::messages::{
    OwnerTag, owner_tag, request_id_from_idempotency_key, with_owner_tag,
};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::problem::ApiError;

/// What a key may do. `operator` includes the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `POST /v1/charge-requests`.
    Submit,
    /// `GET /v1/charge-requests/{id}` of its own requests.
    Read,
    /// Everything: every request, `/v1/substations`.
    Operator,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Self::Submit, Self::Read, Self::Operator];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Submit => "submit",
            Self::Read => "read",
            Self::Operator => "operator",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| format!("unknown scope {s:?} (submit, read or operator)"))
    }
}

/// The scopes of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes(u8);

impl Scopes {
    pub fn of(scopes: &[Scope]) -> Self {
        Self(scopes.iter().fold(0, |bits, s| bits | s.bit()))
    }

    pub fn allows(self, scope: Scope) -> bool {
        self.0 & (scope.bit() | Scope::Operator.bit()) != 0
    }

    pub fn list(self) -> Vec<Scope> {
        Scope::ALL
            .into_iter()
            .filter(|s| self.0 & s.bit() != 0)
            .collect()
    }

    /// The scopes' names, as the keys file and the API spell them.
    pub(crate) fn names(self) -> Vec<&'static str> {
        self.list().into_iter().map(Scope::as_str).collect()
    }
}

impl std::fmt::Display for Scopes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.names().join(","))
    }
}

/// A key's limit on requests a second: the file's `rate=`, else `--api-rate-limit`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    Default,
    PerSecond(f64),
    Unlimited,
}

/// Largest rate a key may be given (requests a second).
const MAX_RATE: f64 = 1e6;

/// Requests a second, as a key's `rate=` or `--api-rate-limit` takes them: above 0, at most a
/// million.
pub fn parse_per_second(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 && r <= MAX_RATE => Ok(r),
        _ => Err(format!(
            "{s:?} is not a rate above 0 and at most {MAX_RATE} requests a second"
        )),
    }
}

impl std::str::FromStr for Rate {
    type Err = String;
    /// `none` (no limit), or requests a second.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "none" {
            return Ok(Rate::Unlimited);
        }
        parse_per_second(s).map(Rate::PerSecond)
    }
}

/// Why a keys file cannot be used, naming its line.
#[derive(Debug, thiserror::Error)]
pub enum KeysFileError {
    #[error("cannot read API keys file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("API keys file line {line}: {detail}")]
    Line { line: usize, detail: String },
    #[error(
        "API keys file has no `secret` line (the key of request ids); `evgrid api-key` writes one"
    )]
    NoSecret,
    #[error("API keys file holds no key; `evgrid api-key` makes one")]
    NoKeys,
}

/// A caller the keys file knows.
#[derive(Debug)]
pub(crate) struct Client {
    pub(crate) name: String,
    pub(crate) scopes: Scopes,
    tag: OwnerTag,
    rate: Rate,
}

/// One key's token bucket: `rate` a second, bursts of a second's worth (at least one).
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug)]
struct Key {
    client: Arc<Client>,
    bucket: Mutex<Option<Bucket>>,
}

/// The parsed keys file: the secret of request ids, and the keys by the SHA-256 of each.
#[derive(Debug)]
pub struct ApiKeys {
    secret: [u8; 32],
    keys: HashMap<[u8; 32], Key>,
}

type HmacSha256 = Hmac<Sha256>;

impl ApiKeys {
    /// Reads and parses a keys file (the value parser of `--api-keys`).
    pub fn read(path: &Path) -> Result<Self, KeysFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeysFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses a keys file: `secret <64 hex digits>` once, then one
    /// `key <name> <scope,...> sha256:<64 hex digits> [rate=<per second>|rate=none]` line per
    /// key. `#` starts a comment line. One name may have several keys (rotation).
    pub fn parse(text: &str) -> Result<Self, KeysFileError> {
        let mut secret = None;
        // The keys' owners, scopes and rates: their tags need the secret, which may come after.
        let mut entries = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let bad = |detail: String| KeysFileError::Line {
                line: line_no,
                detail,
            };
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                [] => {}
                [first, ..] if first.starts_with('#') => {}
                ["secret", hex] => {
                    if secret.is_some() {
                        return Err(bad("a second `secret` line".into()));
                    }
                    secret = Some(parse_hex32(hex).map_err(|e| bad(format!("secret: {e}")))?);
                }
                ["key", name, scopes, hash, rest @ ..] if rest.len() <= 1 => {
                    check_name(name).map_err(bad)?;
                    let scopes = parse_scopes(scopes).map_err(bad)?;
                    let hash = hash
                        .strip_prefix("sha256:")
                        .ok_or_else(
                            || bad("the key's hash must be `sha256:<64 hex digits>`".into()),
                        )
                        .and_then(|h| parse_hex32(h).map_err(|e| bad(format!("hash: {e}"))))?;
                    let rate = match rest.first() {
                        None => Rate::Default,
                        Some(r) => parse_rate(r).map_err(bad)?,
                    };
                    if entries
                        .insert(hash, ((*name).to_owned(), scopes, rate))
                        .is_some()
                    {
                        return Err(bad("this key's hash is on an earlier line too".into()));
                    }
                }
                _ => {
                    return Err(bad(
                        "expected `secret <hex>` or `key <name> <scopes> sha256:<hex> [rate=N]`"
                            .into(),
                    ));
                }
            }
        }
        let secret = secret.ok_or(KeysFileError::NoSecret)?;
        if entries.is_empty() {
            return Err(KeysFileError::NoKeys);
        }
        let keys = entries
            .into_iter()
            .map(|(hash, (name, scopes, rate))| {
                let client = Client {
                    tag: tag_of(&secret, &name),
                    name,
                    scopes,
                    rate,
                };
                let key = Key {
                    client: Arc::new(client),
                    bucket: Mutex::new(None),
                };
                (hash, key)
            })
            .collect();
        Ok(Self { secret, keys })
    }

    /// Whether `key` is one of the file's keys.
    pub fn knows(&self, key: &str) -> bool {
        self.find(key).is_some()
    }

    fn find(&self, key: &str) -> Option<&Key> {
        self.keys
            .get(&<[u8; 32]>::from(Sha256::digest(key.as_bytes())))
    }
}

/// How ingest tells callers apart: by API key, or not at all (`--insecure-no-auth`).
#[derive(Debug)]
pub(crate) enum Access {
    Keys {
        keys: Arc<ApiKeys>,
        /// Requests a second of a key without its own `rate=`.
        default_rate: f64,
    },
    Open,
}

/// Who is calling, once their key is checked.
#[derive(Debug, Clone)]
pub(crate) enum Caller {
    /// `--insecure-no-auth`: anyone, with every scope.
    Anyone,
    Client(Arc<Client>),
}

impl Access {
    /// The caller behind `authorization` (the header's value), if their key is known, has
    /// `scope` (any key, without one), and is within its rate at `now`.
    pub(crate) fn check(
        &self,
        authorization: Option<&str>,
        scope: Option<Scope>,
        now: Instant,
    ) -> Result<Caller, ApiError> {
        let Access::Keys { keys, default_rate } = self else {
            return Ok(Caller::Anyone);
        };
        let token = bearer(authorization)?;
        let key = keys.find(token).ok_or_else(|| {
            ApiError::Unauthorized("the API key is not known (revoked, or mistyped)".into())
        })?;
        let client = &key.client;
        if let Some(scope) = scope.filter(|s| !client.scopes.allows(*s)) {
            return Err(ApiError::Forbidden(format!(
                "the API key of {} has the scopes {}, and this needs {}",
                client.name,
                client.scopes,
                scope.as_str()
            )));
        }
        let rate = match client.rate {
            Rate::Default => *default_rate,
            Rate::PerSecond(r) => r,
            Rate::Unlimited => return Ok(Caller::Client(client.clone())),
        };
        let mut bucket = key.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        take(&mut bucket, rate, now).map_err(ApiError::RateLimited)?;
        Ok(Caller::Client(client.clone()))
    }

    /// The id of a request `caller` submits, from its `Idempotency-Key` or body `request_id`
    /// (the header wins; both given must agree), or a new one.
    pub(crate) fn request_id(
        &self,
        caller: &Caller,
        idempotency_key: Option<&str>,
        body_id: Option<Uuid>,
    ) -> Result<Uuid, ApiError> {
        let (Access::Keys { keys, .. }, Caller::Client(client)) = (self, caller) else {
            return crate::request::resolve_request_id(
                idempotency_key,
                body_id,
                request_id_from_idempotency_key,
                Uuid::new_v4,
            );
        };
        // An id already the caller's names itself (a retry with the id a 202 gave, or one a
        // client made with its tag); anything else is a token mapped into the caller's ids.
        let map = |token: &str| match Uuid::parse_str(token) {
            Ok(id) if owner_tag(id) == client.tag => id,
            _ => mapped_id(&keys.secret, client, token),
        };
        crate::request::resolve_request_id(idempotency_key, body_id, map, || {
            with_owner_tag(client.tag, Uuid::new_v4())
        })
    }
}

impl Caller {
    /// Whether this caller may read request `id`: an operator any, a client its own.
    pub(crate) fn may_read(&self, id: Uuid) -> bool {
        match self {
            Caller::Anyone => true,
            Caller::Client(c) => c.scopes.allows(Scope::Operator) || owner_tag(id) == c.tag,
        }
    }

    /// `GET /v1/api-key`'s answer.
    pub(crate) fn describe(&self) -> serde_json::Value {
        match self {
            Caller::Anyone => serde_json::json!({
                "name": null,
                "scopes": Scope::ALL.map(Scope::as_str),
            }),
            Caller::Client(c) => serde_json::json!({
                "name": c.name,
                "scopes": c.scopes.names(),
                "request_id_prefix": prefix_of(c.tag),
            }),
        }
    }
}

/// The tag's 48 bits as the first two groups of a hyphenated UUID (`1a2b3c4d-5e6f`).
fn prefix_of(tag: OwnerTag) -> String {
    let id = with_owner_tag(tag, Uuid::nil()).hyphenated().to_string();
    id[..13].to_owned()
}

/// The key in an `Authorization: Bearer <key>` header value.
fn bearer(authorization: Option<&str>) -> Result<&str, ApiError> {
    let value = authorization.ok_or_else(|| {
        ApiError::Unauthorized("send an API key as `Authorization: Bearer <key>`".into())
    })?;
    let (scheme, token) = value.trim().split_once(' ').unwrap_or((value, ""));
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(ApiError::Unauthorized(
            "the Authorization header must be `Bearer <key>`".into(),
        ));
    }
    Ok(token)
}

/// Takes one request from the bucket at `now`, or says how long until one is there.
fn take(bucket: &mut Option<Bucket>, rate: f64, now: Instant) -> Result<(), Duration> {
    let burst = rate.max(1.0);
    let b = bucket.get_or_insert(Bucket {
        tokens: burst,
        at: now,
    });
    let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
    b.tokens = (b.tokens + elapsed * rate).min(burst);
    b.at = now;
    if b.tokens >= 1.0 {
        b.tokens -= 1.0;
        Ok(())
    } else {
        Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
    }
}

fn hmac(secret: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    for part in parts {
        // Length-prefixed, so that no two different part lists hash the same.
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn tag_of(secret: &[u8; 32], name: &str) -> OwnerTag {
    let h = hmac(secret, &[b"owner", name.as_bytes()]);
    h[..6].try_into().expect("6 bytes")
}

/// The caller's id for `token`: the same for the same caller and token, unpredictable without
/// the secret, and never another caller's.
fn mapped_id(secret: &[u8; 32], client: &Client, token: &str) -> Uuid {
    let h = hmac(
        secret,
        &[b"request-id", client.name.as_bytes(), token.as_bytes()],
    );
    let id = Uuid::new_v8(h[..16].try_into().expect("16 bytes"));
    with_owner_tag(client.tag, id)
}

fn parse_hex32(text: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).map_err(|_| "must be 64 hex digits".to_owned())?;
    Ok(out)
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    ok.then_some(())
        .ok_or_else(|| format!("name {name:?} must be 1 to 64 letters, digits, '.', '_' or '-'"))
}

fn parse_scopes(text: &str) -> Result<Scopes, String> {
    let scopes = text
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<Scope>, _>>()?;
    Ok(Scopes::of(&scopes))
}

fn parse_rate(text: &str) -> Result<Rate, String> {
    let value = text.strip_prefix("rate=").ok_or_else(|| {
        format!("{text:?}: the fifth word, if any, is `rate=<per second>` or `rate=none`")
    })?;
    value
        .parse()
        .map_err(|e| format!("rate={value}: {e}, or none"))
}

/// A new key for `name`: the key itself (shown once, never stored) and its file line.
pub fn new_key(name: &str, scopes: Scopes, rate: Rate) -> Result<(String, String), String> {
    check_name(name)?;
    if scopes == Scopes::default() {
        return Err("a key needs at least one scope".into());
    }
    let key = format!("evg_{}", hex::encode(random_bytes()));
    let hash = hex::encode(Sha256::digest(key.as_bytes()));
    let rate = match rate {
        Rate::Default => String::new(),
        Rate::PerSecond(r) => format!(" rate={r}"),
        Rate::Unlimited => " rate=none".into(),
    };
    Ok((key, format!("key {name} {scopes} sha256:{hash}{rate}")))
}

/// A keys file's `secret` line, new.
pub fn new_secret_line() -> String {
    format!("secret {}", hex::encode(random_bytes()))
}

/// 32 bytes from the operating system's random source (two v4 UUIDs' worth of randomness would
/// lose the version bits).
fn random_bytes() -> [u8; 32] {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system has a random source");
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(keys: &[(&str, &str)]) -> (ApiKeys, Vec<String>) {
        let mut text = format!("# test\n{}\n", new_secret_line());
        let mut plain = Vec::new();
        for (name, scopes) in keys {
            let scopes = parse_scopes(scopes).unwrap();
            let (key, line) = new_key(name, scopes, Rate::Default).unwrap();
            text.push_str(&line);
            text.push('\n');
            plain.push(key);
        }
        (ApiKeys::parse(&text).unwrap(), plain)
    }

    fn access(keys: ApiKeys, default_rate: f64) -> Access {
        Access::Keys {
            keys: Arc::new(keys),
            default_rate,
        }
    }

    fn header(key: &str) -> String {
        format!("Bearer {key}")
    }

    #[test]
    fn a_key_is_known_by_its_hash_and_brings_its_scopes() {
        let (keys, plain) = file(&[("fleet-a", "submit,read"), ("ops", "operator")]);
        let access = access(keys, 100.0);
        let now = Instant::now();
        let fleet = access.check(Some(&header(&plain[0])), Some(Scope::Submit), now);
        assert!(matches!(fleet, Ok(Caller::Client(c)) if c.name == "fleet-a"));
        assert!(matches!(
            access.check(Some(&header(&plain[0])), Some(Scope::Operator), now),
            Err(ApiError::Forbidden(_))
        ));
        assert!(
            access
                .check(Some(&header(&plain[1])), Some(Scope::Read), now)
                .is_ok()
        );
        for bad in [
            None,
            Some("Bearer"),
            Some("Basic abc"),
            Some("Bearer evg_00"),
        ] {
            assert!(
                matches!(
                    access.check(bad, Some(Scope::Read), now),
                    Err(ApiError::Unauthorized(_))
                ),
                "{bad:?}"
            );
        }
        assert!(
            access
                .check(
                    Some(&format!("bearer   {}  ", plain[1])),
                    Some(Scope::Read),
                    now
                )
                .is_ok()
        );
    }

    #[test]
    fn ids_carry_their_owner_and_a_client_reads_only_its_own() {
        let (keys, plain) = file(&[
            ("a", "submit,read"),
            ("b", "submit,read"),
            ("o", "operator"),
        ]);
        let access = access(keys, 1e6);
        let now = Instant::now();
        let a = access
            .check(Some(&header(&plain[0])), Some(Scope::Submit), now)
            .unwrap();
        let b = access
            .check(Some(&header(&plain[1])), Some(Scope::Submit), now)
            .unwrap();
        let o = access
            .check(Some(&header(&plain[2])), Some(Scope::Read), now)
            .unwrap();

        let fresh = access.request_id(&a, None, None).unwrap();
        let keyed = access.request_id(&a, Some("order-42"), None).unwrap();
        assert_eq!(
            access.request_id(&a, Some("order-42"), None).unwrap(),
            keyed
        );
        // The same key from another client is another id, and not one the first can read.
        let b_keyed = access.request_id(&b, Some("order-42"), None).unwrap();
        assert_ne!(b_keyed, keyed);
        for id in [fresh, keyed] {
            assert!(a.may_read(id) && !b.may_read(id) && o.may_read(id));
        }
        // Naming another's id (in the header or the body) maps it into one's own ids.
        let stolen = access
            .request_id(&b, Some(&keyed.to_string()), None)
            .unwrap();
        assert_ne!(stolen, keyed);
        assert!(b.may_read(stolen));
        let stolen = access.request_id(&b, None, Some(keyed)).unwrap();
        assert_ne!(stolen, keyed);
        // One's own id names itself: a retry with the id a 202 gave.
        assert_eq!(access.request_id(&a, None, Some(keyed)).unwrap(), keyed);
        assert_eq!(
            access
                .request_id(&a, Some("order-42"), Some(keyed))
                .unwrap(),
            keyed
        );
        assert!(
            access
                .request_id(&a, Some("order-43"), Some(keyed))
                .is_err()
        );
        // The prefix `GET /v1/api-key` gives is what the ids start with.
        let prefix = a.describe()["request_id_prefix"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(fresh.to_string().starts_with(&prefix), "{fresh} {prefix}");
    }

    #[test]
    fn without_keys_everyone_may_do_everything_with_ids_as_before() {
        let open = Access::Open;
        let anyone = open
            .check(None, Some(Scope::Operator), Instant::now())
            .unwrap();
        assert_eq!(
            open.request_id(&anyone, Some("order-42"), None).unwrap(),
            request_id_from_idempotency_key("order-42")
        );
        assert!(anyone.may_read(Uuid::new_v4()));
    }

    #[test]
    fn a_key_over_its_rate_waits_and_its_bucket_refills() {
        let (keys, plain) = file(&[("a", "submit")]);
        let access = access(keys, 2.0);
        let auth = header(&plain[0]);
        let t0 = Instant::now();
        assert!(access.check(Some(&auth), Some(Scope::Submit), t0).is_ok());
        assert!(access.check(Some(&auth), Some(Scope::Submit), t0).is_ok());
        let Err(ApiError::RateLimited(wait)) = access.check(Some(&auth), Some(Scope::Submit), t0)
        else {
            panic!("a third request in the same instant is over a rate of 2/s");
        };
        assert_eq!(wait, Duration::from_millis(500));
        assert!(
            access
                .check(Some(&auth), Some(Scope::Submit), t0 + wait)
                .is_ok()
        );
    }

    #[test]
    fn a_bad_line_is_named() {
        let secret = new_secret_line();
        let (_, good) = new_key("a", Scopes::of(&[Scope::Read]), Rate::Unlimited).unwrap();
        let cases = [
            (format!("{good}\n"), "no `secret` line"),
            (format!("{secret}\n"), "no key"),
            (format!("{secret}\n{secret}\n{good}"), "line 2: a second"),
            (
                format!("{secret}\n{good}\n{good}"),
                "line 3: this key's hash",
            ),
            (
                format!("{secret}\nkey a write sha256:00"),
                "unknown scope \"write\"",
            ),
            (format!("{secret}\nkey a read md5:00"), "sha256:"),
            (format!("{secret}\nkey a/b read sha256:00"), "name \"a/b\""),
            (format!("{secret}\n{good} extra"), "line 2: expected"),
            (
                format!("{secret}\n{}", good.replace("rate=none", "rate=0")),
                "rate=0",
            ),
            ("secret 12\n".into(), "64 hex digits"),
        ];
        for (text, expected) in cases {
            let error = ApiKeys::parse(&text).unwrap_err().to_string();
            assert!(
                error.contains(expected),
                "{error:?} should say {expected:?}"
            );
        }
        let ok = ApiKeys::parse(&format!("# keys\n\n{good}\n{secret}\n")).unwrap();
        assert_eq!(ok.keys.len(), 1);
    }
}
