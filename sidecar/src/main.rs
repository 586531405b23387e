//! upsync-sidecar: registers containers and scheduler endpoints in Consul (see README.md).
#![forbid(unsafe_code)]
use std::process::ExitCode;

use clap::Parser;
use upsync_sidecar::config::{Args, Settings};

fn main() -> ExitCode {
    let settings = match Settings::from_args(Args::parse()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("upsync-sidecar: {e:#}");
            return ExitCode::from(2);
        }
    };
    upsync_sidecar::init_logging(settings.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("upsync-sidecar: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(upsync_sidecar::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("upsync-sidecar: {e:#}");
            ExitCode::FAILURE
        }
    }
}
