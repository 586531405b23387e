//! upsync-dns: a DNS server for the services registered in Consul, answering from memory.
//! See `dns/README.md` for what it serves and how it watches Consul.
pub mod answer;
pub mod names;
pub mod snapshot;
