//! `nginx -t` with the module: every malformed directive is refused with a message that names
//! the directive and the problem; the example configurations in nginx-conf/ pass.
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::paths::{module_so, nginx_stream_core_module, repo_root, stream_module_so};
use upsync_tests::TestDir;

fn upstream(lines: &str) -> NginxConf {
    NginxConf::new(&format!(
        "upstream app {{ server 127.0.0.1:9; {lines} }}
         server {{ listen 127.0.0.1:{{{{port}}}}; location / {{ proxy_pass http://app; }} }}"
    ))
}

#[test]
fn malformed_directives_fail_nginx_t_with_a_clear_message() {
    let dir = TestDir::new("conf_errors");
    let cases: &[(&str, &[&str])] = &[
        ("upsync 127.0.0.1:8500;", &["\"upsync\" directive", "has no path"]),
        ("upsync 127.0.0.1:8500/v1/kv/x upsync_timeout=soon;", &["\"upsync\" directive", "invalid upsync_timeout \"soon\""]),
        ("upsync 127.0.0.1:8500/v1/kv/x upsync_interval=0;", &["upsync_interval must be greater than 0"]),
        ("upsync 127.0.0.1:2379/v1/kv/x upsync_type=etcd;", &["upsync_type=etcd needs a path like \"/v2/keys/upstreams/NAME\""]),
        ("upsync 127.0.0.1:2379/v3/kv/x;", &["\"/v3/kv/x\" is an etcd path: add upsync_type=etcd"]),
        ("upsync 127.0.0.1:2379/v3/kv/x upsync_type=etcd; upsync_token t;", &["upsync_token and upsync_token_file apply only to Consul"]),
        ("upsync 127.0.0.1:8500/v1/kv/x upsync_type=consul_services;", &["/v1/catalog/service/NAME"]),
        ("upsync 127.0.0.1:8500/v1/kv/x strong_dependency=maybe;", &["invalid strong_dependency \"maybe\""]),
        ("upsync 127.0.0.1:99999/v1/kv/x;", &["invalid port \"99999\""]),
        ("upsync 127.0.0.1:8500/v1/kv/x bogus;", &["unknown parameter \"bogus\""]),
        ("upsync 127.0.0.1:8500/v1/kv/x; upsync 127.0.0.1:8500/v1/kv/y;", &["\"upsync\" directive", "is duplicate"]),
        ("upsync 127.0.0.1:8500/v1/kv/x; upsync_lb hash_ketama;", &["upstream \"app\"", "needs nginx's \"hash KEY consistent;\""]),
        ("upsync 127.0.0.1:8500/v1/kv/x; upsync_lb fastest;", &["\"upsync_lb\" directive", "invalid value \"fastest\""]),
        (
            "upsync 127.0.0.1:8500/v1/kv/x; upsync_token_file /nonexistent/token;",
            &["\"upsync_token_file\" directive", "cannot read the token file"],
        ),
        ("upsync 127.0.0.1:8500/v1/kv/x; upsync_tls ca=/nonexistent/ca.pem;", &["\"upsync_tls\" directive", "/nonexistent/ca.pem"]),
        ("upsync 127.0.0.1:8500/v1/kv/x; upsync_tls cert=/etc/hostname;", &["cert= and key= go together"]),
        ("upsync 127.0.0.1:8500/v1/kv/x; upsync_allow_empty maybe;", &["upsync_allow_empty"]),
        ("upsync_dump_path /tmp/servers.conf;", &["need an \"upsync\" line", "upstream \"app\""]),
    ];
    for (i, (lines, wants)) in cases.iter().enumerate() {
        let t = Nginx::test_config(&dir.subdir(&format!("case{i}")), &upstream(lines));
        assert!(!t.ok, "nginx -t accepted: {lines}\n{}", t.output);
        for w in *wants {
            assert!(t.output.contains(w), "for `{lines}` the message lacks {w:?}:\n{}", t.output);
        }
        assert!(t.output.contains("[emerg]"), "{}", t.output);
    }
    // Outside an upstream block, and upstream_show with arguments.
    let t = Nginx::test_config(&dir.subdir("ctx"), &NginxConf::new("upsync 127.0.0.1:8500/v1/kv/x;"));
    assert!(!t.ok && t.output.contains("\"upsync\" directive is not allowed here"), "{}", t.output);
    let t =
        Nginx::test_config(&dir.subdir("show"), &NginxConf::new("server { listen 127.0.0.1:{{port}}; location / { upstream_show app; } }"));
    assert!(!t.ok && t.output.contains("invalid number of arguments in \"upstream_show\""), "{}", t.output);
    let t = Nginx::test_config(&dir.subdir("shm"), &NginxConf::new("upsync_shm_size 10k;"));
    assert!(!t.ok && t.output.contains("\"upsync_shm_size\" directive") && t.output.contains("too small"), "{}", t.output);
}

#[test]
fn well_formed_directives_pass_and_nginx_t_does_not_touch_the_network() {
    let dir = TestDir::new("conf_ok");
    let token = dir.join("token");
    std::fs::write(&token, "secret\n").unwrap();
    // Consul is unreachable here: nginx -t must still pass (no network in config test),
    // even with strong_dependency=on.
    let t = Nginx::test_config(
        dir.path(),
        &upstream(&format!(
            "upsync http://127.0.0.1:1,[::1]:2/v1/health/service/web upsync_type=consul_health health=omit dc=dc1 consistent \
             upsync_timeout=1m upsync_interval=1s strong_dependency=on;
             upsync_token_file {}; upsync_dump_path servers.conf; upsync_allow_empty off; upsync_lb least_conn; keepalive 4;",
            token.display()
        )),
    );
    assert!(t.ok, "{}", t.output);
}

#[test]
fn example_configurations_pass_nginx_t() {
    let dir = TestDir::new("conf_examples");
    // Files the examples point to, with a test-local stand-in for each absolute directory.
    let files = dir.subdir("files");
    for f in ["token", "consul-agent-ca.pem", "client.pem", "client-key.pem"] {
        std::fs::write(files.join(f), "x\n").unwrap();
    }
    let mut checked = 0;
    for entry in std::fs::read_dir(repo_root().join("nginx-conf")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("conf") {
            continue;
        }
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let case = dir.subdir(&name);
        std::fs::create_dir_all(case.join("tmp")).unwrap();
        // nginx's own stream module: Debian's is dynamic; nginx 1.28's is built in.
        let stream_core = match nginx_stream_core_module() {
            Some(p) => format!("load_module {};", p.display()),
            None => String::new(),
        };
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("load_module modules/ngx_stream_module.so;", &stream_core)
            .replace("modules/ngx_stream_upsync_module.so", &stream_module_so().display().to_string())
            .replace("modules/ngx_http_upsync_module.so", &module_so().display().to_string())
            .replace("/etc/nginx/upsync/", &format!("{}/", files.display()))
            .replace("/var/lib/nginx/", &format!("{}/", case.display()))
            .replace("@MODULE@", &module_so().display().to_string())
            .replace("@DIR@", &case.display().to_string())
            .replace("@CONSUL@", "127.0.0.1:8500")
            .replace("@BACKEND1@", "127.0.0.1:9")
            .replace("@PORT@", "8080");
        let conf = case.join("nginx.conf");
        std::fs::write(&conf, text).unwrap();
        let t = Nginx::test_config_file(&case, &conf);
        assert!(t.ok, "nginx-conf/{name}.conf fails nginx -t:\n{}", t.output);
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} example configurations found");
}
