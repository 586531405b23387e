//! nginx-upsync-module's KV convention: one key per server, `PREFIX/IP:PORT`, whose value is a
//! JSON object of nginx server attributes. The sidecar writes it with [`KvValue::to_json`] and
//! [`kv_key`]; [`crate::decode_kv`] reads it.
use serde::Serialize;

use crate::endpoint::{host_port, Endpoint, Host, DEFAULT_FAIL_TIMEOUT, DEFAULT_MAX_FAILS, DEFAULT_WEIGHT};

/// The attributes stored as a KV value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct KvValue {
    pub weight: u32,
    pub max_fails: u32,
    /// Seconds.
    pub fail_timeout: u32,
    #[serde(serialize_with = "as_int")]
    pub down: bool,
    #[serde(serialize_with = "as_int")]
    pub backup: bool,
}

// nginx-upsync-module reads `down`/`backup` as integers (cJSON valueint): write 0/1, not
// true/false, so the C module reads our values too.
fn as_int<S: serde::Serializer>(b: &bool, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u8(u8::from(*b))
}

impl Default for KvValue {
    /// weight=1 max_fails=2 fail_timeout=10 down=0 backup=0.
    fn default() -> Self {
        KvValue { weight: DEFAULT_WEIGHT, max_fails: DEFAULT_MAX_FAILS, fail_timeout: DEFAULT_FAIL_TIMEOUT, down: false, backup: false }
    }
}

impl KvValue {
    /// `{"weight":1,"max_fails":2,"fail_timeout":10,"down":0,"backup":0}`
    pub fn to_json(&self) -> String {
        format!(
            r#"{{"weight":{},"max_fails":{},"fail_timeout":{},"down":{},"backup":{}}}"#,
            self.weight,
            self.max_fails,
            self.fail_timeout,
            u8::from(self.down),
            u8::from(self.backup)
        )
    }

    /// The attributes of `e`.
    pub fn from_endpoint(e: &Endpoint) -> KvValue {
        KvValue { weight: e.weight, max_fails: e.max_fails, fail_timeout: e.fail_timeout, down: e.down, backup: e.backup }
    }
}

/// `PREFIX/IP:PORT` (`PREFIX/[IPv6]:PORT`, `PREFIX/HOST:PORT`); a trailing `/` of the prefix
/// is not doubled.
pub fn kv_key(prefix: &str, host: &Host, port: u16) -> String {
    format!("{}/{}", prefix.trim_end_matches('/'), host_port(host, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::decode_kv;

    #[test]
    fn round_trips_through_decode_kv() {
        let v = KvValue { weight: 7, max_fails: 0, fail_timeout: 30, down: true, backup: false };
        assert_eq!(v.to_json(), r#"{"weight":7,"max_fails":0,"fail_timeout":30,"down":1,"backup":0}"#);
        assert_eq!(serde_json::to_string(&v).unwrap(), v.to_json());
        let host = Host::parse("::1").unwrap();
        let key = kv_key("upstreams/web/", &host, 8080);
        assert_eq!(key, "upstreams/web/[::1]:8080");
        use base64::Engine as _;
        let body = format!(r#"[{{"Key":"{key}","Value":"{}"}}]"#, base64::engine::general_purpose::STANDARD.encode(v.to_json()));
        let d = decode_kv("upstreams/web", body.as_bytes()).unwrap();
        assert!(d.skipped.is_empty(), "{:?}", d.skipped);
        let e = d.value.iter().next().unwrap();
        assert_eq!(KvValue::from_endpoint(e), v);
        assert_eq!(e.addr(), "[::1]:8080");
    }
}
