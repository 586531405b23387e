//! upsync-dns: answers DNS for the services registered in Consul, from memory (dns/README.md).
#![forbid(unsafe_code)]
use std::process::ExitCode;

use clap::Parser;
use upsync_dns::config::{Cli, Config};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match Config::load(&cli, std::env::var("CONSUL_HTTP_TOKEN").ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("upsync-dns: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if cli.check_config {
        println!("{}", cfg.summary());
        for w in cfg.warnings() {
            println!("  warning: {w}");
        }
        return ExitCode::SUCCESS;
    }
    upsync_dns::app::init_logging(&cfg);
    // The UDP answering threads are our own (one per socket); the runtime carries TCP, the
    // Consul feed, forwarding and the metrics endpoint, none of them busy.
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("dns-rt").enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("upsync-dns: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(upsync_dns::app::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("upsync-dns: {e:#}");
            ExitCode::FAILURE
        }
    }
}
