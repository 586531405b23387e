//! upsync-dns: answers DNS for the services registered in Consul, from memory (see README.md).
use clap::Parser;

#[derive(Parser)]
#[command(version, about = "DNS server for services registered in Consul, answering from memory")]
struct Args {}

fn main() {
    let _ = Args::parse();
}
