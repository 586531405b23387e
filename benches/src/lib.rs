//! Shared pieces of the end-to-end benchmarks. The load helpers live in the test harness
//! (`upsync_tests::load`) because the whole-stack tests drive `wrk` too.
pub use upsync_tests::load::{cpu_us, parse_wrk, percentile, wrk, wrk_cpu, WrkReport};
