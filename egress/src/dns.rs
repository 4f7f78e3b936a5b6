//! The few DNS messages the resolver handles (RFC 1035): a sandbox's query
//! with one question, the answer or refusal it gets, the A query sent on to
//! the upstream resolver and the A records read from its answer.
//!
//! Written by hand rather than with a DNS library because the resolver
//! deliberately understands almost nothing: one question, A (answered from
//! upstream), AAAA (answered empty: the sandbox has no IPv6), everything
//! else refused. Nothing from the sandbox's message but the question is
//! ever sent upstream, so nothing can be tunnelled through other sections.

use std::net::Ipv4Addr;

pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;
pub const CLASS_IN: u16 = 1;

pub const RCODE_OK: u8 = 0;
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_REFUSED: u8 = 5;

/// The longest TTL handed to the sandbox: a name it may use is looked up
/// again through us often enough that the addresses it connects to are
/// the ones we recorded.
pub const MAX_TTL: u32 = 60;

/// A sandbox's query, as far as the resolver reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// Recursion desired, echoed in the answer.
    pub rd: bool,
    /// Lower case, without the trailing dot; labels joined by `.`.
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// The question's bytes, copied into the answer.
    question: Vec<u8>,
}

/// Why a message is not a query the resolver reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Too malformed to answer at all (not even its id can be trusted).
    Drop,
    /// Answerable with FORMERR under this id.
    Formerr(u16),
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes([*b.get(at)?, *b.get(at + 1)?, *b.get(at + 2)?, *b.get(at + 3)?]))
}

/// Reads an uncompressed name at `at`: the name and the offset after it.
fn read_plain_name(b: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut labels: Vec<String> = Vec::new();
    let mut total = 0;
    loop {
        let len = *b.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        // A compression pointer (0xC0) or a reserved label type: a
        // question never needs one.
        if len > 63 {
            return None;
        }
        let label = b.get(at..at + len)?;
        total += len + 1;
        if total > 255 {
            return None;
        }
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        at += len;
    }
    Some((labels.join("."), at))
}

/// Skips a possibly compressed name at `at`: the offset after it.
fn skip_name(b: &[u8], mut at: usize) -> Option<usize> {
    for _ in 0..128 {
        let len = *b.get(at)?;
        match len {
            0 => return Some(at + 1),
            l if l & 0xC0 == 0xC0 => return b.get(at + 1).map(|_| at + 2),
            l if l <= 63 => at += 1 + l as usize,
            _ => return None,
        }
    }
    None
}

impl Query {
    pub fn parse(msg: &[u8]) -> Result<Query, ParseError> {
        let id = u16_at(msg, 0).ok_or(ParseError::Drop)?;
        let flags = u16_at(msg, 2).ok_or(ParseError::Drop)?;
        if flags & 0x8000 != 0 {
            // A response: never answer one (no loops between resolvers).
            return Err(ParseError::Drop);
        }
        let formerr = ParseError::Formerr(id);
        let opcode = (flags >> 11) & 0xF;
        let qdcount = u16_at(msg, 4).ok_or(ParseError::Formerr(id))?;
        if opcode != 0 || qdcount != 1 {
            return Err(formerr);
        }
        let (name, end) = read_plain_name(msg, 12).ok_or(ParseError::Formerr(id))?;
        let qtype = u16_at(msg, end).ok_or(ParseError::Formerr(id))?;
        let qclass = u16_at(msg, end + 2).ok_or(ParseError::Formerr(id))?;
        Ok(Query { id, rd: flags & 0x0100 != 0, name, qtype, qclass, question: msg[12..end + 4].to_vec() })
    }

    /// The answer to this query: `rcode`, and for NOERROR the A records.
    pub fn answer(&self, rcode: u8, addrs: &[(Ipv4Addr, u32)]) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + self.question.len() + addrs.len() * 16);
        out.extend_from_slice(&self.id.to_be_bytes());
        // QR, the RD asked for, RA: a recursive resolver's answer.
        let flags: u16 = 0x8000 | if self.rd { 0x0100 } else { 0 } | 0x0080 | u16::from(rcode & 0xF);
        out.extend_from_slice(&flags.to_be_bytes());
        let answers = if rcode == RCODE_OK { addrs.len() as u16 } else { 0 };
        for count in [1u16, answers, 0, 0] {
            out.extend_from_slice(&count.to_be_bytes());
        }
        out.extend_from_slice(&self.question);
        if rcode == RCODE_OK {
            for (ip, ttl) in addrs {
                // The name as a pointer to the question's (offset 12).
                out.extend_from_slice(&[0xC0, 12]);
                out.extend_from_slice(&TYPE_A.to_be_bytes());
                out.extend_from_slice(&CLASS_IN.to_be_bytes());
                out.extend_from_slice(&(*ttl).min(MAX_TTL).to_be_bytes());
                out.extend_from_slice(&4u16.to_be_bytes());
                out.extend_from_slice(&ip.octets());
            }
        }
        out
    }
}

/// A FORMERR answer under `id`, with no question.
pub fn formerr(id: u16) -> Vec<u8> {
    let mut out = id.to_be_bytes().to_vec();
    out.extend_from_slice(&(0x8080u16 | u16::from(RCODE_FORMERR)).to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    out
}

/// A fresh recursive A query for `name` under `id`, for the upstream resolver.
pub fn a_query(id: u16, name: &str) -> Vec<u8> {
    let mut out = id.to_be_bytes().to_vec();
    out.extend_from_slice(&0x0100u16.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out.extend_from_slice(&TYPE_A.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out
}

/// What the upstream resolver answered to [`a_query`] under `id`: its
/// rcode and its A records (those of a CNAME's target among them), or
/// `None` for a message that is not that answer.
pub fn read_a_answer(msg: &[u8], id: u16) -> Option<(u8, Vec<(Ipv4Addr, u32)>)> {
    if u16_at(msg, 0)? != id {
        return None;
    }
    let flags = u16_at(msg, 2)?;
    if flags & 0x8000 == 0 {
        return None;
    }
    let rcode = (flags & 0xF) as u8;
    let qdcount = u16_at(msg, 4)?;
    let ancount = u16_at(msg, 6)?;
    let mut at = 12;
    for _ in 0..qdcount {
        at = skip_name(msg, at)? + 4;
    }
    let mut addrs = Vec::new();
    for _ in 0..ancount {
        at = skip_name(msg, at)?;
        let rtype = u16_at(msg, at)?;
        let class = u16_at(msg, at + 2)?;
        let ttl = u32_at(msg, at + 4)?;
        let len = u16_at(msg, at + 8)? as usize;
        let data = msg.get(at + 10..at + 10 + len)?;
        if rtype == TYPE_A && class == CLASS_IN && len == 4 {
            addrs.push((Ipv4Addr::new(data[0], data[1], data[2], data[3]), ttl));
        }
        at += 10 + len;
    }
    Some((rcode, addrs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_is_read_and_answered() {
        let q = a_query(0x1234, "API.Example.com");
        let query = Query::parse(&q).unwrap();
        assert_eq!(query.name, "api.example.com");
        assert_eq!((query.id, query.qtype, query.qclass, query.rd), (0x1234, TYPE_A, CLASS_IN, true));
        let ip = Ipv4Addr::new(10, 1, 2, 3);
        let answer = query.answer(RCODE_OK, &[(ip, 3600)]);
        let (rcode, addrs) = read_a_answer(&answer, 0x1234).unwrap();
        assert_eq!((rcode, addrs), (RCODE_OK, vec![(ip, MAX_TTL)]), "the TTL is capped");
        let refused = query.answer(RCODE_REFUSED, &[(ip, 1)]);
        assert_eq!(read_a_answer(&refused, 0x1234).unwrap(), (RCODE_REFUSED, vec![]));
        assert!(read_a_answer(&refused, 0x9999).is_none(), "another id is not our answer");
    }

    #[test]
    fn odd_messages_are_refused_or_dropped() {
        assert_eq!(Query::parse(&[1]), Err(ParseError::Drop));
        let mut response = a_query(7, "a.com");
        response[2] |= 0x80;
        assert_eq!(Query::parse(&response), Err(ParseError::Drop));
        let mut two = a_query(7, "a.com");
        two[5] = 2;
        assert_eq!(Query::parse(&two), Err(ParseError::Formerr(7)));
        let mut pointer = a_query(7, "a.com");
        pointer[12] = 0xC0;
        assert_eq!(Query::parse(&pointer), Err(ParseError::Formerr(7)));
        let truncated = &a_query(7, "a.com")[..15];
        assert_eq!(Query::parse(truncated), Err(ParseError::Formerr(7)));
        assert_eq!(formerr(7).len(), 12);
        // A compression loop in an upstream answer ends.
        let mut looped = a_query(9, "a.com");
        looped[2] = 0x81;
        looped[7] = 1;
        looped.extend_from_slice(&[0xC0, 0x00]);
        assert!(read_a_answer(&looped, 9).is_none());
    }
}
