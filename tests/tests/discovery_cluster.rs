//! `upsync-discovery` against a real 3-server Consul 1.8.7 cluster on loopback: stopping the
//! server the client uses fails over to another, and the watch loses no change.
mod discovery_common;

use std::time::Duration;

use discovery_common::*;
use upsync_discovery::Query;
use upsync_tests::consul::Consul;
use upsync_tests::{wait_until, TestDir};

/// A KV write through `server`, retried while the cluster elects a leader.
fn put(server: &Consul, key: &str) {
    wait_until(
        &format!("KV write of {key} through {}", server.http_addr()),
        LONG,
        || matches!(server.api("PUT", &format!("/v1/kv/{key}"), Some(b"")), Ok((200, ref b)) if b.trim() == "true"),
    );
}

#[test]
fn stopping_the_server_in_use_fails_over_without_losing_a_change() {
    let dir = TestDir::new("discovery_cluster");
    let mut servers = Consul::cluster(dir.path(), 3);
    let addresses: Vec<String> = servers.iter().map(|s| s.http_addr()).collect();
    let c = client(&addresses.join(","));
    put(&servers[0], "up/app/10.0.0.1:80");
    let w = WatchThread::start(c.clone(), Query::Kv { prefix: "up/app".into() }, opts());
    let (set, _) = w.until_set(LONG, "the first server", |s| s.len() == 1);
    assert_eq!(addrs(&set), ["10.0.0.1:80"]);

    // The client sticks to the first address that answered.
    let used = c.current_address().to_string();
    let used_idx = addresses.iter().position(|a| used.ends_with(a.as_str())).expect("current address is one of ours");
    let other = (used_idx + 1) % 3;
    servers[used_idx].stop();

    // Changes made while the watch's server is gone must all arrive.
    put(&servers[other], "up/app/10.0.0.2:80");
    put(&servers[other], "up/app/10.0.0.3:80");
    let (set, _) = w.until_set(LONG, "both changes after the failover", |s| s.len() == 3);
    assert_eq!(addrs(&set), ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]);
    let now = c.current_address().to_string();
    assert_ne!(now, used, "the client still points at the stopped server");

    // It keeps blocking on the new server: a later change is seen as well.
    put(&servers[other], "up/app/10.0.0.4:80");
    let (set, _) = w.until_set(LONG, "a change after the failover", |s| s.len() == 4);
    assert_eq!(set.len(), 4);

    // The stopped server comes back; the client stays where it is (sticky) and still works.
    servers[used_idx].rejoin(Duration::from_secs(60)).expect("the server rejoins");
    put(&servers[used_idx], "up/app/10.0.0.5:80");
    let (set, _) = w.until_set(LONG, "a change written through the rejoined server", |s| s.len() == 5);
    assert_eq!(set.len(), 5);
    assert_eq!(c.current_address().to_string(), now);
}
