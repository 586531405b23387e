//! The Debian packages (`make package`, scripts/package.sh) on this machine: built from the
//! binaries in build/, installed with `dpkg -i`, used, removed and purged.
//!
//! - `libnginx-mod-http-upsync` and `libnginx-mod-stream-upsync`: enabled the way Debian's
//!   libnginx-mod-* are (links in /etc/nginx/modules-enabled/, the stream one ordered after
//!   Debian's ngx_stream_module), depend on the nginx-abi-* that Debian's nginx provides;
//!   `nginx -t` passes with both enabled, and an nginx loading the installed .so files follows
//!   Consul in an http and a stream upstream.
//! - `upsync-dns`, `upsync-sidecar`: their systemd units pass `systemd-analyze verify`; each is
//!   started as its unit's ExecStart would start it (the installed binary with the installed
//!   configuration, as the unit's user, with the unit's capabilities, through setpriv since
//!   systemd is not PID 1 here), pointed at a test Consul: an endpoint PUT on the sidecar's API
//!   is answered by upsync-dns and served by nginx.
//! - `dpkg -r` leaves nginx's configuration valid without the module, a new `dpkg -i` enables
//!   it again; `dpkg --purge` leaves nothing behind (files, links, users, state).
//!
//! It changes the machine (packages, two system users, a link in /etc/nginx/modules-enabled),
//! so it needs root and is skipped with a message without it. A guard purges the packages when
//! the test ends, also when it fails. Other tests are not affected meanwhile: they run nginx
//! with configurations of their own, which never include /etc/nginx.
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use upsync_tests::consul::Consul;
use upsync_tests::dns::dig;
use upsync_tests::net::{free_port, http_get, http_request};
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::proc::Proc;
use upsync_tests::stream::{stream_block, wait_stream_servers};
use upsync_tests::{backend::Backend, paths, upsync, wait_for, wait_until, TestDir};

const PACKAGES: [&str; 4] = ["libnginx-mod-http-upsync", "libnginx-mod-stream-upsync", "upsync-dns", "upsync-sidecar"];
const MODULE_LINK: &str = "/etc/nginx/modules-enabled/50-mod-http-upsync.conf";
const MODULE_SO: &str = "/usr/lib/nginx/modules/ngx_http_upsync_module.so";
/// The stream module's link: after Debian's 50-mod-stream.conf, which loads ngx_stream_module.
const STREAM_LINK: &str = "/etc/nginx/modules-enabled/70-mod-stream-upsync.conf";
const STREAM_SO: &str = "/usr/lib/nginx/modules/ngx_stream_upsync_module.so";
/// The nginx the module package is built for (its nginx-abi-* dependency).
const DEBIAN_NGINX: &str = "/usr/sbin/nginx";

/// The effective user id, from the owner of /proc/self (no unsafe code needed).
fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| panic!("running {program}: {e}"))
}

/// `dpkg ARGS`, waiting while another dpkg or apt holds dpkg's lock (other work on this machine
/// may be installing packages); any other failure is returned as is.
fn dpkg(args: &[&str]) -> Output {
    let start = Instant::now();
    loop {
        let out = Command::new("dpkg").args(args).env("DEBIAN_FRONTEND", "noninteractive").output().expect("running dpkg");
        let locked = !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("locked by another process");
        if !locked || start.elapsed() > Duration::from_secs(600) {
            return out;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `Status` of a package as dpkg knows it ("" when dpkg never heard of it).
fn package_status(pkg: &str) -> String {
    let out = run("dpkg-query", &["-W", "-f=${Status}", pkg]);
    if out.status.success() {
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    } else {
        String::new()
    }
}

/// Purges the packages when dropped: after the test, and when it fails half-way.
struct Installed;

impl Installed {
    fn purge() -> Output {
        let mut args = vec!["--purge"];
        args.extend(PACKAGES);
        dpkg(&args)
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if PACKAGES.iter().any(|p| !package_status(p).is_empty() && !package_status(p).ends_with("not-installed")) {
            let out = Installed::purge();
            if !out.status.success() {
                eprintln!("purging the upsync packages after the test failed: {}", text(&out));
            }
        }
    }
}

/// The [Service] settings of a unit file (the last value of each key; the ones used here are
/// single-valued).
fn unit_settings(path: &Path) -> BTreeMap<String, String> {
    let body = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut section = String::new();
    let mut map = BTreeMap::new();
    for line in body.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line.to_string();
        } else if section == "[Service]" && !line.starts_with('#') {
            if let Some((k, v)) = line.split_once('=') {
                map.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
    }
    map
}

/// The command a unit's ExecStart runs, with its User, Group, NoNewPrivileges and capability
/// sets applied by util-linux's setpriv (systemd is not PID 1 on the test machine), followed
/// by `extra` arguments. The rest of the unit's sandbox (ProtectSystem...) needs systemd itself;
/// `systemd-analyze verify` checks those lines.
fn unit_command(unit: &Path, extra: &[String]) -> Command {
    let s = unit_settings(unit);
    let exec = s.get("ExecStart").unwrap_or_else(|| panic!("{} has no ExecStart", unit.display()));
    let user = s.get("User").unwrap_or_else(|| panic!("{} has no User=: the service must not run as root", unit.display()));
    let group = s.get("Group").unwrap_or(user);
    let caps = |key: &str| -> String {
        let names: Vec<String> = s
            .get(key)
            .map(|v| v.split_whitespace().map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase())).collect())
            .unwrap_or_default();
        std::iter::once("-all".to_string()).chain(names).collect::<Vec<_>>().join(",")
    };
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={user}")).arg(format!("--regid={group}")).arg("--init-groups").arg("--pdeathsig=SIGKILL");
    if s.get("NoNewPrivileges").is_some_and(|v| v == "yes") {
        cmd.arg("--no-new-privs");
    }
    cmd.arg(format!("--bounding-set={}", caps("CapabilityBoundingSet")));
    cmd.arg(format!("--inh-caps={}", caps("AmbientCapabilities")));
    cmd.arg(format!("--ambient-caps={}", caps("AmbientCapabilities")));
    cmd.arg("--");
    cmd.args(exec.split_whitespace()).args(extra);
    cmd
}

/// An address of 127.0.0.0/8 on which UDP and TCP port 53 are free now (the packaged
/// upsync-dns listens on port 53 with its one capability; the test keeps that port but picks
/// an address no one else uses).
fn free_port53_address() -> SocketAddr {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let seed = std::process::id() as u64 ^ nanos;
    for i in 0..200u64 {
        let n = seed.wrapping_mul(6364136223846793005).wrapping_add(i * 1442695040888963407) >> 40;
        let ip = Ipv4Addr::new(127, 53, (n >> 8) as u8, (n as u8).max(1));
        let addr = SocketAddr::from((ip, 53));
        if UdpSocket::bind(addr).is_ok() && TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no address of 127.53.0.0/16 with port 53 free");
}

fn built_packages(dir: &Path) -> Vec<PathBuf> {
    let out_dir = dir.join("packages");
    let script = paths::repo_root().join("scripts/package.sh");
    let out = Command::new(&script).arg(&out_dir).output().unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(out.status.success(), "scripts/package.sh failed (run `make deps build` first):\n{}", text(&out));
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim_end());
    let mut debs: Vec<PathBuf> = std::fs::read_dir(&out_dir)
        .expect("reading the packages' directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    debs.sort();
    for pkg in PACKAGES {
        assert!(
            debs.iter().any(|d| d.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")))),
            "scripts/package.sh built no {pkg}: {debs:?}"
        );
    }
    debs
}

/// What `dpkg -L` lists for the installed packages, without directories (shared ones stay).
fn installed_files() -> Vec<PathBuf> {
    let mut args = vec!["-L"];
    args.extend(PACKAGES);
    let out = run("dpkg-query", &args);
    assert!(out.status.success(), "dpkg-query -L: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .filter(|p| p.is_absolute() && !p.is_dir() && std::fs::symlink_metadata(p).is_ok())
        .collect()
}

fn exists(p: &str) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

fn getent(db: &str, name: &str) -> bool {
    run("getent", &[db, name]).status.success()
}

#[test]
fn packages_install_run_and_purge_cleanly() {
    if !running_as_root() {
        eprintln!("SKIPPED packages_install_run_and_purge_cleanly: it installs Debian packages with dpkg -i and needs root (run the suite as root, as CI does)");
        return;
    }
    if let Some(other) = std::env::var_os("UPSYNC_NGINX").filter(|p| Path::new(p) != Path::new(DEBIAN_NGINX)) {
        eprintln!(
            "SKIPPED packages_install_run_and_purge_cleanly: the module package is built for Debian's nginx ({DEBIAN_NGINX}) and UPSYNC_NGINX points this run at {}",
            Path::new(&other).display()
        );
        return;
    }
    let dir = TestDir::new("packages");
    let debs = built_packages(dir.path());

    // Left over from a run that was killed before its guard ran: start from nothing.
    if PACKAGES.iter().any(|p| package_status(p).starts_with("install") || package_status(p).contains("config-files")) {
        eprintln!("purging upsync packages installed before this test");
        let out = Installed::purge();
        assert!(out.status.success(), "dpkg --purge of earlier packages: {}", text(&out));
    }

    // --- install ---------------------------------------------------------------------------
    let installed = Installed;
    let mut args = vec!["-i".to_string()];
    args.extend(debs.iter().map(|d| d.display().to_string()));
    let args_install: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = dpkg(&args_install);
    assert!(out.status.success(), "dpkg -i {debs:?} failed:\n{}", text(&out));
    for pkg in PACKAGES {
        assert_eq!(package_status(pkg), "install ok installed", "{pkg} after dpkg -i");
    }
    let files = installed_files();

    // The module: Debian's layout, and the ABI dependency nginx satisfies.
    assert!(exists(MODULE_SO), "{MODULE_SO} not installed");
    let link = std::fs::read_link(MODULE_LINK).unwrap_or_else(|e| panic!("{MODULE_LINK} is not a link after installation: {e}"));
    assert_eq!(link, Path::new("/usr/share/nginx/modules-available/mod-http-upsync.conf"));
    let snippet = std::fs::read_to_string(&link).expect("reading mod-http-upsync.conf");
    assert_eq!(snippet.trim(), "load_module modules/ngx_http_upsync_module.so;");
    assert!(exists(STREAM_SO), "{STREAM_SO} not installed");
    let stream_link = std::fs::read_link(STREAM_LINK).unwrap_or_else(|e| panic!("{STREAM_LINK} is not a link after installation: {e}"));
    assert_eq!(stream_link, Path::new("/usr/share/nginx/modules-available/mod-stream-upsync.conf"));
    let snippet = std::fs::read_to_string(&stream_link).expect("reading mod-stream-upsync.conf");
    assert_eq!(snippet.trim(), "load_module modules/ngx_stream_upsync_module.so;");
    let provides = String::from_utf8_lossy(&run("dpkg-query", &["-W", "-f=${Provides}", "nginx"]).stdout).into_owned();
    for pkg in ["libnginx-mod-http-upsync", "libnginx-mod-stream-upsync"] {
        let depends = String::from_utf8_lossy(&run("dpkg-query", &["-W", "-f=${Depends}", pkg]).stdout).into_owned();
        let abi = depends
            .split(',')
            .map(str::trim)
            .find(|d| d.starts_with("nginx-abi-"))
            .unwrap_or_else(|| panic!("no nginx-abi-* in {pkg}'s Depends: {depends}"));
        assert!(provides.split(',').any(|p| p.trim() == abi), "{pkg} depends on {abi}; nginx provides {provides}");
    }
    let depends = String::from_utf8_lossy(&run("dpkg-query", &["-W", "-f=${Depends}", "libnginx-mod-stream-upsync"]).stdout).into_owned();
    assert!(
        depends.split(',').any(|d| d.trim() == "libnginx-mod-stream"),
        "the stream module must depend on libnginx-mod-stream: {depends}"
    );

    // nginx -t with the packaged module enabled, through Debian's own nginx.conf.
    let out = run(DEBIAN_NGINX, &["-t"]);
    assert!(out.status.success(), "nginx -t with the module enabled:\n{}", text(&out));
    let out = run(DEBIAN_NGINX, &["-T"]);
    for line in ["load_module modules/ngx_http_upsync_module.so;", "load_module modules/ngx_stream_upsync_module.so;"] {
        assert!(String::from_utf8_lossy(&out.stdout).contains(line), "nginx -T does not show `{line}`:\n{}", text(&out));
    }

    // The services: units, users, configurations, man pages.
    let units = ["/lib/systemd/system/upsync-dns.service", "/lib/systemd/system/upsync-sidecar.service"];
    let out = run("systemd-analyze", &["verify", units[0], units[1]]);
    assert!(out.status.success() && text(&out).trim().is_empty(), "systemd-analyze verify {units:?}:\n{}", text(&out));
    for unit in units {
        let out = run("systemd-analyze", &["security", "--offline=true", unit]);
        let t = text(&out);
        eprintln!("{}", t.lines().last().unwrap_or_default());
    }
    for (user, conf) in [("upsync-dns", "/etc/upsync/dns.toml"), ("upsync-sidecar", "/etc/upsync/sidecar.toml")] {
        assert!(getent("passwd", user) && getent("group", user), "the system user and group {user} were not created");
        let m = std::fs::metadata(conf).unwrap_or_else(|e| panic!("{conf}: {e}"));
        assert_eq!(m.mode() & 0o777, 0o640, "{conf} must be readable by root and its service's group only");
        let man = format!("/usr/share/man/man8/{user}.8.gz");
        let page = String::from_utf8_lossy(&run("zcat", &[&man]).stdout).into_owned();
        for section in [".SH OPTIONS", ".SH FILES", ".SH EXAMPLES", conf] {
            assert!(page.contains(section), "{man} lacks {section}");
        }
    }
    let state = std::fs::metadata("/var/lib/upsync-sidecar").expect("/var/lib/upsync-sidecar not created");
    assert_eq!(state.mode() & 0o777, 0o750);

    // --- run them as their units would -----------------------------------------------------
    let consul = Consul::start(&dir.subdir("consul"));
    let dns_unit = Path::new(units[0]);
    let check = unit_command(dns_unit, &["--check-config".into()]).output().expect("upsync-dns --check-config");
    assert!(check.status.success(), "upsync-dns --check-config on the installed configuration, as upsync-dns:\n{}", text(&check));
    assert!(String::from_utf8_lossy(&check.stdout).contains("configuration OK"), "{}", text(&check));

    let dns_addr = free_port53_address();
    let dns_metrics = free_port();
    let mut dns = Proc::spawn(
        "upsync-dns",
        unit_command(
            dns_unit,
            &[
                "--consul".into(),
                consul.http_addr(),
                "--listen".into(),
                dns_addr.to_string(),
                "--metrics-listen".into(),
                format!("127.0.0.1:{dns_metrics}"),
            ],
        ),
        &dir.join("upsync-dns.log"),
    )
    .expect("starting the installed upsync-dns");
    wait_for("the installed upsync-dns to read Consul (/health 200)", Duration::from_secs(60), || {
        assert!(dns.is_running(), "the installed upsync-dns exited:\n{}", dns.log());
        http_get(&format!("http://127.0.0.1:{dns_metrics}/health")).ok().filter(|(s, _)| *s == 200)
    });
    let status = std::fs::read_to_string(format!("/proc/{}/status", dns.pid())).unwrap_or_default();
    let field = |k: &str| status.lines().find(|l| l.starts_with(k)).map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string());
    let uid = run("id", &["-u", "upsync-dns"]);
    assert_eq!(field("Uid:"), Some(String::from_utf8_lossy(&uid.stdout).trim().to_string()), "upsync-dns does not run as its user");
    assert_eq!(field("CapEff:").as_deref(), Some("0000000000000400"), "upsync-dns should hold CAP_NET_BIND_SERVICE only");

    let sidecar_api = free_port();
    let sidecar_unit = Path::new(units[1]);
    let mut sidecar = Proc::spawn(
        "upsync-sidecar",
        unit_command(
            sidecar_unit,
            &[
                "--consul".into(),
                consul.http_addr(),
                "--listen".into(),
                format!("127.0.0.1:{sidecar_api}"),
                // Not the machine's container engine: its containers are not this test's.
                "--no-engine".into(),
                "--advertise-ip".into(),
                "127.0.0.1".into(),
                // The test's backend listens on loopback, which the API refuses by default.
                "--allow-address".into(),
                "127.0.0.0/8".into(),
            ],
        ),
        &dir.join("upsync-sidecar.log"),
    )
    .expect("starting the installed upsync-sidecar");
    let api = |path: &str| format!("http://127.0.0.1:{sidecar_api}{path}");
    wait_until("the installed upsync-sidecar to hold its lock in Consul", Duration::from_secs(60), || {
        assert!(sidecar.is_running(), "the installed upsync-sidecar exited:\n{}", sidecar.log());
        http_get(&api("/healthz")).is_ok_and(|(s, b)| s == 200 && b.contains("\"status\":\"ok\""))
    });

    // nginx loading the installed modules follows what the sidecar registers, in an http and
    // a stream upstream; upsync-dns answers it.
    let backend = Backend::start("packaged-backend");
    let nginx_dir = dir.subdir("nginx");
    // The stream proxy on {{port3}}, its upstream_show on {{port4}} ({{port}} is the http one's).
    let stream = stream_block("pkgweb", &consul.http_addr(), "", "").replace("{{port1}}", "{{port4}}").replace("{{port}}", "{{port3}}");
    let nginx = Nginx::start(
        &nginx_dir,
        NginxConf::new(&upsync::http_block("pkgweb", &consul.http_addr(), "", ""))
            .without_module()
            .stream(&stream)
            .main(&format!("load_module {MODULE_SO};\nload_module {STREAM_SO};")),
    );
    let body = format!(r#"{{"address":"127.0.0.1","port":{}}}"#, backend.port());
    let (status, answer) =
        http_request("PUT", &api("/v1/endpoints/pkgweb/pkgweb-1"), &[], Some(body.as_bytes())).expect("PUT on the sidecar's API");
    assert!(status == 200 || status == 201, "PUT /v1/endpoints/pkgweb/pkgweb-1: {status} {answer}");
    upsync::wait_servers(&nginx, "pkgweb", &[&backend.host_port()]);
    let hits = upsync::all_ok(&nginx.url("/"), 5);
    assert_eq!(hits.get("packaged-backend"), Some(&5), "{hits:?}");
    wait_stream_servers(nginx.extra_port(4), "pkgweb", &[&backend.host_port()]);
    let hits = upsync::all_ok(&format!("http://127.0.0.1:{}/", nginx.extra_port(3)), 5);
    assert_eq!(hits.get("packaged-backend"), Some(&5), "through the stream proxy: {hits:?}");
    let a = wait_for("upsync-dns to answer pkgweb's A record", Duration::from_secs(30), || {
        let d = dig(dns_addr, &["pkgweb.service.upsync", "A"]);
        (d.data("A") == ["127.0.0.1"]).then_some(d)
    });
    assert_eq!(a.status, "NOERROR");
    let srv = dig(dns_addr, &["_pkgweb._tcp.service.upsync", "SRV"]);
    assert!(srv.data("SRV").iter().any(|r| r.split_whitespace().nth(2) == Some(&backend.port().to_string())), "SRV: {}", srv.raw);
    drop(nginx);

    // SIGTERM, as systemd stops them: both exit 0.
    for (name, p) in [("upsync-dns", &mut dns), ("upsync-sidecar", &mut sidecar)] {
        p.signal(libc::SIGTERM);
        let st = p.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| panic!("{name} did not exit after SIGTERM:\n{}", p.log()));
        assert!(st.success(), "{name} exited with {st} after SIGTERM:\n{}", p.log());
    }
    drop(consul);

    // --- remove, then purge ----------------------------------------------------------------
    let mut args = vec!["-r"];
    args.extend(PACKAGES);
    let out = dpkg(&args);
    assert!(out.status.success(), "dpkg -r: {}", text(&out));
    for link in [MODULE_LINK, STREAM_LINK] {
        assert!(!exists(link) && exists(&format!("{link}.removed")), "dpkg -r should set the module's link aside ({link}.removed)");
    }
    let out = run(DEBIAN_NGINX, &["-t"]);
    assert!(out.status.success(), "nginx -t after dpkg -r:\n{}", text(&out));
    assert!(exists("/etc/upsync/dns.toml") && exists("/etc/upsync/sidecar.toml"), "dpkg -r must keep the configurations");
    // Installed again after the removal: the module is enabled again (as Debian's are).
    let out = dpkg(&args_install);
    assert!(out.status.success(), "dpkg -i after dpkg -r failed:\n{}", text(&out));
    for link in [MODULE_LINK, STREAM_LINK] {
        assert!(std::fs::read_link(link).is_ok() && !exists(&format!("{link}.removed")), "reinstalling did not enable {link} again");
    }

    let out = Installed::purge();
    assert!(out.status.success(), "dpkg --purge: {}", text(&out));
    for pkg in PACKAGES {
        let st = package_status(pkg);
        assert!(st.is_empty() || st.ends_with("not-installed"), "{pkg} after purge: {st}");
    }
    let left: Vec<&PathBuf> = files.iter().filter(|p| std::fs::symlink_metadata(p).is_ok()).collect();
    assert!(left.is_empty(), "files of the packages left after purge: {left:?}");
    for p in [
        MODULE_LINK,
        &format!("{MODULE_LINK}.removed"),
        STREAM_LINK,
        &format!("{STREAM_LINK}.removed"),
        "/etc/upsync",
        "/var/lib/upsync-sidecar",
    ] {
        assert!(!exists(p), "{p} left after purge");
    }
    for user in ["upsync-dns", "upsync-sidecar"] {
        assert!(!getent("passwd", user) && !getent("group", user), "user or group {user} left after purge");
    }
    eprintln!("installed {} files from {} packages, ran both services as their users, purged: nothing left", files.len(), PACKAGES.len());
    drop(installed);
}
