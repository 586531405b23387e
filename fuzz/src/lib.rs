//! The functions the fuzz targets call, one per target (`fuzz_targets/NAME.rs` calls `NAME`).
//! `tests/tests/fuzz_regressions.rs` includes this file and feeds every input kept under
//! `fuzz/regressions/NAME/` to the same function, on the stable toolchain, in `make test`.
//!
//! Each function must not panic, whatever the input. Beyond that, `dns_request` checks every
//! answer (it parses, keeps the query's id, fits the UDP limit).
use std::path::PathBuf;

// The module's directive parser is compiled in from its source file rather than through the
// module crate: that crate's FFI layer references nginx's symbols (`ngx_cycle`...), and
// cargo-fuzz's coverage instrumentation (`-sanitizer-coverage-pc-table`) keeps every function
// of a linked crate, so a fuzz binary linking it fails on them. `conf.rs` uses std only.
#[path = "../../module/src/conf.rs"]
#[allow(dead_code)]
mod conf;

use conf::{Token, UpstreamSync};
use upsync_discovery::decode;
use upsync_discovery::HealthMode;

/// A target's function: one input, no panic.
pub type Target = fn(&[u8]);

/// Every target: its name (a file under `fuzz_targets/`, a folder under `regressions/`) and
/// its function.
pub const TARGETS: &[(&str, Target)] = &[
    ("dns_request", dns_request),
    ("decode_kv", decode_kv),
    ("decode_catalog_service", decode_catalog_service),
    ("decode_health_service", decode_health_service),
    ("decode_services", decode_services),
    ("decode_node_dump", decode_node_dump),
    ("decode_check_states", decode_check_states),
    ("decode_instance_counts", decode_instance_counts),
    ("decode_node_addresses", decode_node_addresses),
    ("decode_health_instances", decode_health_instances),
    ("module_directives", module_directives),
];

/// upsync-dns: a UDP packet in, the answer out (`Responder::handle_udp` over a fixed snapshot).
pub fn dns_request(data: &[u8]) {
    upsync_dns::fuzzing::check_packet(data);
}

/// A KV listing (`/v1/kv/PREFIX?recurse`), under a prefix and under the root.
pub fn decode_kv(data: &[u8]) {
    let _ = decode::decode_kv("upstreams/web", data);
    let _ = decode::decode_kv("", data);
}

/// `/v1/catalog/service/NAME`.
pub fn decode_catalog_service(data: &[u8]) {
    let _ = decode::decode_catalog_service(data);
}

/// `/v1/health/service/NAME`, in both health modes.
pub fn decode_health_service(data: &[u8]) {
    let _ = decode::decode_health_service(data, HealthMode::MarkDown);
    let _ = decode::decode_health_service(data, HealthMode::Omit);
}

/// `/v1/catalog/services`.
pub fn decode_services(data: &[u8]) {
    let _ = decode::decode_services(data);
}

/// `/v1/internal/ui/nodes` (every node with its services and checks).
pub fn decode_node_dump(data: &[u8]) {
    let _ = decode::decode_node_dump(data);
}

/// `/v1/health/state/any`.
pub fn decode_check_states(data: &[u8]) {
    let _ = decode::decode_check_states(data);
}

/// `/v1/internal/ui/services`: instance counts per service.
pub fn decode_instance_counts(data: &[u8]) {
    let _ = decode::decode_instance_counts(data);
}

/// `/v1/catalog/nodes`: node name to address.
pub fn decode_node_addresses(data: &[u8]) {
    let _ = decode::decode_node_addresses(data);
}

/// `/v1/health/service/NAME` as the DNS feed reads it (health kept per instance).
pub fn decode_health_instances(data: &[u8]) {
    let _ = decode::decode_health_instances(data);
}

/// The module's directives as an upstream block would hold them: one directive a line, its
/// arguments separated by spaces (`upsync 127.0.0.1:8500/v1/kv/upstreams/web upsync_timeout=6m`).
/// Each line goes to the parser of its directive, and every argument also to each
/// single-value parser; then the block is validated as a whole. nginx hands the module only
/// UTF-8 arguments (the FFI layer refuses the rest), so other input is left out.
pub fn module_directives(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut sync = UpstreamSync::default();
    for line in text.split('\n') {
        let words: Vec<&str> = line.split(' ').collect();
        let (name, args) = words.split_first().expect("split yields at least one item");
        for a in args {
            let _ = conf::parse_time(a);
            let _ = conf::parse_size(a);
            let _ = conf::parse_host_port(a);
            let _ = conf::parse_on_off(a);
            let _ = conf::parse_lb(a);
        }
        match *name {
            "upsync" => sync.upsync = conf::parse_upsync(args).ok(),
            "upsync_tls" => sync.tls = conf::parse_tls(args).ok(),
            "upsync_dump_path" => sync.dump_path = args.first().map(PathBuf::from),
            "upsync_token" => sync.token = args.first().map(|t| Token::Value(t.to_string())),
            "upsync_lb" => {
                let _ = args.first().map(|a| conf::parse_lb(a));
            }
            "upsync_shm_size" => {
                let _ = args.first().map(|a| conf::parse_size(a));
            }
            "upsync_allow_empty" => sync.allow_empty = args.first().is_some_and(|a| conf::parse_on_off(a) == Ok(true)),
            _ => {
                let _ = conf::parse_upsync(args);
                let _ = conf::parse_tls(args);
            }
        }
    }
    let _ = conf::validate_block(&sync);
}
