//! The dump file (`upsync_dump_path`): the synced list in nginx `server` syntax, exactly as
//! nginx-upsync-module writes it, so that `include`-ing it in the upstream block restores the
//! list when nginx restarts while Consul is down. We write it atomically (temp file + rename in
//! the same directory), which nginx-upsync-module does not.
use std::io::Write;
use std::path::Path;

use crate::conf::parse_time;
use crate::model::Server;
use crate::show::ServerJson;

/// `server 127.0.0.1:8088 weight=40 max_fails=3 fail_timeout=20s down;` per server; backup
/// servers (which nginx-upsync-module cannot have) come last with `backup`.
pub fn render(servers: &[Server]) -> String {
    let mut out = String::with_capacity(servers.len() * 64);
    for s in servers.iter().filter(|s| !s.backup).chain(servers.iter().filter(|s| s.backup)) {
        out.push_str(&server_line("", &ServerJson::from(s)));
        out.push('\n');
    }
    out
}

/// One `server ...;` line with `indent` in front (shared with `upstream_show`'s text format).
pub fn server_line(indent: &str, s: &ServerJson) -> String {
    format!(
        "{indent}server {} weight={} max_fails={} fail_timeout={}s{}{};",
        s.server,
        s.weight,
        s.max_fails,
        s.fail_timeout,
        if s.down { " down" } else { "" },
        if s.backup { " backup" } else { "" },
    )
}

/// Writes `servers` to `path` atomically: a temp file next to it, fsync, rename.
pub fn write_atomic(path: &Path, servers: &[Server]) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.upsync-{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(render(servers).as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads a dump file back (for `strong_dependency=off` start-up). Accepts what [`render`]
/// writes plus what an operator may have edited: comments, blank lines, any parameter order,
/// `fail_timeout` in nginx time syntax. Hostnames are refused (the dump holds addresses).
pub fn parse(text: &str) -> Result<Vec<Server>, String> {
    let mut servers = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let err = |what: String| format!("line {}: {what}: \"{}\"", n + 1, raw.trim());
        let Some(body) = line.strip_suffix(';') else {
            return Err(err("missing ';'".into()));
        };
        let mut words = body.split_whitespace();
        if words.next() != Some("server") {
            return Err(err("expected a \"server\" line".into()));
        }
        let addr = words.next().ok_or_else(|| err("missing address".into()))?;
        let addr = addr.parse().map_err(|_| err(format!("\"{addr}\" is not IP:PORT")))?;
        let mut s = Server { addr, weight: 1, max_fails: 1, fail_timeout: 10, down: false, backup: false };
        for w in words {
            if let Some(v) = w.strip_prefix("weight=") {
                s.weight = v.parse().ok().filter(|&x| x > 0).ok_or_else(|| err(format!("invalid weight \"{v}\"")))?;
            } else if let Some(v) = w.strip_prefix("max_fails=") {
                s.max_fails = v.parse().map_err(|_| err(format!("invalid max_fails \"{v}\"")))?;
            } else if let Some(v) = w.strip_prefix("fail_timeout=") {
                s.fail_timeout = parse_time(v).map_err(|e| err(format!("invalid fail_timeout: {e}")))?.as_secs() as u32;
            } else if w == "down" {
                s.down = true;
            } else if w == "backup" {
                s.backup = true;
            } else {
                return Err(err(format!("unknown parameter \"{w}\"")));
            }
        }
        servers.push(s);
    }
    Ok(servers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn srv(a: &str, w: u32, down: bool, backup: bool) -> Server {
        Server { addr: a.parse().unwrap(), weight: w, max_fails: 3, fail_timeout: 20, down, backup }
    }

    #[test]
    fn renders_nginx_upsync_module_format() {
        let text =
            render(&[srv("127.0.0.1:8089", 1, false, true), srv("127.0.0.1:8088", 40, true, false), srv("[::1]:80", 2, false, false)]);
        assert_eq!(
            text,
            "server 127.0.0.1:8088 weight=40 max_fails=3 fail_timeout=20s down;\n\
             server [::1]:80 weight=2 max_fails=3 fail_timeout=20s;\n\
             server 127.0.0.1:8089 weight=1 max_fails=3 fail_timeout=20s backup;\n"
        );
    }

    #[test]
    fn parse_reads_what_render_writes() {
        let servers = vec![srv("127.0.0.1:8088", 40, true, false), srv("10.1.2.3:80", 1, false, false), srv("127.0.0.1:9", 3, false, true)];
        assert_eq!(parse(&render(&servers)).unwrap(), servers);
        let edited = "# kept by upsync\n\n  server 10.0.0.1:80 down fail_timeout=1m weight=2;\nserver 10.0.0.2:80;\n";
        let p = parse(edited).unwrap();
        assert_eq!(p[0].fail_timeout, 60);
        assert!(p[0].down);
        assert_eq!(p[1].weight, 1);
    }

    #[test]
    fn parse_errors_name_the_line() {
        for (text, want) in [
            ("server 1.2.3.4:80", "line 1: missing ';'"),
            ("upstream x;", "expected a \"server\" line"),
            ("server;", "missing address"),
            ("server example.com:80;", "is not IP:PORT"),
            ("\nserver 1.2.3.4:80 weight=0;", "line 2: invalid weight"),
            ("server 1.2.3.4:80 slow_start=1s;", "unknown parameter"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn write_is_atomic_and_leaves_no_temp_files() {
        let dir = std::env::temp_dir().join(format!("upsync-dump-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("servers_app.conf");
        write_atomic(&path, &[srv("127.0.0.1:1", 1, false, false)]).unwrap();
        write_atomic(&path, &[srv("127.0.0.1:2", 1, false, false)]).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "server 127.0.0.1:2 weight=1 max_fails=3 fail_timeout=20s;\n");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        assert!(write_atomic(&dir.join("missing/x.conf"), &[]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
