#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| upsync_fuzz::decode_node_addresses(data));
