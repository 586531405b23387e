//! The module's instruction budget per request, checked on every `make test`: `bench-callgrind`
//! (the same binary as `scripts/bench/callgrind.sh`, a short run) counts nginx's instructions
//! per request under callgrind, stock nginx and nginx + module, and this test holds the module's
//! code to issue 17's targets: under 1% of stock nginx's instructions per request, under 2%
//! while a server is added or removed every 100 requests.
//!
//! The figure checked is the module's code (the instructions inside its object plus the nginx
//! and libc functions it calls), which is the same to the instruction from one start to the
//! next; the difference of the process totals moves by about a point with glibc malloc's heap
//! layout and is reported, not checked (README, *Instructions per request*). An instruction
//! count, not a time: it does not depend on the machine's load.
use std::process::Command;

use upsync_tests::TestDir;

/// Per request, the module's code against stock nginx's whole count.
const PER_REQUEST_BUDGET: f64 = 0.01;
/// The same while a server is added or removed every 100 requests (one list per change).
const CHURN_BUDGET: f64 = 0.02;

fn code(ir: &serde_json::Value) -> f64 {
    (ir["module_own"].as_u64().unwrap() + ir["module_calls"].as_u64().unwrap()) as f64
}

fn total(ir: &serde_json::Value) -> f64 {
    ["event_loop", "threads", "poller"].iter().map(|k| ir[k].as_u64().unwrap()).sum::<u64>() as f64
}

fn least(v: impl Iterator<Item = f64>) -> f64 {
    v.fold(f64::INFINITY, f64::min)
}

#[test]
fn the_module_stays_within_its_instruction_budget_per_request() {
    let dir = TestDir::new("instruction_budget");
    let json = dir.path().join("callgrind.json");
    let out = Command::new(env!("CARGO_BIN_EXE_bench-callgrind"))
        .env("UPSYNC_BENCH_CG_ONLY", "rr,follower-rr,churn")
        .env("UPSYNC_BENCH_CG_RUNS", "1")
        .env("UPSYNC_BENCH_CG_REQUESTS", "2000")
        .env("UPSYNC_BENCH_CG_JSON", &json)
        .output()
        .expect("running bench-callgrind");
    assert!(
        out.status.success(),
        "bench-callgrind failed ({}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    eprintln!("{table}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let requests = v["requests"].as_f64().unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "a leader and a follower row: {v}");
    let mut over = Vec::new();
    for r in rows {
        let who = format!("{}, {}", r["worker"].as_str().unwrap(), r["balancer"].as_str().unwrap());
        let stock = least(r["stock"].as_array().unwrap().iter().map(total)) / requests;
        let module = least(r["module"].as_array().unwrap().iter().map(code)) / requests;
        let churn = r["churn"].as_array().unwrap();
        assert!(!churn.is_empty(), "no churn window for {who}: {v}");
        // The module's code at one list per change: under valgrind a follower's poller (in
        // the other worker's process tree, slowed too) can merge changes that come close.
        let changes = requests / 100.0;
        let churned = least(churn.iter().map(|c| {
            let lists = c["lists"].as_f64().unwrap();
            assert!(lists >= changes / 4.0, "{who}: {lists} lists installed for {changes} changes: {c}");
            module + (code(&c["ir"]) / requests - module) * changes / lists
        }));
        eprintln!(
            "{who}: stock {stock:.0} instructions per request; the module's code {module:.0} ({:.2}%), under churn {churned:.0} ({:.2}%)",
            module / stock * 100.0,
            churned / stock * 100.0
        );
        if module > stock * PER_REQUEST_BUDGET {
            over.push(format!("{who}: {module:.0} instructions of module code per request, over 1% of stock's {stock:.0}"));
        }
        if churned > stock * CHURN_BUDGET {
            over.push(format!("{who}: {churned:.0} per request under churn, over 2% of stock's {stock:.0}"));
        }
    }
    assert!(
        over.is_empty(),
        "the module's code is over budget (profile it with UPSYNC_KEEP_TEST_DIRS=1 and callgrind_annotate, README *Instructions per request*):\n{}\n{table}",
        over.join("\n")
    );
}
