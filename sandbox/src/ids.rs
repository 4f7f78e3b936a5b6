//! Host id ranges for `sandbox run`. Two runs that shared one could signal,
//! trace and write each other's processes and files, so a run holds its
//! range for as long as it lives: by binding one abstract unix socket per
//! block of ids, named after the block. A bind is atomic and fails while
//! another process holds the name, and the kernel frees the name when its
//! holder exits, however it exits, so a crashed run leaves nothing to clean.
//!
//! Abstract names belong to a network namespace: runs started from different
//! network namespaces do not see each other's claims. The node allocates its
//! sandboxes' ranges below [`FIRST_ID`] (`id_base`, 1000000 by default).

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The first host id a run may be given.
pub const FIRST_ID: u32 = 1_000_000_000;
/// Ranges are claimed in blocks of this many ids (a full 16-bit id space, as
/// `newuidmap` ranges usually are).
pub const BLOCK: u32 = 65_536;
/// Blocks between [`FIRST_ID`] and the end of the 32-bit id space (whose last
/// id, 4294967295, is the kernel's "no id").
const BLOCKS: u32 = (u32::MAX - FIRST_ID) / BLOCK;

/// A claimed id range; dropping it lets other runs claim the range again.
#[derive(Debug)]
pub struct IdLease {
    base: u32,
    /// The bound sockets that hold the claim, one per block.
    _held: Vec<UnixDatagram>,
}

impl IdLease {
    /// Claims `count` consecutive ids, in whole blocks, starting the search
    /// at the block `hint` picks (this process's pid spreads concurrent runs
    /// so that most find their first choice free) and moving on past blocks
    /// other processes hold. `name` prefixes the sockets' names.
    pub fn claim(name: &str, hint: u32, count: u32) -> io::Result<IdLease> {
        if count == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "an id range holds at least one id"));
        }
        let blocks = count.div_ceil(BLOCK);
        let starts = (BLOCKS + 1).checked_sub(blocks).filter(|&n| n > 0).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{count} ids do not fit above {FIRST_ID}"))
        })?;
        let first = hint % starts;
        'start: for start in (first..starts).chain(0..first) {
            let mut held = Vec::with_capacity(blocks as usize);
            for block in start..start + blocks {
                let addr = SocketAddr::from_abstract_name(format!("{name}{block}"))?;
                match UnixDatagram::bind_addr(&addr) {
                    Ok(socket) => held.push(socket),
                    Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue 'start,
                    Err(e) => return Err(e),
                }
            }
            return Ok(IdLease { base: FIRST_ID + start * BLOCK, _held: held });
        }
        Err(io::Error::new(io::ErrorKind::AddrInUse, format!("every range of {count} ids above {FIRST_ID} is in use")))
    }

    /// The first host id of the range.
    pub fn base(&self) -> u32 {
        self.base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Socket names of this test alone: other tests, and real runs, claim
    /// under other names.
    fn name(test: &str) -> String {
        format!("agentd-test-ids-{}-{test}-", std::process::id())
    }

    /// The ids of a lease of one block.
    fn range(lease: &IdLease) -> std::ops::Range<u64> {
        lease.base() as u64..lease.base() as u64 + BLOCK as u64
    }

    #[test]
    fn runs_with_the_same_hint_get_disjoint_ranges() {
        let name = name("same-hint");
        let a = IdLease::claim(&name, 7, BLOCK).unwrap();
        let b = IdLease::claim(&name, 7, BLOCK).unwrap();
        let c = IdLease::claim(&name, 7 + BLOCKS, BLOCK).unwrap();
        assert_eq!(a.base(), FIRST_ID + 7 * BLOCK);
        for (x, y) in [(&a, &b), (&a, &c), (&b, &c)] {
            assert!(range(x).end <= range(y).start || range(y).end <= range(x).start, "{x:?} and {y:?} overlap");
        }
    }

    #[test]
    fn a_dropped_lease_frees_its_range() {
        let name = name("dropped");
        let a = IdLease::claim(&name, 3, BLOCK).unwrap();
        let base = a.base();
        drop(a);
        assert_eq!(IdLease::claim(&name, 3, BLOCK).unwrap().base(), base);
    }

    #[test]
    fn a_range_of_several_blocks_holds_them_all() {
        let name = name("several");
        let big = IdLease::claim(&name, 10, 2 * BLOCK + 1).unwrap();
        assert_eq!(big.base(), FIRST_ID + 10 * BLOCK);
        // Blocks 10, 11 and 12 are taken: a claim hinted at 11 or 12 goes on.
        let next = IdLease::claim(&name, 11, BLOCK).unwrap();
        assert_eq!(next.base(), FIRST_ID + 13 * BLOCK);
    }

    #[test]
    fn the_last_block_ends_inside_the_id_space_and_the_search_wraps() {
        let name = name("wrap");
        let last = IdLease::claim(&name, BLOCKS - 1, BLOCK).unwrap();
        assert_eq!(last.base() as u64 + BLOCK as u64, FIRST_ID as u64 + BLOCKS as u64 * BLOCK as u64);
        assert!(range(&last).end <= u32::MAX as u64);
        let wrapped = IdLease::claim(&name, BLOCKS - 1, BLOCK).unwrap();
        assert_eq!(wrapped.base(), FIRST_ID);
    }

    #[test]
    fn refuses_empty_and_oversized_ranges() {
        assert_eq!(IdLease::claim(&name("bad"), 0, 0).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(IdLease::claim(&name("bad"), 0, u32::MAX).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }
}
