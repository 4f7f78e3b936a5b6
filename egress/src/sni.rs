//! The server name a TLS client asks for (SNI, RFC 6066), read from the
//! first record of its ClientHello, which the proxy holds back until it
//! has decided.

/// What the first bytes of a connection say about TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// Not a TLS handshake (plain HTTP, SSH, ...).
    NotTls,
    /// A handshake record not complete yet: read more.
    Incomplete,
    /// A ClientHello without a server name.
    NoName,
    /// A ClientHello for this name (lower case).
    Name(String),
    /// Starts like TLS but is not a ClientHello agentd can read.
    Malformed,
}

/// The most bytes held back while waiting for the ClientHello: one TLS
/// record's worth.
pub const MAX_HELLO: usize = 16 * 1024 + 5;

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at + n)?;
        self.at += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|s| s[0] as usize)
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2).map(|s| u16::from_be_bytes([s[0], s[1]]) as usize)
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3).map(|s| ((s[0] as usize) << 16) | ((s[1] as usize) << 8) | s[2] as usize)
    }
}

pub fn client_hello(buf: &[u8]) -> Hello {
    match buf.first() {
        None => return Hello::Incomplete,
        Some(0x16) => {}
        Some(_) => return Hello::NotTls,
    }
    if buf.len() < 5 {
        return Hello::Incomplete;
    }
    let record_len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
    if buf.len() < 5 + record_len {
        return if 5 + record_len > MAX_HELLO { Hello::Malformed } else { Hello::Incomplete };
    }
    parse(&buf[5..5 + record_len]).unwrap_or(Hello::Malformed)
}

fn parse(record: &[u8]) -> Option<Hello> {
    let mut r = Reader { b: record, at: 0 };
    if r.u8()? != 1 {
        return None;
    }
    // A ClientHello split over records: agentd reads only the first.
    let len = r.u24()?;
    let mut r = Reader { b: r.take(len)?, at: 0 };
    r.take(2 + 32)?;
    let session = r.u8()?;
    r.take(session)?;
    let suites = r.u16()?;
    r.take(suites)?;
    let compression = r.u8()?;
    r.take(compression)?;
    if r.at == r.b.len() {
        return Some(Hello::NoName);
    }
    let ext_len = r.u16()?;
    let mut exts = Reader { b: r.take(ext_len)?, at: 0 };
    while exts.at < exts.b.len() {
        let kind = exts.u16()?;
        let len = exts.u16()?;
        let body = exts.take(len)?;
        if kind != 0 {
            continue;
        }
        let mut names = Reader { b: body, at: 0 };
        let list = names.u16()?;
        let mut list = Reader { b: names.take(list)?, at: 0 };
        while list.at < list.b.len() {
            let name_type = list.u8()?;
            let len = list.u16()?;
            let name = list.take(len)?;
            if name_type == 0 {
                let name = std::str::from_utf8(name).ok()?;
                return Some(Hello::Name(name.trim_end_matches('.').to_ascii_lowercase()));
            }
        }
        return Some(Hello::NoName);
    }
    Some(Hello::NoName)
}

/// A minimal ClientHello naming `name` (none for `None`): what a TLS
/// client's first record looks like, for tests.
pub fn sample_client_hello(name: Option<&str>) -> Vec<u8> {
    let mut exts = Vec::new();
    if let Some(name) = name {
        let mut entry = vec![0u8];
        entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
        entry.extend_from_slice(name.as_bytes());
        let mut list = (entry.len() as u16).to_be_bytes().to_vec();
        list.extend_from_slice(&entry);
        exts.extend_from_slice(&0u16.to_be_bytes());
        exts.extend_from_slice(&(list.len() as u16).to_be_bytes());
        exts.extend_from_slice(&list);
    }
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 2, 0x13, 0x01]);
    body.extend_from_slice(&[1, 0]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut handshake = vec![1];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 3, 1];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_name_is_read_from_a_client_hello() {
        let hello = sample_client_hello(Some("API.example.com"));
        assert_eq!(client_hello(&hello), Hello::Name("api.example.com".into()));
        for cut in 0..hello.len() {
            assert_eq!(client_hello(&hello[..cut]), Hello::Incomplete, "cut at {cut}");
        }
        assert_eq!(client_hello(&sample_client_hello(None)), Hello::NoName);
        assert_eq!(client_hello(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        let mut bad = hello.clone();
        bad[5] = 2;
        assert_eq!(client_hello(&bad), Hello::Malformed);
        let mut lying = hello;
        lying[7] = 0xFF;
        assert_eq!(client_hello(&lying), Hello::Malformed);
    }
}
