//! The socket between the leader worker and its Consul poller process.
//!
//! The poller runs in a process of its own, forked by the worker that holds the lease, so that
//! no nginx worker ever has a second thread (see `module/README.md`, *How one poll per nginx
//! instance works*). The two talk over a Unix stream socket in frames: a 4-byte little-endian
//! length, then a postcard message. The poller sends [`Report`]s (results and its log lines);
//! the worker answers each [`Report::Servers`] with one [`Command::Ack`], which tells the poller
//! whether that list is now served (and must go to the dump file).
//!
//! Lists cross as the bytes the shared zone stores (encoded in the poller), so the worker copies
//! them into the zone without decoding them.
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// A frame larger than this is a broken link, not a list (a list of 100,000 servers encodes to
/// about 3 MB).
pub const FRAME_MAX: usize = 256 << 20;

/// From the poller process to the worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Report {
    /// A new list for upstream `id` at Consul index `index`: `count` servers, `encoded` as the
    /// shared zone keeps them, `summary` of the change (`+1 -0 ~0`). `seq` numbers the poller's
    /// lists, for the [`Command::Ack`].
    Servers { id: usize, seq: u64, count: usize, encoded: Vec<u8>, summary: String, index: u64 },
    /// Consul answered; the list did not change.
    Synced { id: usize, index: u64 },
    /// Something went wrong; the list being served stays (see `poller::Update::Error`).
    Error { id: usize, message: String, index: u64, watch_ok: bool },
    /// The watch task panicked and is restarted.
    Restarted { id: usize, message: String },
    /// A log line of the poller, at nginx level `level` (NGX_LOG_*), for the worker's error log.
    Log { level: usize, line: String },
}

/// From the worker to the poller process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// The answer to the list `seq` of upstream `id`: with `dump`, it is what the workers serve
    /// now and goes to the upstream's dump file; without, the poller forgets it (equal to what
    /// was served and already dumped, or refused by the shared zone).
    Ack { id: usize, seq: u64, dump: bool },
}

/// Appends `msg` to `out` as one frame.
pub fn frame<T: Serialize>(msg: &T, out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    match postcard::to_extend(msg, std::mem::take(out)) {
        Ok(v) => *out = v,
        // postcard only fails on types it cannot encode, which these are not.
        Err(e) => unreachable!("cannot encode a link frame: {e}"),
    }
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

/// Bytes read from the socket, cut into frames as they complete.
#[derive(Debug, Default)]
pub struct Inbox {
    buf: Vec<u8>,
    start: usize,
}

impl Inbox {
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, `None` until one has fully arrived, or an error when the
    /// stream cannot be a sequence of frames (the link is then unusable).
    pub fn next_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, String> {
        let rest = &self.buf[self.start..];
        let Some(head) = rest.get(..4) else { return Ok(None) };
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len > FRAME_MAX {
            return Err(format!("a frame of {len} bytes (the most is {FRAME_MAX})"));
        }
        let Some(body) = rest.get(4..4 + len) else { return Ok(None) };
        let msg = postcard::from_bytes(body).map_err(|e| format!("an unreadable frame of {len} bytes: {e}"))?;
        self.start += 4 + len;
        // Keep the buffer from growing with what was already read.
        if self.start > 64 * 1024 && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        Ok(Some(msg))
    }

    /// Bytes held that do not make a whole frame yet.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reports() -> Vec<Report> {
        vec![
            Report::Servers { id: 2, seq: 9, count: 1, encoded: vec![1, 2, 3], summary: "+1 -0 ~0".into(), index: 42 },
            Report::Synced { id: 0, index: 43 },
            Report::Error { id: 1, message: "Consul at 127.0.0.1:8500: refused".into(), index: 0, watch_ok: false },
            Report::Restarted { id: 3, message: "panicked: boom".into() },
            Report::Log { level: 4, line: "upstream \"app\": skipped".into() },
        ]
    }

    #[test]
    fn frames_come_back_whole_in_order() {
        let mut out = Vec::new();
        for r in reports() {
            frame(&r, &mut out);
        }
        let mut inbox = Inbox::default();
        inbox.extend(&out);
        let mut got = Vec::new();
        while let Some(r) = inbox.next_frame::<Report>().unwrap() {
            got.push(r);
        }
        assert_eq!(got, reports());
        assert_eq!(inbox.pending(), 0);
    }

    #[test]
    fn an_oversized_or_garbled_frame_is_an_error() {
        let mut inbox = Inbox::default();
        inbox.extend(&u32::MAX.to_le_bytes());
        assert!(inbox.next_frame::<Report>().unwrap_err().contains("bytes"));
        let mut inbox = Inbox::default();
        inbox.extend(&[2, 0, 0, 0, 0xff, 0xff]);
        assert!(inbox.next_frame::<Command>().is_err());
    }

    proptest! {
        /// However the socket cuts the stream, the frames come back whole, in order.
        #[test]
        fn any_cut_of_the_stream_gives_the_same_frames(cuts in proptest::collection::vec(1usize..40, 1..50), big in 0usize..200_000) {
            let mut msgs = reports();
            msgs.push(Report::Servers { id: 7, seq: 1, count: 0, encoded: vec![7; big], summary: String::new(), index: 1 });
            msgs.extend(reports());
            let mut out = Vec::new();
            for m in &msgs {
                frame(m, &mut out);
            }
            let mut inbox = Inbox::default();
            let mut got = Vec::new();
            let (mut at, mut i) = (0, 0);
            while at < out.len() {
                let n = (cuts[i % cuts.len()] * (1 + big / 1000)).min(out.len() - at);
                inbox.extend(&out[at..at + n]);
                at += n;
                i += 1;
                while let Some(r) = inbox.next_frame::<Report>().unwrap() {
                    got.push(r);
                }
            }
            prop_assert_eq!(got, msgs);
            prop_assert_eq!(inbox.pending(), 0);
        }
    }
}
