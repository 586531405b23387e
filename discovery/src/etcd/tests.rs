//! The etcd decoders on answers captured from etcd 3.5 (discovery/testdata/capture-etcd.sh)
//! and the watch's state machine without a network.
use super::*;
