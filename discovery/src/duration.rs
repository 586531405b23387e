//! Durations as upsync-dns's and upsync-sidecar's configuration files, command lines and HTTP
//! API accept them, and as Consul (Go) writes them. One syntax everywhere: `10s`, `250ms`,
//! `1m30s`, `2h` (humantime's), or a bare number of seconds (`30`, as in registrator's
//! `-resync`); what Consul is sent is Go's form (`10s`, `1500ms`).
use std::time::Duration;

/// Parses `10s`, `250ms`, `1m30s` or a bare number of seconds.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("`{s}` is not a duration (examples: 10s, 250ms, 1m30s, or 30 for seconds): {e}"))
}

/// Go's duration syntax as Consul parses it: whole seconds as `300s`, else milliseconds
/// (`1500ms`; below a millisecond is dropped).
pub fn format_go(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// `#[serde(with = "upsync_discovery::duration::serde")]`: reads a string in [`parse`]'s syntax
/// or a number of seconds, writes Go's form.
pub mod serde {
    use std::time::Duration;

    use serde::de::{self, Deserializer, Visitor};
    use serde::Serializer;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_go(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }

    pub(super) struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a duration such as \"10s\", \"250ms\", \"1m30s\", or a number of seconds")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            super::parse(v).map_err(E::custom)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(v))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            u64::try_from(v).map(Duration::from_secs).map_err(|_| E::custom(format!("{v} is not a duration: it is negative")))
        }
    }
}

/// As [`serde`](mod@serde), for an optional duration (absent or null: None).
pub mod serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::serde::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "super::serde")] Duration);
        Ok(Option::<Wrapped>::deserialize(d)?.map(|Wrapped(v)| v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_humantime_and_bare_seconds_and_writes_go() {
        assert_eq!(parse("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse(" 250ms "), Ok(Duration::from_millis(250)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse("soon").unwrap_err().contains("`soon` is not a duration"));
        assert_eq!(format_go(Duration::from_secs(10)), "10s");
        assert_eq!(format_go(Duration::from_millis(1500)), "1500ms");
        for d in [Duration::from_secs(0), Duration::from_millis(1), Duration::from_secs(3600)] {
            assert_eq!(parse(&format_go(d)), Ok(d));
        }
    }

    #[test]
    fn serde_takes_strings_and_numbers() {
        #[derive(::serde::Deserialize, ::serde::Serialize, PartialEq, Debug)]
        struct C {
            #[serde(with = "super::serde")]
            a: Duration,
            #[serde(default, with = "super::serde_opt")]
            b: Option<Duration>,
        }
        let c: C = serde_json::from_str(r#"{"a": "2s", "b": 5}"#).unwrap();
        assert_eq!(c, C { a: Duration::from_secs(2), b: Some(Duration::from_secs(5)) });
        let c: C = serde_json::from_str(r#"{"a": 7}"#).unwrap();
        assert_eq!(c.b, None);
        assert_eq!(serde_json::to_string(&C { a: Duration::from_millis(1500), b: None }).unwrap(), r#"{"a":"1500ms","b":null}"#);
        assert!(serde_json::from_str::<C>(r#"{"a": -1}"#).unwrap_err().to_string().contains("negative"));
    }
}
