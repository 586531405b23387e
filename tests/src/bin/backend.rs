//! `upsync-backend --name NAME --listen 127.0.0.1:PORT`: an HTTP server answering with its name
//! (used by `make demo` and the load benchmarks; tests start the same server in-process).
use std::sync::Arc;

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "HTTP backend that answers every request with its own name")]
struct Args {
    /// Name returned in every response body and in the X-Backend header.
    #[arg(long)]
    name: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = std::net::TcpListener::bind(args.listen).map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    listener.set_nonblocking(true)?;
    eprintln!("backend {} listening on {}", args.name, listener.local_addr()?);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads.max(1)).enable_all().build()?;
    let (_tx, rx) = tokio::sync::oneshot::channel();
    rt.block_on(upsync_tests::backend::serve(listener, args.name, Arc::new(Default::default()), rx));
    Ok(())
}
