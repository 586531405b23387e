//! upsync-sidecar: registers containers and scheduler endpoints in Consul (see README.md).
use clap::Parser;

#[derive(Parser)]
#[command(version, about = "Registers containers and scheduler endpoints in Consul, drains before deregistering")]
struct Args {}

fn main() {
    let _ = Args::parse();
}
