//! The `[consul]` table of upsync-dns's and upsync-sidecar's configuration files, defined once:
//! the same keys, the same `tls` table, the same token precedence and the same duration syntax
//! in both programs. A program embeds [`ConsulSection`] with `#[serde(flatten)]` next to keys
//! of its own (upsync-dns's `wait`, ...) or as the whole table (upsync-sidecar), then turns it
//! into a [`ConsulConfig`] with [`ConsulSection::resolve`].
//!
//! Token precedence, first found wins: the program's token-file flag; `token` or `token_file`
//! in the file (both set is an error); the `CONSUL_HTTP_TOKEN` environment variable. An empty
//! `token` or `CONSUL_HTTP_TOKEN` counts as not set. A token file must be readable and not
//! empty when the program starts (the client re-reads it when it changes).
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, IgnoredAny, Visitor};
use serde::Deserialize;

use super::{split_list, Consistency, ConsulAddr, ConsulConfig, Secret, TlsOptions};
use crate::error::Error;

/// The keys of the shared `[consul]` table, as the README lists them.
pub const KEYS: &[&str] = &["addresses", "token", "token_file", "datacenter", "consistency", "tls", "connect_timeout", "request_timeout"];

/// Keys of the `tls` table.
pub const TLS_KEYS: &[&str] = &["ca_file", "cert_file", "key_file", "server_name"];

/// The `[consul]` table as written. Every key is optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ConsulSection {
    addresses: Option<Addresses>,
    token: Option<Secret>,
    token_file: Option<PathBuf>,
    datacenter: Option<String>,
    consistency: Option<String>,
    tls: Option<TlsSection>,
    connect_timeout: Option<DurationText>,
    request_timeout: Option<DurationText>,
    /// upsync-sidecar's former flat TLS keys, now `tls.ca_file`, `tls.cert_file`, `tls.key_file`.
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    /// Whatever else the table holds: refused by [`ConsulSection::resolve`], naming the key
    /// (serde's `deny_unknown_fields` does not work together with `flatten`).
    #[serde(flatten)]
    unknown: BTreeMap<String, IgnoredAny>,
}

/// `tls = { ca_file = "...", cert_file = "...", key_file = "...", server_name = "..." }`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct TlsSection {
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    server_name: Option<String>,
}

/// What a program's command line may set over the file.
#[derive(Clone, Debug, Default)]
pub struct ConsulFlags {
    /// Comma-separated addresses (`--consul`).
    pub addresses: Option<String>,
    /// The token-file flag: wins over the file's `token` and `token_file`.
    pub token_file: Option<PathBuf>,
    pub datacenter: Option<String>,
    pub consistency: Option<String>,
}

impl ConsulSection {
    /// The client configuration: `flags` over the file over `defaults` (the program's, e.g.
    /// its `request_timeout`); `env_token` is `CONSUL_HTTP_TOKEN`, used when neither the flags
    /// nor the file give a token. `own_keys` are the program's own keys in `[consul]`, named
    /// in the message about an unknown key. Reads the token file (it must exist and not be
    /// empty); touches neither the network nor the TLS files.
    pub fn resolve(
        &self,
        defaults: ConsulConfig,
        flags: &ConsulFlags,
        env_token: Option<String>,
        own_keys: &[&str],
    ) -> Result<ConsulConfig, Error> {
        let bad = |msg: String| Error::Config(format!("[consul] {msg}"));
        if let Some(key) = self.unknown.keys().next() {
            let mut keys: Vec<&str> = KEYS.iter().chain(own_keys).copied().collect();
            keys.sort_unstable();
            return Err(bad(format!("unknown key `{key}`: the keys are {} (check the spelling)", keys.join(", "))));
        }
        let mut c = defaults;

        let (addresses, source) = match (&flags.addresses, &self.addresses) {
            (Some(a), _) => (split_list(a).collect(), "--consul"),
            (None, Some(a)) => (a.split(), "[consul] addresses"),
            (None, None) => (Vec::new(), ""),
        };
        if !source.is_empty() {
            if addresses.is_empty() {
                return Err(Error::Config(format!("{source}: no Consul address given; give one (default 127.0.0.1:8500)")));
            }
            c.addresses = addresses
                .iter()
                .map(|a| ConsulAddr::parse(a).map_err(|e| Error::Config(format!("{source}: {}", config_message(e)))))
                .collect::<Result<_, _>>()?;
        }

        // Token: the flag, else the file, else the environment.
        c.token = None;
        c.token_file = None;
        let file_token = self.token.clone().filter(|t| !t.expose().trim().is_empty());
        match (&flags.token_file, file_token, &self.token_file) {
            (Some(p), _, _) => c.token_file = Some(checked_token_file(p, "the token file given on the command line")?),
            (None, Some(_), Some(_)) => {
                return Err(bad("token and token_file are both set: keep one (token_file keeps the token out of this file \
                                and is re-read when the token is rotated)"
                    .into()))
            }
            (None, Some(t), None) => c.token = Some(t),
            (None, None, Some(p)) => c.token_file = Some(checked_token_file(p, "[consul] token_file")?),
            (None, None, None) => c.token = env_token.filter(|t| !t.trim().is_empty()).map(Secret::new),
        }

        if let Some(dc) = flags.datacenter.as_ref().or(self.datacenter.as_ref()) {
            c.datacenter = Some(dc.clone());
        }
        if let Some(mode) = flags.consistency.as_ref().or(self.consistency.as_ref()) {
            c.consistency = mode.parse::<Consistency>().map_err(|e| bad(format!("consistency: {}", config_message(e))))?;
        }

        c.tls = self.tls_options()?.or(c.tls);
        if let Some(t) = &c.tls {
            if t.cert_file.is_some() != t.key_file.is_some() {
                return Err(bad("tls: a client certificate needs both cert_file and key_file; give both, or neither".into()));
            }
        }

        for (key, value, slot) in [
            ("connect_timeout", &self.connect_timeout, &mut c.connect_timeout),
            ("request_timeout", &self.request_timeout, &mut c.request_timeout),
        ] {
            if let Some(DurationText(text)) = value {
                let d = crate::duration::parse(text).map_err(|e| bad(format!("{key}: {e}")))?;
                if d.is_zero() {
                    return Err(bad(format!("{key} = {text:?}: must be above zero (default {})", crate::duration::format_go(*slot))));
                }
                *slot = d;
            }
        }
        c.validate().map_err(|e| bad(config_message(e)))?;
        Ok(c)
    }

    /// One warning per former key the file still uses, naming the key to write instead. The
    /// programs log them at start (and upsync-dns's `--check-config` prints them).
    pub fn deprecations(&self) -> Vec<String> {
        [("ca_file", self.ca_file.is_some()), ("cert_file", self.cert_file.is_some()), ("key_file", self.key_file.is_some())]
            .into_iter()
            .filter(|(_, used)| *used)
            .map(|(key, _)| {
                format!("[consul] {key} is deprecated: write it in the tls table, tls = {{ {key} = \"...\" }} (the key tls.{key})")
            })
            .collect()
    }

    /// The `tls` table merged with the former flat keys; `None` when neither is there.
    fn tls_options(&self) -> Result<Option<TlsOptions>, Error> {
        let old = [&self.ca_file, &self.cert_file, &self.key_file];
        if self.tls.is_none() && old.iter().all(|o| o.is_none()) {
            return Ok(None);
        }
        let t = self.tls.clone().unwrap_or_default();
        let pick = |key: &str, new: Option<PathBuf>, old: &Option<PathBuf>| match (new, old) {
            (Some(_), Some(_)) => {
                Err(Error::Config(format!("[consul] both {key} and tls.{key} are set: keep tls.{key} ({key} is its former spelling)")))
            }
            (new, old) => Ok(new.or_else(|| old.clone())),
        };
        Ok(Some(TlsOptions {
            ca_file: pick("ca_file", t.ca_file, &self.ca_file)?,
            cert_file: pick("cert_file", t.cert_file, &self.cert_file)?,
            key_file: pick("key_file", t.key_file, &self.key_file)?,
            server_name: t.server_name,
        }))
    }
}

fn checked_token_file(path: &Path, what: &str) -> Result<PathBuf, Error> {
    crate::client::read_token_file(path).map_err(|e| Error::Config(format!("{what}: {e}")))?;
    Ok(path.to_path_buf())
}

fn config_message(e: Error) -> String {
    match e {
        Error::Config(m) => m,
        other => other.to_string(),
    }
}

/// `addresses = "a:8500,b:8500"` or `addresses = ["a:8500", "b:8500"]`: one string or a list,
/// each a comma-separated list.
#[derive(Clone, Debug, Deserialize)]
// serde's message when neither fits (the position toml gives is the [consul] table's, hence the key).
#[serde(untagged, expecting = "addresses: expected a Consul address or a list of them, such as [\"127.0.0.1:8500\"]")]
enum Addresses {
    One(String),
    List(Vec<String>),
}

impl Addresses {
    fn split(&self) -> Vec<&str> {
        let items = match self {
            Addresses::One(a) => std::slice::from_ref(a),
            Addresses::List(list) => list.as_slice(),
        };
        items.iter().flat_map(|a| split_list(a)).collect()
    }
}

/// A duration as written (`"10s"` or a number of seconds), parsed by [`ConsulSection::resolve`]
/// with [`crate::duration::parse`] so that a mistake is reported with its key.
#[derive(Clone, Debug)]
struct DurationText(String);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DurationText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as \"10s\", \"250ms\", \"1m30s\", or a number of seconds")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DurationText, E> {
                Ok(DurationText(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<DurationText, E> {
                Ok(DurationText(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<DurationText, E> {
                Ok(DurationText(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn section(text: &str) -> ConsulSection {
        toml::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn resolve(text: &str, flags: &ConsulFlags, env: Option<&str>) -> Result<ConsulConfig, Error> {
        section(text).resolve(ConsulConfig::default(), flags, env.map(str::to_string), &[])
    }

    fn err(text: &str) -> String {
        resolve(text, &ConsulFlags::default(), None).unwrap_err().to_string()
    }

    /// A token file in a fresh temporary directory.
    fn token_file(name: &str, content: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("upsync-discovery-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("token");
        std::fs::write(&p, content).unwrap();
        p
    }

    #[test]
    fn every_key_and_the_defaults() {
        let c = resolve("", &ConsulFlags::default(), None).unwrap();
        assert_eq!(c, ConsulConfig::default());
        let c = resolve(
            r#"
            addresses = ["https://c1:8501", "c2:8500,c3"]
            token = "t"
            datacenter = "dc2"
            consistency = "stale"
            tls = { ca_file = "/ca.pem", cert_file = "/c.pem", key_file = "/k.pem", server_name = "server.dc2.consul" }
            connect_timeout = "1500ms"
            request_timeout = 30
            "#,
            &ConsulFlags::default(),
            None,
        )
        .unwrap();
        let addrs: Vec<String> = c.addresses.iter().map(|a| a.to_string()).collect();
        assert_eq!(addrs, ["https://c1:8501", "http://c2:8500", "http://c3:8500"]);
        assert_eq!(c.token.as_ref().map(Secret::expose), Some("t"));
        assert_eq!((c.datacenter.as_deref(), c.consistency), (Some("dc2"), Consistency::Stale));
        let tls = c.tls.unwrap();
        assert_eq!(tls.ca_file.as_deref(), Some(Path::new("/ca.pem")));
        assert_eq!(tls.server_name.as_deref(), Some("server.dc2.consul"));
        assert_eq!((c.connect_timeout, c.request_timeout), (Duration::from_millis(1500), Duration::from_secs(30)));
        assert_eq!(resolve("addresses = \"a:1, b:2\"", &ConsulFlags::default(), None).unwrap().addresses.len(), 2);
    }

    #[test]
    fn the_former_flat_tls_keys_mean_the_tls_table_and_are_reported() {
        let old = section("ca_file = \"/ca.pem\"\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"");
        let new = section("tls = { ca_file = \"/ca.pem\", cert_file = \"/c.pem\", key_file = \"/k.pem\" }");
        let flags = ConsulFlags::default();
        assert_eq!(
            old.resolve(ConsulConfig::default(), &flags, None, &[]).unwrap(),
            new.resolve(ConsulConfig::default(), &flags, None, &[]).unwrap()
        );
        assert!(new.deprecations().is_empty());
        let d = old.deprecations();
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].contains("ca_file is deprecated") && d[0].contains("tls.ca_file"), "{d:?}");
        assert!(err("ca_file = \"/a\"\ntls = { ca_file = \"/b\" }").contains("keep tls.ca_file"));
    }

    #[test]
    fn token_precedence_flag_then_file_then_environment() {
        let file = token_file("precedence", "from-file\n");
        let flags = ConsulFlags { token_file: Some(file.clone()), ..Default::default() };
        let c = resolve("token = \"in-config\"", &flags, Some("from-env")).unwrap();
        assert_eq!((c.token, c.token_file.as_deref()), (None, Some(file.as_path())));
        let c = resolve("token = \"in-config\"", &ConsulFlags::default(), Some("from-env")).unwrap();
        assert_eq!(c.token.as_ref().map(Secret::expose), Some("in-config"));
        let c = resolve(&format!("token_file = {:?}", file.display().to_string()), &ConsulFlags::default(), Some("env")).unwrap();
        assert_eq!((c.token, c.token_file), (None, Some(file)));
        let c = resolve("", &ConsulFlags::default(), Some("from-env")).unwrap();
        assert_eq!(c.token.as_ref().map(Secret::expose), Some("from-env"));
        let c = resolve("token = \"\"", &ConsulFlags::default(), Some("from-env")).unwrap();
        assert_eq!(c.token.as_ref().map(Secret::expose), Some("from-env"), "an empty token is no token");
        assert_eq!(resolve("", &ConsulFlags::default(), Some(" ")).unwrap().token, None);
    }

    #[test]
    fn mistakes_name_the_key_and_what_to_do() {
        assert!(err("adresses = [\"a\"]").contains("unknown key `adresses`: the keys are addresses,"));
        assert!(err("token = \"a\"\ntoken_file = \"/b\"").contains("token and token_file are both set: keep one"));
        assert!(err("token_file = \"/nonexistent/upsync-token\"")
            .contains("[consul] token_file: cannot read the Consul ACL token file /nonexistent/upsync-token"));
        let empty = token_file("empty", " \n");
        assert!(err(&format!("token_file = {:?}", empty.display().to_string())).contains("is empty"));
        assert!(err("request_timeout = \"soon\"").contains("[consul] request_timeout: `soon` is not a duration"));
        assert!(err("connect_timeout = 0").contains("[consul] connect_timeout = \"0\": must be above zero (default 3s)"));
        assert!(err("consistency = \"eventual\"")
            .contains("[consul] consistency: consistency mode `eventual`: use default, stale or consistent"));
        assert!(err("tls = { cert_file = \"/c\" }").contains("[consul] tls: a client certificate needs both cert_file and key_file"));
        assert!(err("addresses = []").contains("[consul] addresses: no Consul address given"));
        assert!(err("addresses = [\"ftp://x\"]").contains("[consul] addresses: Consul address `ftp://x`"));
        assert!(err("datacenter = \"d c\"").contains("[consul] datacenter `d c`: use letters"));
        let flags = ConsulFlags { addresses: Some("ftp://y".into()), ..Default::default() };
        assert!(resolve("", &flags, None).unwrap_err().to_string().contains("--consul: Consul address `ftp://y`"));
        let e = toml::from_str::<ConsulSection>("tls = { ca = \"/x\" }").unwrap_err().to_string();
        assert!(e.contains("unknown field `ca`"), "{e}");
        let e = toml::from_str::<ConsulSection>("addresses = 5").unwrap_err().to_string();
        assert!(e.contains("addresses: expected a Consul address or a list of them"), "{e}");
    }

    #[test]
    fn flags_win_over_the_file() {
        let flags = ConsulFlags {
            addresses: Some("127.0.0.1:1".into()),
            datacenter: Some("dc9".into()),
            consistency: Some("consistent".into()),
            ..Default::default()
        };
        let c = resolve("addresses = [\"10.0.0.1:8500\"]\ndatacenter = \"dc1\"\nconsistency = \"stale\"", &flags, None).unwrap();
        assert_eq!(c.addresses[0].to_string(), "http://127.0.0.1:1");
        assert_eq!((c.datacenter.as_deref(), c.consistency), (Some("dc9"), Consistency::Consistent));
    }

    #[test]
    fn a_program_embeds_the_table_next_to_keys_of_its_own() {
        #[derive(Debug, Deserialize)]
        struct Program {
            #[serde(flatten)]
            consul: ConsulSection,
            #[serde(default, with = "crate::duration::serde_opt")]
            wait: Option<Duration>,
        }
        let p: Program = toml::from_str("addresses = [\"c:8500\"]\nwait = \"5s\"\nca_file = \"/ca\"\nwiat = 1").unwrap();
        assert_eq!(p.wait, Some(Duration::from_secs(5)));
        assert_eq!(p.consul.deprecations().len(), 1);
        let e = p.consul.resolve(ConsulConfig::default(), &ConsulFlags::default(), None, &["wait"]).unwrap_err().to_string();
        assert!(e.contains("unknown key `wiat`") && e.contains("tls, token, token_file, wait"), "{e}");
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let s = section("token = \"s3cr3t-token\"");
        let c = s.resolve(ConsulConfig::default(), &ConsulFlags::default(), None, &[]).unwrap();
        let shown = format!("{s:?} {c:?} {:?}", ConsulFlags::default());
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
        let c = resolve("", &ConsulFlags::default(), Some("env-s3cr3t")).unwrap();
        assert!(!format!("{c:?}").contains("env-s3cr3t"));
    }

    /// The `[consul]` table of a packaged configuration file, the `#key = value` examples
    /// included (uncommented).
    fn packaged_consul_table(file: &str) -> Vec<&str> {
        let start = file.find("\n[consul]\n").expect("a [consul] table") + "\n[consul]\n".len();
        let table = &file[start..];
        let end = table.find("\n[").unwrap_or(table.len());
        table[..end].lines().map(|l| l.strip_prefix('#').unwrap_or(l)).filter(|l| l.contains(" = ")).collect()
    }

    #[test]
    fn the_packaged_configurations_show_every_key_of_the_shared_table() {
        for (name, file) in [
            ("dns.toml", include_str!("../../../packaging/upsync-dns/dns.toml")),
            ("sidecar.toml", include_str!("../../../packaging/upsync-sidecar/sidecar.toml")),
        ] {
            let lines = packaged_consul_table(file);
            for key in KEYS {
                assert!(lines.iter().any(|l| l.starts_with(&format!("{key} = "))), "{name} does not show [consul] {key}");
            }
            // Each example is valid on its own (the token files named do not exist here).
            for l in lines.iter().filter(|l| KEYS.iter().any(|k| l.starts_with(&format!("{k} = "))) && !l.starts_with("token")) {
                resolve(l, &ConsulFlags::default(), None).unwrap_or_else(|e| panic!("{name}: {l}: {e}"));
                assert!(section(l).deprecations().is_empty(), "{name}: {l}");
            }
        }
    }
}
