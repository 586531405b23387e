//! The nginx module across process events: reload, quit, a crashed leader worker, Consul
//! stopping and restarting, start-up from the dump file, strong_dependency, memory over many
//! changes.
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use upsync_tests::backend::Backend;
use upsync_tests::consul::Consul;
use upsync_tests::faultproxy::{Fault, FaultProxy};
use upsync_tests::nginx::{Nginx, NginxConf};
use upsync_tests::proc::{alive, rss_kib, thread_count};
use upsync_tests::upsync::{all_ok, delete_server, http_block, put_server, show_json, wait_servers};
use upsync_tests::{wait_for, wait_for_value, wait_until, TestDir};

fn leader_pid(nginx: &Nginx) -> u32 {
    wait_for("a leader", Duration::from_secs(20), || {
        let pid = show_json(nginx, "app")["sync"]["leader_pid"].as_u64().unwrap_or(0) as u32;
        (pid != 0 && nginx.active_worker_pids().contains(&pid)).then_some(pid)
    })
}

#[test]
fn reload_during_changes_new_workers_start_from_the_latest_list_old_ones_exit() {
    let dir = TestDir::new("life_reload");
    let consul = Consul::start(dir.path());
    let backends: Vec<Backend> = (0..4).map(|i| Backend::start(&format!("b{i}"))).collect();
    let conf = NginxConf::new(&http_block("app", &consul.http_addr(), "", "keepalive 4;")).workers(2);
    let mut nginx = Nginx::start(dir.path(), conf.clone());
    put_server(&consul, "app", &backends[0].host_port(), "");
    wait_servers(&nginx, "app", &[&backends[0].host_port()]);

    // Changes keep coming while nginx reloads twice.
    let addr = consul.http_addr();
    let hosts: Vec<String> = backends.iter().map(|b| b.host_port()).collect();
    let writer = {
        let hosts = hosts.clone();
        std::thread::spawn(move || {
            for i in 0..60 {
                let h = &hosts[1 + i % 3];
                let url = format!("http://{addr}/v1/kv/upstreams/app/{h}");
                let _ = ureq::put(&url).send_string(&format!("{{\"weight\":{}}}", 1 + i % 5));
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let old = nginx.worker_pids();
    nginx.reload();
    let old2 = nginx.active_worker_pids();
    nginx.reload();
    writer.join().unwrap();
    let mut expected: Vec<&str> = hosts.iter().map(String::as_str).collect();
    expected.sort();
    wait_servers(&nginx, "app", &expected);
    // The new workers got the list without waiting for Consul: a final change arrives too.
    delete_server(&consul, "app", &hosts[3]);
    let remaining: Vec<&str> = hosts[..3].iter().map(String::as_str).collect();
    wait_servers(&nginx, "app", &remaining);
    // Old workers exit as soon as their connections are done: the module keeps none alive.
    wait_until("old workers to exit", Duration::from_secs(10), || Nginx::all_exited(&old) && Nginx::all_exited(&old2));
    let h = all_ok(&nginx.url("/"), 30);
    assert!(!h.contains_key("b3"), "{h:?}");
    assert!(!nginx.error_log().contains("open socket"), "{}", nginx.error_log());
    assert!(!nginx.error_log().contains("[alert]"), "{}", nginx.error_log());
}

#[test]
fn quit_is_prompt_and_no_thread_or_poller_leaks() {
    let dir = TestDir::new("life_quit");
    let consul = Consul::start(dir.path());
    let a = Backend::start("a");
    let mut nginx = Nginx::start(dir.path(), NginxConf::new(&http_block("app", &consul.http_addr(), "", "")).workers(3));
    put_server(&consul, "app", &a.host_port(), "");
    wait_servers(&nginx, "app", &[&a.host_port()]);
    // Every worker runs nginx's thread only; the leader has one child, its Consul poller process.
    // Read the leader, the thread counts and the pollers together, once they agree (a worker
    // that has just taken the lease starts its poller on the same tick).
    type State = (Vec<(u32, usize, bool)>, Vec<(u32, u32)>);
    let state = |nginx: &Nginx| -> State {
        let leader = leader_pid(nginx);
        (nginx.worker_pids().into_iter().map(|pid| (pid, thread_count(pid), pid == leader)).collect(), nginx.poller_pids())
    };
    let settled = |(workers, pollers): &State| {
        workers.iter().all(|&(_, n, _)| n == 1) && pollers.len() == 1 && workers.iter().any(|&(pid, _, lead)| lead && pollers[0].0 == pid)
    };
    let first = match wait_for_value(Duration::from_secs(10), || state(&nginx), settled) {
        Ok((_, pollers)) => pollers[0].1,
        Err(t) => panic!("workers (pid, threads, leader) and pollers (worker, poller) at start: {:?}", t.last),
    };
    assert_eq!(std::fs::read_to_string(format!("/proc/{first}/comm")).unwrap_or_default().trim(), "upsync-poller");
    for _ in 0..3 {
        nginx.reload();
    }
    // The lease moves to a new worker when the old leader exits; the old poller goes with it.
    wait_until("old workers gone", Duration::from_secs(10), || nginx.worker_pids().len() == 3);
    let last = match wait_for_value(Duration::from_secs(10), || state(&nginx), settled) {
        Ok((_, pollers)) => pollers[0].1,
        Err(t) => panic!("workers (pid, threads, leader) and pollers (worker, poller) after reloads: {:?}", t.last),
    };
    assert_ne!(last, first, "the new configuration's leader runs a poller of its own");
    wait_until("the first poller to exit", Duration::from_secs(5), || !alive(first));
    let start = Instant::now();
    assert!(nginx.quit(Duration::from_secs(10)), "nginx did not exit within 10 s of QUIT");
    let took = start.elapsed();
    eprintln!("nginx quit in {took:?}");
    // Nothing of the module keeps a worker alive: no join, no timer, no open socket.
    assert!(took < Duration::from_secs(1), "nginx took {took:?} to quit");
    wait_until("the last poller to exit with nginx", Duration::from_secs(5), || !alive(last));
    let log = nginx.error_log();
    assert!(!log.contains("[alert]") && !log.contains("[crit]"), "{log}");
}

/// Consul, backends a and b, and nginx (2 workers) serving a from Consul: the start of the
/// tests that kill the leader or its poller.
struct Synced {
    _dir: TestDir,
    consul: Consul,
    a: Backend,
    b: Backend,
    nginx: Nginx,
    leader: u32,
    poller: u32,
}

impl Synced {
    fn start(name: &str) -> Synced {
        let dir = TestDir::new(name);
        let consul = Consul::start(dir.path());
        let (a, b) = (Backend::start("a"), Backend::start("b"));
        let nginx = Nginx::start(dir.path(), NginxConf::new(&http_block("app", &consul.http_addr(), "", "")).workers(2));
        put_server(&consul, "app", &a.host_port(), "");
        wait_servers(&nginx, "app", &[&a.host_port()]);
        let leader = leader_pid(&nginx);
        let (worker, poller) = wait_for("the poller", Duration::from_secs(10), || nginx.poller_pids().first().copied());
        assert_eq!(worker, leader, "the leader forks the poller");
        Synced { _dir: dir, consul, a, b, nginx, leader, poller }
    }

    /// Adds b in Consul and waits for nginx to serve a and b.
    fn add_b(&self) {
        put_server(&self.consul, "app", &self.b.host_port(), "");
        wait_servers(&self.nginx, "app", &[&self.a.host_port(), &self.b.host_port()]);
    }
}

/// SIGKILL to a process of the nginx a test started.
fn kill9(pid: u32) {
    assert_eq!(std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().code(), Some(0));
}

#[test]
fn a_killed_poller_is_replaced_and_syncing_continues() {
    let t = Synced::start("life_poller_kill");
    let (nginx, leader, poller) = (&t.nginx, t.leader, t.poller);
    kill9(poller);
    let again = wait_for("a new poller", Duration::from_secs(10), || {
        nginx.poller_pids().into_iter().find(|&(w, p)| w == leader && p != poller).map(|(_, p)| p)
    });
    assert!(alive(leader), "the worker survives its poller");
    t.add_b();
    assert_eq!(leader_pid(nginx), leader, "the lease stays with the worker");
    let log = nginx.error_log();
    assert!(log.contains(&format!("the Consul poller process {poller} ended unexpectedly")), "{log}");
    assert!(log.contains(&format!("(poller process {again})")), "{log}");
}

#[test]
fn pollers_that_end_before_any_result_from_consul_make_the_worker_run_the_poller_as_a_thread() {
    // Consul behind a proxy that can stall its answers: a poller whose first answer stalls has
    // sent no result (only its start's log line) when it is killed. Two such ends in a row switch
    // the worker to a poller thread (the safety net for a poller process that cannot run), which
    // keeps the lease and syncs.
    let dir = TestDir::new("life_poller_fallback");
    let consul = Consul::start(dir.path());
    let proxy = FaultProxy::start(consul.ports.http);
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    put_server(&consul, "app", &a.host_port(), "");
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http_block("app", &proxy.addr(), "", "")).workers(1));
    wait_servers(&nginx, "app", &[&a.host_port()]);
    let worker = nginx.worker_pids()[0];
    let (_, mut poller) = wait_for("the poller", Duration::from_secs(10), || nginx.poller_pids().first().copied());
    proxy.set(Fault::Stall);
    for _ in 0..2 {
        let asked = proxy.requests();
        kill9(poller);
        // The next poller, once its first request is stalled.
        poller = wait_for("a new poller with a stalled request", Duration::from_secs(10), || {
            let p = nginx.poller_pids().into_iter().find(|&(_, p)| p != poller)?.1;
            (proxy.requests() > asked).then_some(p)
        });
    }
    kill9(poller);
    proxy.set(Fault::Pass);
    wait_until("the worker to run the poller as a thread", Duration::from_secs(10), || {
        thread_count(worker) == 2 && nginx.poller_pids().is_empty()
    });
    put_server(&consul, "app", &b.host_port(), "");
    wait_servers(&nginx, "app", &[&a.host_port(), &b.host_port()]);
    assert_eq!(leader_pid(&nginx), worker, "the worker keeps the lease");
    assert!(nginx.poller_pids().is_empty(), "no poller process once the thread runs: {:?}", nginx.poller_pids());
    let log = nginx.error_log();
    assert!(
        log.contains("2 Consul poller processes in a row ended before any result from Consul; this worker runs the poller as a thread"),
        "{log}"
    );
}

#[test]
fn a_client_connection_open_when_the_poller_forks_is_closed_with_the_worker() {
    let dir = TestDir::new("life_poller_sockets");
    let consul = Consul::start(dir.path());
    let a = Backend::start("a");
    put_server(&consul, "app", &a.host_port(), "");
    let http = format!("keepalive_timeout 5s;\n{}", http_block("app", &consul.http_addr(), "", ""));
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http).workers(1));
    wait_servers(&nginx, "app", &[&a.host_port()]);
    let (_, poller) = wait_for("the poller", Duration::from_secs(10), || nginx.poller_pids().first().copied());
    // A keep-alive client connection of the only worker, open while it forks its next poller.
    let mut c = std::net::TcpStream::connect(("127.0.0.1", nginx.port())).unwrap();
    c.write_all(b"GET /show?format=json HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 65536];
    assert!(c.read(&mut buf).unwrap() > 0, "no answer");
    kill9(poller);
    wait_for("a new poller", Duration::from_secs(10), || nginx.poller_pids().into_iter().find(|&(_, p)| p != poller));
    // The worker closes the idle connection after keepalive_timeout: the client sees it close.
    // A poller holding its copy of the socket would keep it open (no FIN) for as long as it runs.
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) => panic!("the connection was not closed 15 s after the keepalive timeout of 5 s: {e}"),
        }
    }
}

#[test]
fn a_crashed_leader_is_replaced_and_syncing_continues() {
    let t = Synced::start("life_crash");
    let (nginx, leader) = (&t.nginx, t.leader);
    kill9(leader);
    wait_until("the crashed worker's poller to die with it", Duration::from_secs(5), || !alive(t.poller));
    wait_until("the crashed worker replaced", Duration::from_secs(10), || !alive(leader) && nginx.active_worker_pids().len() == 2);
    t.add_b();
    let new_leader = leader_pid(nginx);
    assert_ne!(new_leader, leader);
    // The crashed worker's poller died with it; the new leader runs the only one.
    let pollers = wait_for("one poller", Duration::from_secs(10), || {
        let p = nginx.poller_pids();
        (p.len() == 1 && p[0].0 == new_leader).then_some(p)
    });
    assert!(!pollers.iter().any(|&(w, _)| w == leader), "{pollers:?}");
}

#[test]
fn consul_down_serves_the_last_list_and_recovers_when_it_returns() {
    let dir = TestDir::new("life_consul_restart");
    let mut consul = Consul::start(dir.path());
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http_block("app", &consul.http_addr(), "", "")).workers(2));
    put_server(&consul, "app", &a.host_port(), "");
    wait_servers(&nginx, "app", &[&a.host_port()]);

    // Traffic runs through the whole outage, restart and re-registration.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, url) = (stop.clone(), nginx.url("/"));
        std::thread::spawn(move || {
            let mut answers = std::collections::BTreeMap::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (k, v) in upsync_tests::upsync::hits(&url, 10) {
                    *answers.entry(k).or_insert(0usize) += v;
                }
            }
            answers
        })
    };
    consul.kill();
    wait_until("the error reported", Duration::from_secs(20), || {
        show_json(&nginx, "app")["sync"]["last_error"].as_str().is_some_and(|e| !e.is_empty())
    });
    // A dev agent comes back empty (new index): the empty answer is refused, the list stays.
    consul.restart();
    wait_until("the empty answer after restart", Duration::from_secs(30), || {
        show_json(&nginx, "app")["sync"]["last_error"].as_str().is_some_and(|e| e.contains("no servers"))
    });
    put_server(&consul, "app", &b.host_port(), "");
    wait_servers(&nginx, "app", &[&b.host_port()]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answers = traffic.join().unwrap();
    assert!(answers.keys().all(|k| k == "a" || k == "b"), "requests failed while Consul was down or restarting: {answers:?}");
    assert!(answers.get("a").copied().unwrap_or(0) > 0, "{answers:?}");
    assert_eq!(all_ok(&nginx.url("/"), 10).get("b"), Some(&10));
    assert!(show_json(&nginx, "app")["sync"]["last_error"].is_null());
}

#[test]
fn dump_file_is_written_and_restores_the_list_with_consul_down() {
    let dir = TestDir::new("life_dump");
    let mut consul = Consul::start(dir.path());
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let dump = dir.join("servers_app.conf");
    let lines = format!("upsync_dump_path {};", dump.display());
    let conf = NginxConf::new(&http_block("app", &consul.http_addr(), "strong_dependency=off", &lines));
    let mut nginx = Nginx::start(dir.path(), conf.clone());
    put_server(&consul, "app", &a.host_port(), r#"{"weight":40,"max_fails":3,"fail_timeout":20,"down":1}"#);
    put_server(&consul, "app", &b.host_port(), r#"{"weight":2,"backup":1}"#);
    wait_servers(&nginx, "app", &[&a.host_port(), &b.host_port()]);
    let want = format!(
        "server {} weight=40 max_fails=3 fail_timeout=20s down;\nserver {} weight=2 max_fails=2 fail_timeout=10s backup;\n",
        a.host_port(),
        b.host_port()
    );
    wait_until("the dump file", Duration::from_secs(10), || std::fs::read_to_string(&dump).ok().as_deref() == Some(want.as_str()));
    // No temp files left next to it.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // nginx restarts while Consul is down: it serves the dumped list (b, the backup, since a is down).
    nginx.quit(Duration::from_secs(10));
    consul.kill();
    let nginx = Nginx::start(dir.path(), conf);
    let show = show_json(&nginx, "app");
    assert_eq!(show["sync"]["origin"], "dump", "{show}");
    assert_eq!(all_ok(&nginx.url("/"), 5).get("b"), Some(&5));

    // The dump is valid nginx syntax for an `include` in the upstream block.
    let include = NginxConf::new(&format!(
        "upstream inc {{ include {}; }} server {{ listen 127.0.0.1:{{{{port}}}}; location / {{ proxy_pass http://inc; }} }}",
        dump.display()
    ));
    let t = Nginx::test_config(&dir.subdir("include"), &include);
    assert!(t.ok, "{}", t.output);
}

#[test]
fn strong_dependency_on_refuses_to_start_without_consul_and_starts_synced_with_it() {
    let dir = TestDir::new("life_strong");
    let consul = Consul::start(dir.path());
    let a = Backend::start("a");
    put_server(&consul, "app", &a.host_port(), "");
    // Consul reachable: the first request already goes to the synced server, not the placeholder.
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http_block("app", &consul.http_addr(), "strong_dependency=on", "")));
    assert_eq!(all_ok(&nginx.url("/"), 3).get("a"), Some(&3));
    // The master read that list on a tokio runtime of its own, and tokio keeps process-wide
    // files from it (its signal pipe). The leader's poller process keeps them open and syncs:
    // when it closed every inherited file, its own runtime failed to start (EBADF).
    let b = Backend::start("b");
    put_server(&consul, "app", &b.host_port(), "");
    wait_servers(&nginx, "app", &[&a.host_port(), &b.host_port()]);
    assert_eq!(nginx.poller_pids().len(), 1, "no poller process: {}", nginx.error_log());
    let log = nginx.error_log();
    assert!(!log.contains("ended unexpectedly") && !log.contains("as a thread"), "{log}");
    drop(nginx);

    // Nobody listens on this port: nginx must refuse to start, saying why.
    let dead = format!("127.0.0.1:{}", upsync_tests::net::free_port());
    let err = Nginx::try_start(&dir.subdir("down"), NginxConf::new(&http_block("app", &dead, "strong_dependency=on", "")))
        .err()
        .expect("nginx started although Consul is unreachable and strong_dependency=on");
    let msg = err.to_string();
    assert!(msg.contains("strong_dependency=on") && msg.contains(&dead) && msg.contains("upstream \"app\""), "{msg}");
}

#[test]
fn memory_of_removed_servers_is_released() {
    let dir = TestDir::new("life_memory");
    let consul = Consul::start(dir.path());
    let a = Backend::start("a");
    // upsync_interval=1ms: let the poll loop follow (almost) every write.
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http_block("app", &consul.http_addr(), "upsync_interval=1ms", "")));
    put_server(&consul, "app", &a.host_port(), "");
    wait_servers(&nginx, "app", &[&a.host_port()]);
    let worker = nginx.worker_pids()[0];
    let churn = |rounds: usize| {
        for i in 0..rounds {
            // 20 extra servers appear and disappear: each change builds a new peer list.
            let key = format!("upstreams/app/10.1.{}.{}:80", i % 20, i % 200);
            consul.kv_put(&key, "{\"down\":1}");
            consul.kv_delete(&key);
            if i % 50 == 0 {
                let _ = all_ok(&nginx.url("/"), 2);
            }
        }
        wait_servers(&nginx, "app", &[&a.host_port()]);
    };
    churn(300);
    let before = rss_kib(worker).unwrap();
    churn(1500);
    let after = rss_kib(worker).unwrap();
    let version = show_json(&nginx, "app")["sync"]["version"].as_u64().unwrap();
    eprintln!("worker RSS {before} KiB -> {after} KiB over {version} list versions");
    assert!(version > 500, "too few list changes reached nginx to say anything ({version})");
    assert!(after < before + 4096, "worker RSS grew from {before} KiB to {after} KiB over 1500 changes");
}

#[test]
fn several_consul_servers_fail_over_when_the_one_in_use_stops() {
    let dir = TestDir::new("life_failover");
    let mut cluster = Consul::cluster(dir.path(), 3);
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let addrs: Vec<String> = cluster.iter().map(|c| c.http_addr()).collect();
    let nginx = Nginx::start(dir.path(), NginxConf::new(&http_block("app", &addrs.join(","), "stale", "")).workers(2));
    put_server(&cluster[1], "app", &a.host_port(), "");
    wait_servers(&nginx, "app", &[&a.host_port()]);
    // The client sticks to the first address; stop that server (the cluster keeps a quorum).
    cluster[0].stop();
    // The stopped server may have been the leader: write once the others elected a new one.
    let key = format!("/v1/kv/upstreams/app/{}", b.host_port());
    wait_until("a write to the remaining servers", Duration::from_secs(30), || {
        matches!(cluster[1].api("PUT", &key, Some(b"")), Ok((200, _)))
    });
    wait_servers(&nginx, "app", &[&a.host_port(), &b.host_port()]);
    assert_eq!(all_ok(&nginx.url("/"), 10).len(), 2);
}
