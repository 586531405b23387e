//! Decoders from Consul's JSON responses to endpoint sets.
//!
//! A malformed body (not JSON, not the shape this endpoint returns) is an `Err`: the caller
//! keeps its last good set. A malformed entry inside a good body (bad key, bad port, bad
//! attribute value) is left out and reported in [`Decoded::skipped`] with the reason, so the
//! caller can log it. No input makes these functions panic (see the proptest and fuzz corpus).
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::endpoint::{split_host_port, Endpoint, EndpointSet, Health, Host};

/// A decoded value and the entries that were left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decoded<T> {
    pub value: T,
    pub skipped: Vec<Skipped>,
}

/// An entry left out of a decoded set: its key (KV key, or `node/service-id` for catalog
/// and health entries) and why.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Skipped {
    pub key: String,
    pub reason: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// A body that cannot be decoded at all.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {message}")]
pub struct DecodeError {
    /// The kind of response expected (`KV list`, `health service list`...).
    pub what: &'static str,
    pub message: String,
}

/// What to do with a health-service instance whose checks are not all passing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum HealthMode {
    /// Keep it with `down = true` (nginx-upsync-module's `consul_health` behaviour).
    #[default]
    MarkDown,
    /// Leave it out of the set.
    Omit,
}

fn body_error(what: &'static str, e: serde_json::Error) -> DecodeError {
    DecodeError { what, message: format!("invalid JSON ({e})") }
}

/// Consul answers 404 with an empty body for a KV prefix with no keys.
fn is_blank(body: &[u8]) -> bool {
    body.iter().all(u8::is_ascii_whitespace) || body == b"null"
}

// ---------------------------------------------------------------------------------------------
// Attribute values: numbers or strings, as nginx-upsync-module reads them.

/// An attribute value as found in a KV value's JSON or a `name=value` tag.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Attr<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'a str),
}

impl<'de: 'a, 'a> Deserialize<'de> for Attr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Attr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number, a string or a boolean")
            }
            fn visit_unit<E>(self) -> Result<Attr<'de>, E> {
                Ok(Attr::Null)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Attr<'de>, E> {
                Ok(Attr::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Attr<'de>, E> {
                Ok(Attr::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Attr<'de>, E> {
                Ok(i64::try_from(v).map(Attr::Int).unwrap_or(Attr::Float(v as f64)))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Attr<'de>, E> {
                Ok(Attr::Float(v))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Attr<'de>, E> {
                Ok(Attr::Str(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Attr<'de>, E> {
                // An escaped string cannot be borrowed; no valid attribute needs escapes.
                Err(E::custom(format!("attribute value {v:?} contains escapes")))
            }
        }
        d.deserialize_any(V)
    }
}

impl Attr<'_> {
    /// A non-negative integer, from a number (integral) or a decimal string.
    fn uint(&self, name: &str) -> Result<Option<u64>, String> {
        match *self {
            Attr::Null => Ok(None),
            Attr::Int(i) if i >= 0 => Ok(Some(i as u64)),
            Attr::Float(f) if f >= 0.0 && f.fract() == 0.0 && f <= u32::MAX as f64 => Ok(Some(f as u64)),
            Attr::Str(s) => {
                let t = s.trim();
                if t.is_empty() {
                    return Ok(None);
                }
                t.parse::<u64>().map(Some).map_err(|_| format!("{name}={s:?} is not a non-negative integer"))
            }
            other => Err(format!("{name}={} is not a non-negative integer", other.show())),
        }
    }

    /// A flag: numbers (non-zero = set), booleans, `"0"`/`"1"`/`"true"`/`"false"`.
    fn flag(&self, name: &str) -> Result<Option<bool>, String> {
        match *self {
            Attr::Null => Ok(None),
            Attr::Bool(b) => Ok(Some(b)),
            Attr::Int(i) if i >= 0 => Ok(Some(i != 0)),
            Attr::Float(f) if f >= 0.0 => Ok(Some(f != 0.0)),
            Attr::Str(s) => match s.trim() {
                "" => Ok(None),
                "true" | "on" | "yes" => Ok(Some(true)),
                "false" | "off" | "no" => Ok(Some(false)),
                t => t.parse::<u64>().map(|n| Some(n != 0)).map_err(|_| format!("{name}={s:?} is not 0/1 or true/false")),
            },
            other => Err(format!("{name}={} is not 0/1 or true/false", other.show())),
        }
    }

    /// Seconds: a number, or a string `N`, `Ns`, `Nm`, `Nh` (nginx time units; `ms` rounds up).
    fn seconds(&self, name: &str) -> Result<Option<u64>, String> {
        match *self {
            Attr::Str(s) => {
                let t = s.trim();
                if t.is_empty() {
                    return Ok(None);
                }
                parse_seconds(t).map(Some).ok_or_else(|| format!("{name}={s:?} is not a duration (10, 10s, 1m, 1h)"))
            }
            _ => self.uint(name),
        }
    }

    fn show(&self) -> String {
        match self {
            Attr::Null => "null".into(),
            Attr::Bool(b) => b.to_string(),
            Attr::Int(i) => i.to_string(),
            Attr::Float(f) => f.to_string(),
            Attr::Str(s) => format!("{s:?}"),
        }
    }
}

fn parse_seconds(t: &str) -> Option<u64> {
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let s = match unit {
        "" | "s" => n,
        "ms" => n.div_ceil(1000),
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86400)?,
        _ => return None,
    };
    Some(s)
}

/// Attributes that can be set on an endpoint, from either source.
#[derive(Default)]
struct Attrs<'a> {
    weight: Option<Attr<'a>>,
    max_fails: Option<Attr<'a>>,
    fail_timeout: Option<Attr<'a>>,
    down: Option<Attr<'a>>,
    backup: Option<Attr<'a>>,
}

impl Attrs<'_> {
    fn apply(&self, e: &mut Endpoint) -> Result<(), String> {
        if let Some(w) = self.weight.as_ref().map(|a| a.uint("weight")).transpose()?.flatten() {
            if w == 0 || w > u32::MAX as u64 {
                return Err(format!("weight={w} is out of range (1-{})", u32::MAX));
            }
            e.weight = w as u32;
        }
        if let Some(v) = self.max_fails.as_ref().map(|a| a.uint("max_fails")).transpose()?.flatten() {
            e.max_fails = u32::try_from(v).map_err(|_| format!("max_fails={v} is out of range"))?;
        }
        if let Some(v) = self.fail_timeout.as_ref().map(|a| a.seconds("fail_timeout")).transpose()?.flatten() {
            e.fail_timeout = u32::try_from(v).map_err(|_| format!("fail_timeout={v} is out of range"))?;
        }
        if let Some(v) = self.down.as_ref().map(|a| a.flag("down")).transpose()?.flatten() {
            e.down = v;
        }
        if let Some(v) = self.backup.as_ref().map(|a| a.flag("backup")).transpose()?.flatten() {
            e.backup = v;
        }
        Ok(())
    }
}

/// The JSON object stored as a KV value.
#[derive(Deserialize)]
struct KvAttrs<'a> {
    #[serde(borrow, default)]
    weight: Option<Attr<'a>>,
    #[serde(borrow, default)]
    max_fails: Option<Attr<'a>>,
    #[serde(borrow, default)]
    fail_timeout: Option<Attr<'a>>,
    #[serde(borrow, default)]
    down: Option<Attr<'a>>,
    #[serde(borrow, default)]
    backup: Option<Attr<'a>>,
}

/// Attributes from service tags: `weight=N`, `max_fails=N`, `fail_timeout=T`, `down`, `backup`
/// (also `down=1`, `backup=0`). Other tags are ignored here and kept in `Endpoint::tags`.
fn tag_attrs(tags: &[String]) -> Attrs<'_> {
    let mut a = Attrs::default();
    for t in tags {
        let (k, v) = match t.split_once('=') {
            Some((k, v)) => (k.trim(), Attr::Str(v)),
            None => (t.trim(), Attr::Bool(true)),
        };
        match k {
            "weight" => a.weight = Some(v),
            "max_fails" => a.max_fails = Some(v),
            "fail_timeout" => a.fail_timeout = Some(v),
            "down" => a.down = Some(v),
            "backup" => a.backup = Some(v),
            _ => {}
        }
    }
    a
}

// ---------------------------------------------------------------------------------------------
// KV

#[derive(Deserialize)]
struct KvEntry<'a> {
    #[serde(rename = "Key", borrow)]
    key: Cow<'a, str>,
    #[serde(rename = "Value", borrow, default)]
    value: Option<Cow<'a, str>>,
}

/// Decodes `GET /v1/kv/PREFIX?recurse`. Keys directly under `PREFIX/` name the server:
/// `IP:PORT`, `[IPv6]:PORT` or `HOSTNAME:PORT`; the value is a JSON object with `weight`,
/// `max_fails`, `fail_timeout`, `down`, `backup` as numbers or strings; an empty value means
/// the defaults. The prefix itself (a "folder" key) and keys outside `PREFIX/` are ignored;
/// nested keys and bad names or values are skipped with a reason. An empty or `null` body
/// (Consul's 404 for a prefix without keys) is an empty set.
pub fn decode_kv(prefix: &str, body: &[u8]) -> Result<Decoded<EndpointSet>, DecodeError> {
    const WHAT: &str = "KV list";
    if is_blank(body) {
        return Ok(Decoded::default());
    }
    if let Some(entries) = scan_kv_list(body) {
        return Ok(kv_endpoints(prefix, entries.iter().map(|e| (e.key, e.value))));
    }
    let entries: Vec<KvEntry> = serde_json::from_slice(body).map_err(|e| body_error(WHAT, e))?;
    Ok(kv_endpoints(prefix, entries.iter().map(|e| (&*e.key, e.value.as_deref()))))
}

/// One entry of a KV list as Consul sends it, borrowed from the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct KvRef<'a> {
    key: &'a str,
    /// Base64; `None` for `null` or no `Value`.
    value: Option<&'a str>,
    /// 0 when absent.
    modify_index: u64,
}

/// Reads a KV list in the plain form Consul writes it (`[{"LockIndex":0,"Key":"...","Flags":0,
/// "Value":"..."|null,"CreateIndex":N,"ModifyIndex":N,"Session":"..."}, ...]`, indented or
/// not) without serde: a recursive read returns every key each time, and serde_json spent
/// ~4,000 instructions per entry on it (callgrind), most of them on the four fields nobody
/// reads; even with every string borrowed and the unread fields skipped it takes ~3,000 per
/// 180-byte entry, against ~1,800 for this scan (written by hand for that reason: it knows the
/// six fields and their shapes, where a JSON parser must be ready for any value anywhere). Anything outside that form (an escape or a control character in a string, a field
/// or a value of another kind, a duplicate `Key`, `Value` or `ModifyIndex`, a missing `Key`,
/// text after the list) gives `None`, and the caller decodes the body with serde_json: what
/// this accepts, serde_json reads the same way, so the result never depends on which read it.
fn scan_kv_list(body: &[u8]) -> Option<Vec<KvRef<'_>>> {
    // Checked once for the whole body: the strings are then slices of it (serde_json would
    // refuse a body that is not UTF-8 anyway, inside strings or out).
    let text = std::str::from_utf8(body).ok()?;
    let mut s = Scan { b: body, text, i: 0 };
    s.eat(b'[')?;
    let mut out = Vec::with_capacity(body.len() / 128);
    if s.peek()? == b']' {
        s.i += 1;
    } else {
        loop {
            out.push(s.kv_object()?);
            match s.next()? {
                b',' => {}
                b']' => break,
                _ => return None,
            }
        }
    }
    s.ws();
    (s.i == body.len()).then_some(out)
}

/// Bytes that end the plain part of a JSON string: `"`, `\` and control characters.
const STRING_STOP: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = true;
        c += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// Whether one of the eight bytes of `x` may be `"`, `\` or a control character (no false
/// negatives; a false positive only sends the caller to its byte-by-byte loop).
fn may_stop_string(x: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGH != 0;
    zero_byte(x ^ (ONES * u64::from(b'"'))) || zero_byte(x ^ (ONES * u64::from(b'\\'))) || x.wrapping_sub(ONES * 0x20) & !x & HIGH != 0
}

/// A cursor over a JSON text, for [`scan_kv_list`]: every method gives `None` for what it
/// does not expect.
struct Scan<'a> {
    b: &'a [u8],
    /// `b` as text.
    text: &'a str,
    i: usize,
}

impl<'a> Scan<'a> {
    fn ws(&mut self) {
        loop {
            // Consul indents its answers: eight spaces at a time.
            while self.b.get(self.i..self.i + 8) == Some(b"        ") {
                self.i += 8;
            }
            match self.b.get(self.i) {
                Some(b' ' | b'\n' | b'\r' | b'\t') => self.i += 1,
                _ => return,
            }
        }
    }

    /// The next byte after whitespace, not consumed.
    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    /// The next byte after whitespace, consumed.
    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    /// A string without escapes or control characters, its opening quote consumed already.
    fn string_rest(&mut self) -> Option<&'a str> {
        let start = self.i;
        // Eight bytes at a time while none of them can end the plain part.
        let mut len = 0;
        while let Some(chunk) = self.b.get(start + len..start + len + 8) {
            let x = u64::from_le_bytes(chunk.try_into().ok()?);
            if may_stop_string(x) {
                break;
            }
            len += 8;
        }
        len += self.b[start + len..].iter().position(|&c| STRING_STOP[c as usize])?;
        if self.b[start + len] != b'"' {
            return None;
        }
        self.i = start + len + 1;
        self.text.get(start..start + len)
    }

    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        self.string_rest()
    }

    /// A JSON integer that fits a u64 (no sign, fraction, exponent or leading zero).
    fn uint(&mut self) -> Option<u64> {
        self.ws();
        let start = self.i;
        let mut n = 0u64;
        while let Some(&c) = self.b.get(self.i) {
            if !c.is_ascii_digit() {
                break;
            }
            n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
            self.i += 1;
        }
        let digits = self.i - start;
        if digits == 0 || (digits > 1 && self.b[start] == b'0') || matches!(self.b.get(self.i), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        Some(n)
    }

    /// A JSON integer of any size (no sign, fraction, exponent or leading zero), not read:
    /// serde_json ignores the value of a field nobody reads, whatever its size.
    fn skip_uint(&mut self) -> Option<()> {
        self.ws();
        let digits = self.b[self.i..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 || (digits > 1 && self.b[self.i] == b'0') || matches!(self.b.get(self.i + digits), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        self.i += digits;
        Some(())
    }

    fn null(&mut self) -> Option<()> {
        self.b[self.i..].starts_with(b"null").then(|| self.i += 4)
    }

    /// A field name of a KV entry and its colon.
    fn field(&mut self) -> Option<Field> {
        self.eat(b'"')?;
        let rest = &self.b[self.i..];
        let (field, len): (Field, usize) = match rest.first()? {
            b'K' if rest.starts_with(b"Key\"") => (Field::Key, 4),
            b'V' if rest.starts_with(b"Value\"") => (Field::Value, 6),
            b'M' if rest.starts_with(b"ModifyIndex\"") => (Field::ModifyIndex, 12),
            b'L' if rest.starts_with(b"LockIndex\"") => (Field::Number, 10),
            b'F' if rest.starts_with(b"Flags\"") => (Field::Number, 6),
            b'C' if rest.starts_with(b"CreateIndex\"") => (Field::Number, 12),
            b'S' if rest.starts_with(b"Session\"") => (Field::Session, 8),
            _ => return None,
        };
        self.i += len;
        self.eat(b':')?;
        Some(field)
    }

    /// One `{...}` entry of the list.
    fn kv_object(&mut self) -> Option<KvRef<'a>> {
        self.eat(b'{')?;
        let (mut key, mut value, mut modify_index) = (None, None, None);
        loop {
            match self.field()? {
                Field::Key if key.is_none() => key = Some(self.string()?),
                Field::Value if value.is_none() => {
                    value = Some(match self.next()? {
                        b'n' => {
                            self.i -= 1;
                            self.null()?;
                            None
                        }
                        b'"' => Some(self.string_rest()?),
                        _ => return None,
                    })
                }
                Field::ModifyIndex if modify_index.is_none() => modify_index = Some(self.uint()?),
                Field::Number => self.skip_uint()?,
                Field::Session => {
                    self.string()?;
                }
                // A second Key, Value or ModifyIndex.
                _ => return None,
            }
            match self.next()? {
                b',' => {}
                b'}' => break,
                _ => return None,
            }
        }
        Some(KvRef { key: key?, value: value.flatten(), modify_index: modify_index.unwrap_or(0) })
    }
}

/// The fields of a KV entry [`Scan`] reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Key,
    Value,
    ModifyIndex,
    /// `LockIndex`, `Flags`, `CreateIndex`: integers nobody reads.
    Number,
    /// A lock's session ID.
    Session,
}

/// The entries of the last KV answer decoded for one prefix, each with what it decoded to, in
/// the answer's (key) order: [`decode_kv_cached`] decodes again only the entries whose key,
/// value or `ModifyIndex` differ from the last answer's. A recursive KV read returns every key
/// of the prefix each time, and one change in a list of 20,000 servers otherwise costs 20,000
/// decodes (name, base64, the value's JSON). Kept by a [`crate::Watch`] of [`crate::Query::Kv`];
/// the watch clears it when Consul's index goes backwards (a restored snapshot, another
/// cluster), so such an answer is decoded whole.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    /// The prefix the entries were decoded for (without its slashes): the entries hold the
    /// part of the key after it.
    dir: String,
    entries: Vec<KvCached>,
}

#[derive(Clone, Debug)]
struct KvCached {
    /// The key after `dir/`.
    name: Box<str>,
    /// The value as Consul sent it (base64).
    value: Option<Box<str>>,
    modify_index: u64,
    /// What the entry decoded to: a server, or why it was skipped.
    server: Result<KvServer, Box<str>>,
}

/// A server decoded from a KV entry: what [`kv_endpoint`] sets on an [`Endpoint`] (the rest
/// stays at [`Endpoint::new`]'s defaults), small enough to keep for every key.
#[derive(Clone, Debug, PartialEq, Eq)]
struct KvServer {
    host: Host,
    port: u16,
    weight: u32,
    max_fails: u32,
    fail_timeout: u32,
    down: bool,
    backup: bool,
}

impl KvServer {
    fn of(e: Endpoint) -> KvServer {
        KvServer {
            host: e.host,
            port: e.port,
            weight: e.weight,
            max_fails: e.max_fails,
            fail_timeout: e.fail_timeout,
            down: e.down,
            backup: e.backup,
        }
    }

    fn endpoint(&self) -> Endpoint {
        let mut e = Endpoint::new(self.host.clone(), self.port);
        e.weight = self.weight;
        e.max_fails = self.max_fails;
        e.fail_timeout = self.fail_timeout;
        e.down = self.down;
        e.backup = self.backup;
        e
    }
}

impl KvCache {
    /// Forgets every entry: the next answer is decoded whole.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// The entries kept (those of the last answer under the prefix).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Tests: marks every server kept (weight 99), so one taken from the cache by the next
    /// decode shows in its result (an entry decoded again has its own weight).
    #[cfg(test)]
    pub(crate) fn poison(&mut self) {
        for c in &mut self.entries {
            if let Ok(s) = c.server.as_mut() {
                s.weight = 99;
            }
        }
    }
}

/// [`decode_kv`], decoding only the entries that changed since the answer `cache` holds: an
/// entry with the same key, value and `ModifyIndex` as there gives what it gave then (the
/// decode of an entry depends on nothing else). Consul lists keys in byte order, so the two
/// answers are walked side by side; an answer in another order only finds fewer entries in
/// the cache. The result is always the one [`decode_kv`] gives for `body`; a body outside
/// Consul's plain form (see [`scan_kv_list`]) is decoded by [`decode_kv`] itself, and leaves
/// `cache` as it was.
pub fn decode_kv_cached(prefix: &str, body: &[u8], cache: &mut KvCache) -> Result<Decoded<EndpointSet>, DecodeError> {
    let dir = prefix.trim_start_matches('/').trim_end_matches('/');
    if cache.dir != dir {
        cache.entries.clear();
        cache.dir = dir.to_string();
    }
    if is_blank(body) {
        cache.entries.clear();
        return Ok(Decoded::default());
    }
    let Some(entries) = scan_kv_list(body) else {
        // Not in Consul's plain form: serde_json reads it (or refuses it), without the cache.
        return decode_kv(prefix, body);
    };
    let mut old = std::mem::take(&mut cache.entries).into_iter().peekable();
    let mut kept = Vec::with_capacity(entries.len());
    let mut endpoints = Vec::with_capacity(entries.len());
    let mut skipped = Vec::new();
    for entry in &entries {
        let key = entry.key;
        let Some(name) = name_under(dir, key) else { continue };
        let value = entry.value;
        // Entries of the last answer before this key are gone (deleted, or out of order).
        while old.next_if(|o| &*o.name < name).is_some() {}
        let same = |o: &KvCached| &*o.name == name && o.modify_index == entry.modify_index && o.value.as_deref() == value;
        let cached = match old.next_if(same) {
            Some(o) => o,
            None => KvCached {
                name: name.into(),
                value: value.map(Into::into),
                modify_index: entry.modify_index,
                server: kv_endpoint(name, value).map(KvServer::of).map_err(String::into_boxed_str),
            },
        };
        match &cached.server {
            Ok(s) => endpoints.push(s.endpoint()),
            Err(reason) => skipped.push(Skipped { key: key.to_string(), reason: reason.to_string() }),
        }
        kept.push(cached);
    }
    cache.entries = kept;
    Ok(finish(endpoints, skipped, |e| e.addr()))
}

/// The part of `key` after `dir/`, if `key` names something in the folder `dir` (not the
/// folder key itself, nor a sibling like `dir2/...`); `dir` `""`: every key.
fn name_under<'k>(dir: &str, key: &'k str) -> Option<&'k str> {
    let rest = if dir.is_empty() { key } else { key.strip_prefix(dir)?.strip_prefix('/')? };
    (!rest.is_empty()).then_some(rest)
}

/// The endpoints of `prefix` among `(key, value)` KV entries (the rules of [`decode_kv`]).
fn kv_endpoints<'a>(prefix: &str, entries: impl Iterator<Item = (&'a str, Option<&'a str>)>) -> Decoded<EndpointSet> {
    let prefix = prefix.trim_start_matches('/');
    endpoints_under(prefix.trim_end_matches('/'), entries, kv_endpoint)
}

/// The endpoints of the key folder `dir` among `(key, value)` entries whose values are the raw
/// JSON text (etcd's, once its base64 is undone), by the rules of [`decode_kv`]. `dir` is taken
/// as stored (an etcd key may begin with `/`), without its trailing `/`; `""`: every key.
pub fn kv_endpoints_raw<'a>(dir: &str, entries: impl Iterator<Item = (&'a str, &'a [u8])>) -> Decoded<EndpointSet> {
    endpoints_under(dir, entries, kv_endpoint_raw)
}

fn endpoints_under<'a, V>(
    dir: &str,
    entries: impl Iterator<Item = (&'a str, V)>,
    endpoint: impl Fn(&str, V) -> Result<Endpoint, String>,
) -> Decoded<EndpointSet> {
    let mut skipped = Vec::new();
    let mut endpoints = Vec::new();
    for (key, value) in entries {
        // Not siblings like PREFIX2/..., nor the folder key PREFIX or PREFIX/ itself.
        let Some(rest) = name_under(dir, key) else { continue };
        match endpoint(rest, value) {
            Ok(e) => endpoints.push(e),
            Err(reason) => skipped.push(Skipped { key: key.to_string(), reason }),
        }
    }
    finish(endpoints, skipped, |e| e.addr())
}

/// One entry of a recursive KV read kept whole (see [`KvTree`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvItem {
    pub key: String,
    /// The value as Consul sends it (base64), decoded only for the prefixes that changed.
    pub value: Option<String>,
    pub modify_index: u64,
}

#[derive(Deserialize)]
struct KvTreeEntry<'a> {
    #[serde(rename = "Key", borrow)]
    key: Cow<'a, str>,
    #[serde(rename = "Value", borrow, default)]
    value: Option<Cow<'a, str>>,
    #[serde(rename = "ModifyIndex", default)]
    modify_index: u64,
}

/// Every key under a KV root, sorted by key (`GET /v1/kv/ROOT?recurse`), for consumers that
/// serve many prefixes under one root from one blocking query: [`KvTree::endpoints`] gives one
/// prefix's endpoints as [`decode_kv`] would from a read of that prefix alone, and
/// [`KvTree::stamp`] tells whether a prefix changed between two reads without decoding it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvTree {
    items: Vec<KvItem>,
}

/// What identifies the state of one prefix in a [`KvTree`]: its number of keys and the
/// highest ModifyIndex among them. Any write under the prefix raises the highest index; a
/// delete alone lowers the count (an add and a delete together raise the index).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct KvStamp {
    pub keys: usize,
    pub max_modify_index: u64,
}

impl KvTree {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The entries whose key starts with `dir/` (and `dir` itself), found by binary search.
    fn under(&self, prefix: &str) -> &[KvItem] {
        let dir = prefix.trim_start_matches('/').trim_end_matches('/');
        if dir.is_empty() {
            return &self.items;
        }
        let lo = self.items.partition_point(|i| i.key.as_str() < dir);
        let tail = &self.items[lo..];
        // Keys starting with `dir` are contiguous; those after `dir/` with a byte above '/'
        // (`dir0`, `dirx`) are siblings and are ignored by `kv_endpoints`.
        let n = tail.partition_point(|i| i.key.starts_with(dir) && (i.key.len() == dir.len() || i.key.as_bytes()[dir.len()] <= b'/'));
        &tail[..n]
    }

    /// The state of `prefix` (see [`KvStamp`]).
    pub fn stamp(&self, prefix: &str) -> KvStamp {
        let items = self.under(prefix);
        let dir = prefix.trim_start_matches('/').trim_end_matches('/');
        let mine = items.iter().filter(|i| dir.is_empty() || i.key.len() == dir.len() || i.key.as_bytes()[dir.len()] == b'/');
        mine.fold(KvStamp::default(), |s, i| KvStamp { keys: s.keys + 1, max_modify_index: s.max_modify_index.max(i.modify_index) })
    }

    /// The endpoints of `prefix`, as [`decode_kv`] gives them from a read of `prefix` alone.
    pub fn endpoints(&self, prefix: &str) -> Decoded<EndpointSet> {
        kv_endpoints(prefix, self.under(prefix).iter().map(|i| (i.key.as_str(), i.value.as_deref())))
    }
}

/// Decodes `GET /v1/kv/ROOT?recurse` into a [`KvTree`]. An empty body or `null` (404) is an
/// empty tree.
pub fn decode_kv_tree(body: &[u8]) -> Result<KvTree, DecodeError> {
    const WHAT: &str = "KV tree";
    if is_blank(body) {
        return Ok(KvTree::default());
    }
    let mut items: Vec<KvItem> = match scan_kv_list(body) {
        Some(entries) => entries
            .into_iter()
            .map(|e| KvItem { key: e.key.to_owned(), value: e.value.map(str::to_owned), modify_index: e.modify_index })
            .collect(),
        None => {
            let entries: Vec<KvTreeEntry> = serde_json::from_slice(body).map_err(|e| body_error(WHAT, e))?;
            entries
                .into_iter()
                .map(|e| KvItem { key: e.key.into_owned(), value: e.value.map(Cow::into_owned), modify_index: e.modify_index })
                .collect()
        }
    };
    // Consul sends keys sorted; sorting again costs nothing then and keeps the binary searches
    // right whatever sits in between.
    items.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(KvTree { items })
}

fn kv_endpoint(name: &str, value: Option<&str>) -> Result<Endpoint, String> {
    let e = kv_name(name)?;
    let b64 = match value {
        None | Some("") => return Ok(e),
        Some(b64) => b64,
    };
    // Values are small: decode into the stack, not a fresh Vec per entry.
    let mut stack = [0u8; 512];
    let heap;
    let engine = &base64::engine::general_purpose::STANDARD;
    let raw: &[u8] = match engine.decode_slice(b64, &mut stack) {
        Ok(n) => &stack[..n],
        Err(base64::DecodeSliceError::OutputSliceTooSmall) => {
            heap = engine.decode(b64).map_err(|err| format!("value is not valid base64 ({err})"))?;
            &heap
        }
        Err(base64::DecodeSliceError::DecodeError(err)) => return Err(format!("value is not valid base64 ({err})")),
    };
    kv_value(e, raw)
}

/// A server from its name under the prefix and its value's JSON text (empty: the defaults).
fn kv_endpoint_raw(name: &str, raw: &[u8]) -> Result<Endpoint, String> {
    kv_value(kv_name(name)?, raw)
}

/// The server a key names (`IP:PORT`, `[IPv6]:PORT`, `HOSTNAME:PORT` under the prefix).
fn kv_name(name: &str) -> Result<Endpoint, String> {
    if name.contains('/') {
        return Err("nested key: servers must be named directly under the prefix (PREFIX/IP:PORT)".into());
    }
    let (host, port) = parse_server_name(name)?;
    Ok(Endpoint::new(host, port))
}

/// `e` with the attributes of a KV value's JSON text.
fn kv_value(mut e: Endpoint, raw: &[u8]) -> Result<Endpoint, String> {
    let not_object =
        |why: String| format!("value {:?} is not a JSON object of weight/max_fails/fail_timeout/down/backup ({why})", lossy_prefix(raw));
    match raw.iter().find(|b| !b.is_ascii_whitespace()) {
        None => return Ok(e),
        Some(b'{') => {}
        // serde would read a JSON array into the struct field by field.
        Some(_) => return Err(not_object("not an object".into())),
    }
    let attrs: KvAttrs = serde_json::from_slice(raw).map_err(|err| {
        format!("value {:?} is not a JSON object of weight/max_fails/fail_timeout/down/backup ({err})", lossy_prefix(raw))
    })?;
    Attrs { weight: attrs.weight, max_fails: attrs.max_fails, fail_timeout: attrs.fail_timeout, down: attrs.down, backup: attrs.backup }
        .apply(&mut e)?;
    Ok(e)
}

fn lossy_prefix(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(&raw[..raw.len().min(64)]).into_owned();
    if raw.len() > 64 {
        s + "..."
    } else {
        s
    }
}

/// `IP:PORT`, `[IPv6]:PORT`, `HOSTNAME:PORT`.
fn parse_server_name(name: &str) -> Result<(Host, u16), String> {
    let (host, port) = split_host_port(name)?;
    let port = match port {
        Some(p) => parse_port(p)?,
        None if name.matches(':').count() > 1 => {
            return Err(format!("`{name}`: write IPv6 addresses in brackets, e.g. [::1]:80"));
        }
        None => return Err(format!("`{name}` has no port (IP:PORT, [IPv6]:PORT or HOSTNAME:PORT)")),
    };
    Ok((Host::parse(host)?, port))
}

fn parse_port(p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(n) if n != 0 => Ok(n),
        _ => Err(format!("port `{p}` is not 1-65535")),
    }
}

fn port_from_i64(p: i64) -> Result<u16, String> {
    match u16::try_from(p) {
        Ok(n) if n != 0 => Ok(n),
        _ => Err(format!("port {p} is not 1-65535")),
    }
}

/// Builds the set; duplicates of one `host:port` are reported as skipped.
fn finish(endpoints: Vec<Endpoint>, mut skipped: Vec<Skipped>, key: impl Fn(&Endpoint) -> String) -> Decoded<EndpointSet> {
    let (set, dups) = EndpointSet::from_vec_reporting(endpoints);
    for d in dups {
        skipped.push(Skipped { key: key(&d), reason: format!("duplicate of server {}", d.addr()) });
    }
    Decoded { value: set, skipped }
}

// ---------------------------------------------------------------------------------------------
// Catalog and health

#[derive(Deserialize, Default)]
struct Weights {
    #[serde(rename = "Passing", default)]
    passing: Option<i64>,
}

#[derive(Deserialize)]
struct CatalogEntry<'a> {
    #[serde(rename = "Node", borrow, default)]
    node: Cow<'a, str>,
    #[serde(rename = "Address", borrow, default)]
    address: Cow<'a, str>,
    #[serde(rename = "ServiceID", default)]
    service_id: String,
    #[serde(rename = "ServiceName", default)]
    service_name: String,
    #[serde(rename = "ServiceTags", default)]
    service_tags: Option<Vec<String>>,
    #[serde(rename = "ServiceAddress", borrow, default)]
    service_address: Cow<'a, str>,
    #[serde(rename = "ServiceMeta", default)]
    service_meta: Option<BTreeMap<String, String>>,
    #[serde(rename = "ServicePort", default)]
    service_port: i64,
    #[serde(rename = "ServiceWeights", default)]
    service_weights: Option<Weights>,
}

/// The parts of a service instance the endpoint is built from.
struct Instance<'a> {
    node: &'a str,
    node_address: &'a str,
    id: String,
    name: String,
    tags: Vec<String>,
    address: &'a str,
    meta: BTreeMap<String, String>,
    port: i64,
    weights: Option<Weights>,
}

impl Instance<'_> {
    fn key(&self) -> String {
        format!("{}/{}", self.node, self.id)
    }

    /// Address = service address or else the node's; attributes from tags, weight from the
    /// tag, else Consul's `Weights.Passing`, else 1.
    fn endpoint(self, health: Health) -> Result<Endpoint, String> {
        let addr = if self.address.is_empty() { self.node_address } else { self.address };
        if addr.is_empty() {
            return Err("neither the service nor its node has an address".into());
        }
        let host = Host::parse(addr)?;
        let port = port_from_i64(self.port)?;
        let mut e = Endpoint::new(host, port);
        if let Some(w) = self.weights.and_then(|w| w.passing) {
            if w >= 1 && w <= u32::MAX as i64 {
                e.weight = w as u32;
            }
        }
        tag_attrs(&self.tags).apply(&mut e)?;
        e.health = health;
        e.tags = self.tags;
        e.meta = self.meta;
        e.node = Some(self.node.to_string());
        e.service = Some(self.name);
        e.service_id = Some(self.id);
        Ok(e)
    }
}

/// Decodes `GET /v1/catalog/service/NAME`: one endpoint per instance, health `Passing`
/// (the catalog has no health; use [`decode_health_service`] for that).
pub fn decode_catalog_service(body: &[u8]) -> Result<Decoded<EndpointSet>, DecodeError> {
    const WHAT: &str = "catalog service list";
    if is_blank(body) {
        return Ok(Decoded::default());
    }
    let entries: Vec<CatalogEntry> = serde_json::from_slice(body).map_err(|e| body_error(WHAT, e))?;
    let mut skipped = Vec::new();
    let mut endpoints = Vec::with_capacity(entries.len());
    for c in entries {
        let inst = Instance {
            node: &c.node,
            node_address: &c.address,
            id: c.service_id,
            name: c.service_name,
            tags: c.service_tags.unwrap_or_default(),
            address: &c.service_address,
            meta: c.service_meta.unwrap_or_default(),
            port: c.service_port,
            weights: c.service_weights,
        };
        let key = inst.key();
        match inst.endpoint(Health::Passing) {
            Ok(e) => endpoints.push(e),
            Err(reason) => skipped.push(Skipped { key, reason }),
        }
    }
    Ok(finish(endpoints, skipped, instance_key))
}

fn instance_key(e: &Endpoint) -> String {
    format!("{}/{}", e.node.as_deref().unwrap_or(""), e.service_id.as_deref().unwrap_or(""))
}

#[derive(Deserialize)]
struct HealthEntry<'a> {
    #[serde(rename = "Node", borrow)]
    node: HealthNode<'a>,
    #[serde(rename = "Service", borrow)]
    service: HealthServiceDef<'a>,
    #[serde(rename = "Checks", borrow, default)]
    checks: Option<Vec<HealthCheck<'a>>>,
}

#[derive(Deserialize)]
struct HealthNode<'a> {
    #[serde(rename = "Node", borrow, default)]
    node: Cow<'a, str>,
    #[serde(rename = "Address", borrow, default)]
    address: Cow<'a, str>,
}

#[derive(Deserialize)]
struct HealthServiceDef<'a> {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(rename = "Service", default)]
    service: String,
    #[serde(rename = "Tags", default)]
    tags: Option<Vec<String>>,
    #[serde(rename = "Address", borrow, default)]
    address: Cow<'a, str>,
    #[serde(rename = "Meta", default)]
    meta: Option<BTreeMap<String, String>>,
    #[serde(rename = "Port", default)]
    port: i64,
    #[serde(rename = "Weights", default)]
    weights: Option<Weights>,
}

#[derive(Deserialize)]
struct HealthCheck<'a> {
    #[serde(rename = "Status", borrow, default)]
    status: Cow<'a, str>,
}

/// Decodes `GET /v1/health/service/NAME`: health is the worst of the instance's checks (node
/// checks included, as Consul reports them); an instance not passing is `down`
/// ([`HealthMode::MarkDown`]) or left out ([`HealthMode::Omit`]). An unknown check status
/// counts as critical.
pub fn decode_health_service(body: &[u8], mode: HealthMode) -> Result<Decoded<EndpointSet>, DecodeError> {
    const WHAT: &str = "health service list";
    if is_blank(body) {
        return Ok(Decoded::default());
    }
    let entries: Vec<HealthEntry> = serde_json::from_slice(body).map_err(|e| body_error(WHAT, e))?;
    let mut skipped = Vec::new();
    let mut endpoints = Vec::with_capacity(entries.len());
    for h in entries {
        let health =
            h.checks.iter().flatten().map(|c| Health::from_consul(&c.status).unwrap_or(Health::Critical)).max().unwrap_or(Health::Passing);
        if mode == HealthMode::Omit && health != Health::Passing {
            continue;
        }
        let s = h.service;
        let inst = Instance {
            node: &h.node.node,
            node_address: &h.node.address,
            id: s.id,
            name: s.service,
            tags: s.tags.unwrap_or_default(),
            address: &s.address,
            meta: s.meta.unwrap_or_default(),
            port: s.port,
            weights: s.weights,
        };
        let key = inst.key();
        match inst.endpoint(health) {
            Ok(mut e) => {
                if health != Health::Passing {
                    e.down = true;
                }
                endpoints.push(e)
            }
            Err(reason) => skipped.push(Skipped { key, reason }),
        }
    }
    Ok(finish(endpoints, skipped, instance_key))
}

/// Decodes `GET /v1/catalog/services`: service name to its tags (sorted, deduplicated).
pub fn decode_services(body: &[u8]) -> Result<BTreeMap<String, Vec<String>>, DecodeError> {
    const WHAT: &str = "service list";
    if is_blank(body) {
        return Ok(BTreeMap::new());
    }
    let ServiceList(mut list) = serde_json::from_slice(body).map_err(|e| body_error(WHAT, e))?;
    for (_, tags) in list.iter_mut() {
        tags.sort_unstable();
        tags.dedup();
    }
    // Consul sends the names sorted: collecting a sorted Vec builds the map in one pass
    // (inserting while parsing costs a tree search per service).
    Ok(list.into_iter().collect())
}

/// The `/v1/catalog/services` object read into a Vec of (name, tags); `null` tags are empty.
struct ServiceList(Vec<(String, Vec<String>)>);

impl<'de> Deserialize<'de> for ServiceList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ServiceList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of service names to tag lists")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<ServiceList, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some((name, tags)) = map.next_entry::<String, Option<Vec<String>>>()? {
                    out.push((name, tags.unwrap_or_default()));
                }
                Ok(ServiceList(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests;

mod node_dump;
pub use node_dump::{
    decode_check_states, decode_health_instances, decode_instance_counts, decode_node_addresses, decode_node_dump, service_endpoints,
    CheckState,
};
