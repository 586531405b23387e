//! Answers kept in wire form in the snapshot, so that answering the common questions (A, AAAA
//! and SRV of a service or a tag, and their NODATA / NXDOMAIN) is a lookup and a copy, with no
//! per-query encoding.
//!
//! What is precompiled (in [`crate::snapshot`], when a service is built, off the answering
//! threads):
//! - each view's A and AAAA records, `C0 0C TYPE CLASS TTL RDLENGTH ADDRESS`: the owner is a
//!   pointer to the question (offset 12), so the records do not depend on which name was
//!   asked (`NAME.ZONE`, `_NAME._tcp.ZONE`...). Rotation is two copies.
//! - each instance's SRV RDATA fields and its target label (`10-0-0-1`), the type-to-address
//!   part of its glue record, and for each SRV member of a view the index of its address in
//!   the view's glue.
//! - the zone's SOA record (negative answers) with the places of its three name pointers.
//!
//! Per query: the question is parsed from the packet (no allocation), the ID, flags and the
//! question (with its case, RFC 5452 0x20) are copied from the query, the sections are copied
//! in rotated order, and the compression pointers that depend on the question's length or on
//! the rotation are written: SRV targets compress exactly as an encoder taking the longest
//! earlier suffix would (hickory's), the first target carrying `addr` and pointing at the
//! zone in the question, the glue owners pointing at the targets. Our OPT record is appended
//! when the query has one; an answer larger than the client's UDP size becomes the empty TC
//! answer, as on the encoding path.
//!
//! Everything else (TXT, ANY, PTR, the apex, `addr` names, host-name SRV targets, EDNS options
//! or versions, `udp_answer_limit`, TCP) takes the encoding path of [`crate::server`]; the
//! unit test `precompiled_answers_equal_encoded_ones` compares both for every name and type of
//! a 10,000-instance snapshot.
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Name, RData, RecordType};

use crate::names::ADDR_LABEL;
use crate::snapshot::{Service, Snapshot, View};

pub(crate) const TYPE_A: u16 = 1;
pub(crate) const TYPE_SOA: u16 = 6;
pub(crate) const TYPE_AAAA: u16 = 28;
pub(crate) const TYPE_SRV: u16 = 33;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
/// Pointer to the question's name, always at offset 12.
const PTR_QUESTION: [u8; 2] = [0xC0, 0x0C];
/// Longest IP label (`ffff-ffff-...`, 39 bytes) with its length byte.
pub(crate) const LABEL_MAX: usize = 40;

/// The wire name of `name`, lower case, uncompressed.
pub(crate) fn name_wire(name: &Name) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    for label in name.iter() {
        out.push(label.len() as u8);
        out.extend(label.iter().map(u8::to_ascii_lowercase));
    }
    out.push(0);
    out
}

/// The header of a positive answer record owned by the question's name.
pub(crate) fn record_head(rtype: u16, ttl: u32, rdlen: u16) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[..2].copy_from_slice(&PTR_QUESTION);
    h[2..4].copy_from_slice(&rtype.to_be_bytes());
    h[4..6].copy_from_slice(&CLASS_IN.to_be_bytes());
    h[6..10].copy_from_slice(&ttl.to_be_bytes());
    h[10..12].copy_from_slice(&rdlen.to_be_bytes());
    h
}

/// The zone's precompiled parts (one per snapshot).
#[derive(Debug)]
pub(crate) struct ZoneWire {
    /// The zone's name, lower case, uncompressed, and its number of labels.
    zone: Vec<u8>,
    zone_labels: usize,
    /// `ns_name` (lower case wire), which `answer_in_zone` answers apart.
    ns_name: Vec<u8>,
    /// The SOA record after its owner (a pointer to the zone in the question), with the
    /// offsets (in `soa`) of the pointers to fill with the zone's offset. `None` when MNAME or
    /// RNAME is outside the zone (negative answers then take the encoding path).
    soa: Option<(Vec<u8>, Vec<usize>)>,
}

impl ZoneWire {
    pub(crate) fn new(zone: &Name, ns_name: &Name, soa: &hickory_proto::rr::Record) -> ZoneWire {
        ZoneWire { zone: name_wire(zone), zone_labels: zone.num_labels() as usize, ns_name: name_wire(ns_name), soa: soa_wire(zone, soa) }
    }
}

/// SOA type to MINIMUM, names written as their labels under the zone and a pointer to it.
fn soa_wire(zone: &Name, rec: &hickory_proto::rr::Record) -> Option<(Vec<u8>, Vec<usize>)> {
    let RData::SOA(soa) = &rec.data else { return None };
    let mut out = Vec::with_capacity(64);
    let mut ptrs = Vec::new();
    out.extend(TYPE_SOA.to_be_bytes());
    out.extend(CLASS_IN.to_be_bytes());
    out.extend(rec.ttl.to_be_bytes());
    out.extend([0, 0]);
    for name in [&soa.mname, &soa.rname] {
        if !zone.zone_of(name) {
            return None;
        }
        let rel = (name.num_labels() - zone.num_labels()) as usize;
        for label in name.iter().take(rel) {
            out.push(label.len() as u8);
            out.extend(label);
        }
        ptrs.push(out.len());
        out.extend([0xC0, 0]);
    }
    for v in [soa.serial, soa.refresh as u32, soa.retry as u32, soa.expire as u32, soa.minimum] {
        out.extend(v.to_be_bytes());
    }
    let rdlen = (out.len() - 10) as u16;
    out[8..10].copy_from_slice(&rdlen.to_be_bytes());
    Some((out, ptrs))
}

/// A query the precompiled path may answer: one question, class IN, no EDNS options.
#[derive(Debug)]
pub(crate) struct Query {
    pub id: u16,
    /// The query's flags word (RD and CD are echoed).
    pub flags: u16,
    /// The question's name in lower case (wire form) and where each label starts in it.
    lower: [u8; 255],
    name_len: usize,
    label_starts: [u8; 128],
    labels: usize,
    pub qtype: u16,
    /// Where the question ends in the packet.
    pub question_end: usize,
    /// The UDP payload size of the query's OPT record, if any.
    pub edns: Option<u16>,
}

impl Query {
    /// Parses `raw`; `None` for anything the encoding path should see (other opcodes,
    /// compression in the question, EDNS options or versions, extra sections or bytes).
    pub(crate) fn parse(raw: &[u8]) -> Option<Query> {
        if raw.len() < 12 {
            return None;
        }
        let u16_at = |i: usize| raw.get(i..i + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
        let flags = u16_at(2)?;
        // QR=0, OPCODE=0 (QUERY); QDCOUNT=1, ANCOUNT=NSCOUNT=0, ARCOUNT 0 or 1.
        if flags & 0xF800 != 0 || u16_at(4)? != 1 || u16_at(6)? != 0 || u16_at(8)? != 0 {
            return None;
        }
        let arcount = u16_at(10)?;
        let mut q = Query {
            id: u16_at(0)?,
            flags,
            lower: [0; 255],
            name_len: 0,
            label_starts: [0; 128],
            labels: 0,
            qtype: 0,
            question_end: 0,
            edns: None,
        };
        let mut pos = 12;
        loop {
            let len = usize::from(*raw.get(pos)?);
            if len == 0 {
                break;
            }
            // Pointers and extended label types: never in a question we answer here.
            if len > 63 || q.name_len + 1 + len + 1 > 255 {
                return None;
            }
            let label = raw.get(pos + 1..pos + 1 + len)?;
            q.label_starts[q.labels] = q.name_len as u8;
            q.labels += 1;
            q.lower[q.name_len] = len as u8;
            for (d, s) in q.lower[q.name_len + 1..q.name_len + 1 + len].iter_mut().zip(label) {
                *d = s.to_ascii_lowercase();
            }
            q.name_len += 1 + len;
            pos += 1 + len;
        }
        q.lower[q.name_len] = 0;
        q.name_len += 1;
        pos += 1;
        q.qtype = u16_at(pos)?;
        if u16_at(pos + 2)? != CLASS_IN {
            return None;
        }
        pos += 4;
        q.question_end = pos;
        match arcount {
            0 => {}
            1 => {
                // OPT: root owner, type 41, class = payload, version 0, no options.
                let opt = raw.get(pos..pos + 11)?;
                if opt[0] != 0 || u16::from_be_bytes([opt[1], opt[2]]) != TYPE_OPT || opt[6] != 0 || opt[9..11] != [0, 0] {
                    return None;
                }
                q.edns = Some(u16::from_be_bytes([opt[3], opt[4]]));
                pos += 11;
            }
            _ => return None,
        }
        (pos == raw.len()).then_some(q)
    }

    fn name(&self) -> &[u8] {
        &self.lower[..self.name_len]
    }

    /// Label `i` (lower case, without its length byte).
    fn label(&self, i: usize) -> &[u8] {
        let s = usize::from(self.label_starts[i]);
        let len = usize::from(self.lower[s]);
        &self.lower[s + 1..s + 1 + len]
    }
}

/// What the precompiled path wrote after the question.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Written {
    /// Sections with these counts.
    Sections { rcode: ResponseCode, answers: u16, authority: u16, additional: u16 },
    /// The answer would exceed `max` bytes: send the empty TC answer.
    TooLarge { rcode: ResponseCode },
}

/// Reusable per-thread state of the precompiled path.
#[derive(Debug, Default)]
pub(crate) struct WireScratch {
    /// Offset of each glue address's target name in the answer being written (0: not yet).
    target_at: Vec<u16>,
}

impl Snapshot {
    /// Appends the answer sections for `q` to `out` (which holds the header and the question),
    /// within `max` bytes. `None` when the question is one the encoding path answers.
    pub(crate) fn answer_wire(
        &self,
        q: &Query,
        rotation: usize,
        max: usize,
        out: &mut Vec<u8>,
        scratch: &mut WireScratch,
    ) -> Option<Written> {
        let wire = &self.wire;
        let name = q.name();
        let zl = wire.zone.len();
        let rel = q.labels.checked_sub(wire.zone_labels)?;
        // The zone must be the question's suffix on a label boundary.
        if rel == 0 || usize::from(q.label_starts[rel]) != name.len() - zl || name[name.len() - zl..] != wire.zone[..] {
            return None;
        }
        if !matches!(q.qtype, TYPE_A | TYPE_AAAA | TYPE_SRV) {
            return None;
        }
        // Offset of the zone in the question, the target of the zone pointers.
        let zone_at = (12 + name.len() - zl) as u16;
        let found = match rel {
            1 => {
                let label = q.label(0);
                if name == wire.ns_name {
                    return None;
                }
                match self.services.get(label) {
                    Some(svc) => Some((svc, &svc.all)),
                    // Empty non-terminals: the encoding path.
                    None if label == ADDR_LABEL || label.starts_with(b"_") => return None,
                    None => None,
                }
            }
            2 => {
                let (a, b) = (q.label(0), q.label(1));
                if b == ADDR_LABEL {
                    return None;
                }
                let (service, sub) = match (a.strip_prefix(b"_"), b.strip_prefix(b"_")) {
                    (Some(name), Some(proto)) => (name, (proto != b"tcp" && proto != b"udp").then_some(proto)),
                    _ => (b, Some(a)),
                };
                self.services.get(service).and_then(|svc| match sub {
                    None => Some((svc, &svc.all)),
                    Some(tag) => svc.tags.get(tag).map(|v| (svc, v)),
                })
            }
            _ => None,
        };
        let Some((svc, view)) = found else { return self.negative_wire(ResponseCode::NXDomain, zone_at, out) };
        let rec = match q.qtype {
            TYPE_A => rotated_fixed(&view.wire_a, 16, rotation, out),
            TYPE_AAAA => rotated_fixed(&view.wire_aaaa, 28, rotation, out),
            _ if view.srv.is_empty() => 0,
            _ => return svc.srv_wire(view, self.zone.ttl, rotation, zone_at, max, out, scratch),
        };
        if rec == 0 {
            return self.negative_wire(ResponseCode::NoError, zone_at, out);
        }
        if out.len() > max {
            return Some(Written::TooLarge { rcode: ResponseCode::NoError });
        }
        Some(Written::Sections { rcode: ResponseCode::NoError, answers: rec as u16, authority: 0, additional: 0 })
    }

    /// NXDOMAIN or NODATA: the SOA in the authority section.
    fn negative_wire(&self, rcode: ResponseCode, zone_at: u16, out: &mut Vec<u8>) -> Option<Written> {
        let (soa, ptrs) = self.wire.soa.as_ref()?;
        out.extend((0xC000 | zone_at).to_be_bytes());
        let base = out.len();
        out.extend_from_slice(soa);
        for &p in ptrs {
            out[base + p..base + p + 2].copy_from_slice(&(0xC000 | zone_at).to_be_bytes());
        }
        Some(Written::Sections { rcode, answers: 0, authority: 1, additional: 0 })
    }
}

/// Appends the fixed-size records of `wire` starting at record `rotation % n`; their count.
fn rotated_fixed(wire: &[u8], size: usize, rotation: usize, out: &mut Vec<u8>) -> usize {
    let n = wire.len() / size;
    if n == 0 {
        return 0;
    }
    let split = (rotation % n) * size;
    out.extend_from_slice(&wire[split..]);
    out.extend_from_slice(&wire[..split]);
    n
}

impl Service {
    /// The SRV records of `view` in rotated order and the glue of their targets.
    #[allow(clippy::too_many_arguments)]
    fn srv_wire(
        &self,
        view: &View,
        ttl: u32,
        rotation: usize,
        zone_at: u16,
        max: usize,
        out: &mut Vec<u8>,
        scratch: &mut WireScratch,
    ) -> Option<Written> {
        let n = view.srv.len();
        if n == 0 || !view.srv_wire {
            return None;
        }
        let at = &mut scratch.target_at;
        at.clear();
        at.resize(view.glue.len(), 0);
        let mut addr_at = 0u16;
        let start = rotation % n;
        for k in 0..n {
            let j = (start + k) % n;
            let inst = &self.insts[view.srv[j] as usize];
            let g = usize::from(view.srv_glue[j]);
            let head = out.len();
            out.extend_from_slice(&record_head(TYPE_SRV, ttl, 0));
            out.extend_from_slice(&inst.srv_rdata);
            let target = out.len();
            if at[g] != 0 {
                out.extend((0xC000 | at[g]).to_be_bytes());
            } else {
                at[g] = target as u16;
                out.extend_from_slice(&inst.label[..usize::from(inst.label[0]) + 1]);
                if addr_at == 0 {
                    addr_at = out.len() as u16;
                    out.push(ADDR_LABEL.len() as u8);
                    out.extend_from_slice(ADDR_LABEL);
                    out.extend((0xC000 | zone_at).to_be_bytes());
                } else {
                    out.extend((0xC000 | addr_at).to_be_bytes());
                }
            }
            let rdlen = (out.len() - head - 12) as u16;
            out[head + 10..head + 12].copy_from_slice(&rdlen.to_be_bytes());
            // Past the client's size: the TC answer. Past the reach of a pointer (with a
            // `max_udp_payload` above 16 kB): the encoding path.
            if out.len() > max {
                return Some(Written::TooLarge { rcode: ResponseCode::NoError });
            }
            if out.len() >= 0x3FFF {
                return None;
            }
        }
        for (g, &i) in view.glue.iter().enumerate() {
            let inst = &self.insts[i as usize];
            out.extend((0xC000 | at[g]).to_be_bytes());
            out.extend_from_slice(&inst.glue[..inst.glue_len as usize]);
        }
        if out.len() > max {
            return Some(Written::TooLarge { rcode: ResponseCode::NoError });
        }
        Some(Written::Sections { rcode: ResponseCode::NoError, answers: n as u16, authority: 0, additional: view.glue.len() as u16 })
    }
}

/// The record type of a query's `qtype`, for metrics.
pub(crate) fn record_type(qtype: u16) -> RecordType {
    RecordType::from(qtype)
}
