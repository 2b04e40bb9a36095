//! The kinds of value a key holds, as types: the field types of [`super::Config`].
//!
//! Each type checks a value the same way whichever layer gave it: the file gives TOML
//! values (a number, a switch, an array), a variable or a flag gives text. A value that does
//! not fit fails with `expected WHAT, got VALUE` (the caller prefixes the key and its
//! layer); a secret's value is never quoted. Serialising a value gives the form
//! `apex config show` prints and the built-in defaults are layered from, so secrets
//! serialise redacted (they have no built-in default).

use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use apex_server::settings::Secret;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A value as a layer gave it, before its kind is checked.
#[derive(Debug)]
enum Raw {
    Text(String),
    Int(i128),
    Float(f64),
    Bool(bool),
    Array(Vec<Raw>),
    Table,
    /// A TOML date or time.
    Date,
    Nothing,
}

/// The one key of the table a TOML date or time is read as.
const TOML_DATETIME: &str = "$__toml_private_datetime";

impl Raw {
    /// How an error quotes the value.
    fn shown(&self) -> String {
        match self {
            Raw::Text(text) => format!("{text:?}"),
            Raw::Array(_) => "an array".into(),
            Raw::Table => "a table (keys are flat)".into(),
            Raw::Date => "a date".into(),
            Raw::Nothing => "nothing".into(),
            plain => plain.text().unwrap_or_default(),
        }
    }

    /// The value as text, if it is a plain value: where the file gives a number or a
    /// switch, a variable or a flag gives the same text.
    fn text(&self) -> Option<String> {
        match self {
            Raw::Text(text) => Some(text.clone()),
            Raw::Int(n) => Some(n.to_string()),
            Raw::Float(x) => Some(format!("{x:?}")),
            Raw::Bool(b) => Some(b.to_string()),
            Raw::Array(_) | Raw::Table | Raw::Date | Raw::Nothing => None,
        }
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Raw, D::Error> {
        deserializer.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a configuration value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Raw, E> {
        Ok(Raw::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Raw, E> {
        Ok(Raw::Int(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Raw, E> {
        Ok(Raw::Int(v.into()))
    }
    fn visit_i128<E>(self, v: i128) -> Result<Raw, E> {
        Ok(Raw::Int(v))
    }
    fn visit_u128<E>(self, v: u128) -> Result<Raw, E> {
        Ok(Raw::Int(i128::try_from(v).unwrap_or(i128::MAX)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Raw, E> {
        Ok(Raw::Float(v))
    }
    fn visit_char<E>(self, v: char) -> Result<Raw, E> {
        Ok(Raw::Text(v.to_string()))
    }
    fn visit_str<E>(self, v: &str) -> Result<Raw, E> {
        Ok(Raw::Text(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Raw, E> {
        Ok(Raw::Text(v))
    }
    fn visit_unit<E>(self) -> Result<Raw, E> {
        Ok(Raw::Nothing)
    }
    fn visit_none<E>(self) -> Result<Raw, E> {
        Ok(Raw::Nothing)
    }
    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Raw, D::Error> {
        Raw::deserialize(deserializer)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Raw>()? {
            items.push(item);
        }
        Ok(Raw::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
        let mut date = false;
        while let Some((key, IgnoredAny)) = map.next_entry::<String, IgnoredAny>()? {
            date |= key == TOML_DATETIME;
        }
        Ok(if date { Raw::Date } else { Raw::Table })
    }
}

/// `expected WHAT, got VALUE`.
fn expected(what: &str, raw: &Raw) -> String {
    format!("expected {what}, got {}", raw.shown())
}

/// Deserialises each type through [`Raw`] and its `TryFrom<Raw>`, whose error is the
/// message.
macro_rules! deserialize_through_raw {
    ($(impl[$($generics:tt)*] $ty:ty;)*) => {$(
        impl<'de, $($generics)*> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                Self::try_from(Raw::deserialize(deserializer)?).map_err(de::Error::custom)
            }
        }
    )*};
}

deserialize_through_raw! {
    impl[const MIN: u64, const MAX: u64] Int<MIN, MAX>;
    impl[const MIN: i32, const MAX: i32] Number<MIN, MAX>;
    impl[] Switch;
    impl[] Text;
    impl[] PathValue;
    impl[] Addr;
    impl[] List;
    impl[] LogFormat;
    impl[] LlmProvider;
    impl[] MultitaskChoice;
    impl[const MIN_LEN: usize] SecretText<MIN_LEN>;
    impl[S: Schemes] SecretUrl<S>;
}

/// A whole number in `MIN..=MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub(super) struct Int<const MIN: u64, const MAX: u64>(u64);

impl<const MIN: u64, const MAX: u64> Int<MIN, MAX> {
    /// A built-in value; outside `MIN..=MAX` it is a bug (the defaults test finds it).
    pub(super) const fn new(n: u64) -> Self {
        assert!(MIN <= n && n <= MAX, "a default out of its key's range");
        Int(n)
    }
    fn what() -> String {
        match (MIN, MAX) {
            (1, max) if max >= u64::from(u32::MAX) => "a positive integer".into(),
            (1, max) => format!("a positive integer up to {max}"),
            (min, max) => format!("an integer from {min} to {max}"),
        }
    }
    pub(super) fn get(self) -> u64 {
        self.0
    }
    pub(super) fn to_u32(self) -> u32 {
        u32::try_from(self.0).unwrap_or(u32::MAX)
    }
    pub(super) fn to_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
    pub(super) fn millis(self) -> Duration {
        Duration::from_millis(self.0)
    }
    pub(super) fn secs(self) -> Duration {
        Duration::from_secs(self.0)
    }
}

impl<const MIN: u64, const MAX: u64> TryFrom<Raw> for Int<MIN, MAX> {
    type Error = String;
    fn try_from(raw: Raw) -> Result<Self, String> {
        let n = match &raw {
            Raw::Int(n) => u64::try_from(*n).ok(),
            Raw::Text(text) => text.trim().parse().ok(),
            _ => None,
        };
        match n {
            Some(n) if (MIN..=MAX).contains(&n) => Ok(Int(n)),
            _ => Err(expected(&Self::what(), &raw)),
        }
    }
}

/// A number in `MIN..=MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(transparent)]
pub(super) struct Number<const MIN: i32, const MAX: i32>(f64);

impl<const MIN: i32, const MAX: i32> Number<MIN, MAX> {
    /// A built-in value; outside `MIN..=MAX` it is a bug (the defaults test finds it).
    pub(super) fn new(x: f64) -> Self {
        assert!(f64::from(MIN) <= x && x <= f64::from(MAX));
        Number(x)
    }
    pub(super) fn get(self) -> f64 {
        self.0
    }
}

impl<const MIN: i32, const MAX: i32> TryFrom<Raw> for Number<MIN, MAX> {
    type Error = String;
    fn try_from(raw: Raw) -> Result<Self, String> {
        let x = match &raw {
            Raw::Float(x) => Some(*x),
            Raw::Int(n) => Some(*n as f64),
            Raw::Text(text) => text.trim().parse().ok(),
            _ => None,
        };
        match x {
            Some(x) if x.is_finite() && f64::from(MIN) <= x && x <= f64::from(MAX) => Ok(Number(x)),
            _ => Err(expected(&format!("a number from {MIN} to {MAX}"), &raw)),
        }
    }
}

/// `true` or `false` (also 1/0, yes/no, on/off).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub(super) struct Switch(bool);

impl Switch {
    pub(super) const OFF: Switch = Switch(false);
    pub(super) fn get(self) -> bool {
        self.0
    }
}

impl TryFrom<Raw> for Switch {
    type Error = String;
    fn try_from(raw: Raw) -> Result<Self, String> {
        let text = raw.text().unwrap_or_default().trim().to_ascii_lowercase();
        match text.as_str() {
            "true" | "1" | "yes" | "on" => Ok(Switch(true)),
            "false" | "0" | "no" | "off" => Ok(Switch(false)),
            _ => Err(expected("true or false", &raw)),
        }
    }
}

/// Any non-empty text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub(super) struct Text(String);

impl Text {
    pub(super) fn new(text: &str) -> Self {
        Text(text.to_owned())
    }
    pub(super) fn get(&self) -> &str {
        &self.0
    }
}

impl TryFrom<Raw> for Text {
    type Error = String;
    fn try_from(raw: Raw) -> Result<Self, String> {
        match raw.text() {
            Some(text) if !text.trim().is_empty() => Ok(Text(text)),
            _ => Err(expected("a non-empty text", &raw)),
        }
    }
}

/// A file or folder path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub(super) struct PathValue(PathBuf);

impl PathValue {
    pub(super) fn new(path: &str) -> Self {
        PathValue(path.into())
    }
    pub(super) fn get(&self) -> &Path {
        &self.0
    }
}

impl TryFrom<Raw> for PathValue {
    type Error = String;
    fn try_from(raw: Raw) -> Result<Self, String> {
        match raw.text() {
            Some(text) if !text.trim().is_empty() => Ok(PathValue(text.into())),
            _ => Err(expected("a path", &raw)),
        }
    }
}

/// `HOST:PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Addr(SocketAddr);

impl Addr {
    pub(super) fn new(addr: SocketAddr) -> Self {
        Addr(addr)
    }
    pub(super) fn get(self) -> SocketAddr {
        self.0
    }
}

impl TryFrom<Raw> for Addr {
    type Error = String;
    fn try_from(raw: Raw) -> Result<Self, String> {
        raw.text()
            .and_then(|text| text.trim().parse().ok())
            .map(Addr)
            .ok_or_else(|| expected("HOST:PORT, e.g. 127.0.0.1:8000", &raw))
    }
}

impl Serialize for Addr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

/// Several texts: an array in the file (whose items may also hold commas), comma-separated
/// in a variable, a repeatable flag. Blank items are dropped.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(transparent)]
pub(super) struct List(Vec<String>);

impl List {
    pub(super) fn get(&self) -> &[String] {
        &self.0
    }
}

impl TryFrom<Raw> for List {
    type Error = String;
    fn try_from(raw: Raw) -> Result<Self, String> {
        let texts = match raw {
            Raw::Array(items) => items
                .into_iter()
                .map(|item| match item {
                    Raw::Text(text) => Ok(text),
                    other => Err(format!(
                        "expected an array of strings, got an element {}",
                        other.shown()
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?,
            other => vec![other
                .text()
                .ok_or_else(|| expected("an array of strings", &other))?],
        };
        Ok(List(
            texts
                .iter()
                .flat_map(|text| text.split(','))
                .map(|item| item.trim().to_string())
                .filter(|item| !item.is_empty())
                .collect(),
        ))
    }
}

/// An enum whose values are words, matched without regard to case.
macro_rules! choice {
    ($(#[$doc:meta])* $vis:vis enum $name:ident { $($variant:ident = $word:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        $vis enum $name {
            $($variant,)+
        }

        impl $name {
            const WORDS: &'static [&'static str] = &[$($word),+];

            fn word(self) -> &'static str {
                match self {
                    $(Self::$variant => $word,)+
                }
            }
        }

        impl TryFrom<Raw> for $name {
            type Error = String;
            fn try_from(raw: Raw) -> Result<Self, String> {
                let word = raw.text().unwrap_or_default().trim().to_ascii_lowercase();
                match word.as_str() {
                    $($word => Ok(Self::$variant),)+
                    _ => Err(expected(&format!("one of {}", Self::WORDS.join(", ")), &raw)),
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.word())
            }
        }
    };
}

choice! {
    /// How `apex serve` writes its log lines.
    pub enum LogFormat {
        Human = "human",
        Json = "json",
    }
}

choice! {
    /// What a message does to its thread's unfinished run (double-texting).
    pub(super) enum MultitaskChoice {
        Enqueue = "enqueue",
        Interrupt = "interrupt",
        Rollback = "rollback",
        Reject = "reject",
    }
}

choice! {
    /// Who writes the answers.
    pub(super) enum LlmProvider {
        Local = "local",
        Template = "template",
        OpenAi = "openai",
    }
}

/// A secret of at least `MIN_LEN` characters (surrounding blanks dropped): never quoted in
/// an error, serialised as `"***"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SecretText<const MIN_LEN: usize>(Secret);

impl<const MIN_LEN: usize> SecretText<MIN_LEN> {
    pub(super) fn get(&self) -> &Secret {
        &self.0
    }
}

impl<const MIN_LEN: usize> TryFrom<Raw> for SecretText<MIN_LEN> {
    type Error = String;
    fn try_from(raw: Raw) -> Result<Self, String> {
        match raw.text() {
            Some(text) if text.trim().chars().count() >= MIN_LEN.max(1) => {
                Ok(SecretText(Secret::new(text.trim())))
            }
            _ if MIN_LEN > 1 => Err(format!("expected at least {MIN_LEN} characters")),
            _ => Err("expected a non-empty text".into()),
        }
    }
}

impl<const MIN_LEN: usize> Serialize for SecretText<MIN_LEN> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("***")
    }
}

/// The URL schemes a [`SecretUrl`] accepts.
pub(super) trait Schemes {
    const PREFIXES: &'static [&'static str];
}

/// `database_url`: PostgreSQL or SQLite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DatabaseSchemes;
impl Schemes for DatabaseSchemes {
    const PREFIXES: &'static [&'static str] = &["sqlite:", "postgres://", "postgresql://"];
}

/// `bus_url`: Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BusSchemes;
impl Schemes for BusSchemes {
    const PREFIXES: &'static [&'static str] = &["redis://"];
}

/// A URL that may carry a password: never quoted in an error, serialised with the password
/// masked ([`redact_url`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SecretUrl<S>(Secret, PhantomData<S>);

impl<S> SecretUrl<S> {
    pub(super) fn get(&self) -> &Secret {
        &self.0
    }
}

impl<S: Schemes> TryFrom<Raw> for SecretUrl<S> {
    type Error = String;
    fn try_from(raw: Raw) -> Result<Self, String> {
        match raw.text() {
            Some(text) if S::PREFIXES.iter().any(|p| text.trim().starts_with(p)) => {
                Ok(SecretUrl(Secret::new(text.trim()), PhantomData))
            }
            _ => Err(format!(
                "expected a URL starting with {}",
                S::PREFIXES.join(" or ")
            )),
        }
    }
}

impl<S> Serialize for SecretUrl<S> {
    fn serialize<Ser: Serializer>(&self, serializer: Ser) -> Result<Ser::Ok, Ser::Error> {
        serializer.serialize_str(&redact_url(self.0.expose()))
    }
}

/// `postgres://user:***@host/db`: the password of a URL masked (in the user-info part and
/// in a `password=` query parameter).
pub(super) fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some(parts) => parts,
        None => return url.to_string(),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) if name.eq_ignore_ascii_case("password") => {
                        format!("{name}=***")
                    }
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}
