//! The sidecar's API against its own specification: schemathesis (installed by `make deps` in
//! build/schemathesis-venv) generates requests from `sidecar/openapi.yaml`, valid and invalid,
//! and sends them to a real sidecar registering into a real Consul. The run fails on any 5xx,
//! any status code the spec does not list for the operation, and any response whose content
//! type, headers or body does not match the spec.
//!
//! Generated bodies that ask for an HTTP or TCP check get a TTL check instead
//! (`tests/schemathesis/hooks.py`): Consul would otherwise probe made-up addresses, and tests
//! send traffic to loopback only. The test checks afterwards that Consul holds TTL checks only.
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use upsync_tests::consul::Consul;
use upsync_tests::paths::{build_dir, repo_root};
use upsync_tests::proc::Proc;
use upsync_tests::sidecar::{ConsulView, Sidecar, SidecarOpts};
use upsync_tests::TestDir;

/// Test cases per operation and phase; the whole run takes well under a minute.
const MAX_EXAMPLES: &str = "40";
/// A fixed seed: the same requests at every run (a failure reproduces).
const SEED: &str = "20261130";
/// The checks that make "every response matches the spec".
const CHECKS: &str =
    "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance";

fn schemathesis() -> PathBuf {
    let st = std::env::var_os("UPSYNC_SCHEMATHESIS").map(PathBuf::from).unwrap_or_else(|| build_dir().join("schemathesis-venv/bin/st"));
    assert!(st.exists(), "schemathesis not found at {}: run `make deps` (or set UPSYNC_SCHEMATHESIS)", st.display());
    st
}

#[test]
fn sidecar_api_matches_its_openapi_spec() {
    let st = schemathesis();
    let dir = TestDir::new("sidecar_schema");
    let consul = Consul::start(dir.path());
    let sidecar =
        Sidecar::start(dir.path(), &consul.http_addr(), SidecarOpts::new("node-schema", &dir.join("no-engine.sock")).arg("--no-engine"));
    // Some endpoints to find, update, conflict with and delete.
    for (path, body) in [
        ("/v1/endpoints/web/web-1", r#"{"address":"192.0.2.10","port":8080,"tags":["blue"],"check":{"ttl":"30s"}}"#),
        ("/v1/endpoints/web/web-2", r#"{"address":"192.0.2.11","port":8080,"weight":3}"#),
        ("/v1/endpoints/api/api-1", r#"{"address":"2001:db8::1","port":443,"backup":true}"#),
    ] {
        let (status, answer) = sidecar.api("PUT", path, Some(body));
        assert_eq!(status, 201, "PUT {path}: {answer}");
    }

    let report = dir.subdir("schemathesis-report");
    let mut cmd = Command::new(&st);
    cmd.arg("run")
        .arg(repo_root().join("sidecar/openapi.yaml"))
        .args(["--url", &sidecar.url("")])
        .args(["--checks", CHECKS])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", MAX_EXAMPLES, "--seed", SEED, "--workers", "1"])
        .args(["--request-timeout", "10", "--no-color"])
        .args(["--report", "junit", "--report-dir"])
        .arg(&report)
        .env("SCHEMATHESIS_HOOKS", repo_root().join("tests/schemathesis/hooks.py"))
        // No telemetry, no version check: tests reach loopback only.
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .env("NO_COLOR", "1")
        .current_dir(dir.path());
    let log = dir.join("schemathesis.log");
    let mut run = Proc::spawn("schemathesis", cmd, &log).expect("starting schemathesis");
    let status = run.wait_exit(Duration::from_secs(600)).unwrap_or_else(|| {
        run.kill();
        panic!("schemathesis still running after 10 minutes (log {}):\n{}", log.display(), run.log())
    });
    let out = run.log();
    assert!(
        status.success(),
        "schemathesis found responses outside sidecar/openapi.yaml ({status}; log {}, sidecar log below):\n{out}\n--- sidecar ---\n{}",
        log.display(),
        sidecar.log()
    );
    eprintln!("{}", out.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n"));

    // The run exercised every operation of the spec (not an empty run that passes trivially).
    let field = |name: &str| -> Option<u64> {
        let line = out.lines().map(str::trim).find(|l| l.starts_with(name))?;
        line[name.len()..].trim().split('/').next()?.trim().parse().ok()
    };
    let (selected, tested) = (field("Selected:"), field("Tested:"));
    assert!(selected.is_some_and(|n| n > 0) && tested == selected, "schemathesis tested {tested:?} of {selected:?} operations:\n{out}");

    // The sidecar still serves, and Consul only ever got TTL checks from it.
    assert_eq!(sidecar.healthz()["status"], "ok", "the sidecar degraded during the run:\n{}", sidecar.log());
    for (id, check) in ConsulView(&consul).checks() {
        let kind = check["Type"].as_str().unwrap_or_default();
        assert!(kind == "ttl" || kind.is_empty() && id == "serfHealth", "check {id} is of type {kind:?}: {check}");
    }
}
