//! A task's piece digests as peers report them, and who is wrong when they disagree.
//!
//! The authority is a trusted seed peer (one the scheduler's config names): it fetched the
//! piece from the origin, so its CRC is the piece's. A peer whose report disagrees with the
//! authority holds wrong bytes and is isolated (offered to nobody) until it reports that
//! piece again with the right digest. Before the authority has spoken, reports are
//! compared with each other: a digest backed by two source addresses beats a lone
//! dissenter; a one-against-one dispute waits for a third address. Everything is pure;
//! peers are named by their sequence number ([`crate::resource::Peer::seq`]).

use std::collections::HashMap;
use std::net::IpAddr;

/// Voters remembered per side of a dispute.
const MAX_VOTERS: usize = 8;
/// Addresses needed to out-vote a lone dissenter.
const MAJORITY: usize = 2;

/// Who reports a digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reporter {
    pub seq: u32,
    pub ip: Option<IpAddr>,
    /// A trusted seed peer.
    pub authoritative: bool,
}

#[derive(Debug, Clone)]
struct Side {
    crc: u32,
    voters: Vec<(u32, Option<IpAddr>)>,
}

impl Side {
    fn new(crc: u32, r: Reporter) -> Side {
        Side {
            crc,
            voters: vec![(r.seq, r.ip)],
        }
    }

    /// Distinct source addresses on this side (a reporter without one counts alone).
    fn support(&self) -> usize {
        let mut ips: Vec<Option<IpAddr>> = Vec::new();
        let mut anonymous = 0;
        for (_, ip) in &self.voters {
            match ip {
                Some(_) if ips.contains(ip) => {}
                Some(_) => ips.push(*ip),
                None => anonymous += 1,
            }
        }
        ips.len() + anonymous
    }

    fn vote(&mut self, r: Reporter) {
        if self.voters.len() < MAX_VOTERS && !self.voters.iter().any(|(s, _)| *s == r.seq) {
            self.voters.push((r.seq, r.ip));
        }
    }
}

/// The digest book of one task.
#[derive(Debug, Clone, Default)]
pub struct DigestBook {
    authority: HashMap<u32, u32>,
    /// Pieces without authority: the sides reported so far (one, or two in a dispute).
    reported: HashMap<u32, Vec<Side>>,
}

/// What a report changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Peers now known to hold a wrong copy of the piece.
    pub wrong: Vec<u32>,
    /// The reporter holds the right copy (it agrees with the authority or the majority).
    pub right: bool,
    /// The authority's digest of this piece is new.
    pub new_authority: bool,
}

impl DigestBook {
    /// Entries held (for the scheduler's memory accounting).
    pub fn len(&self) -> usize {
        self.authority.len() + self.reported.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn authority(&self, number: u32) -> Option<u32> {
        self.authority.get(&number).copied()
    }

    /// Every authoritative digest, by piece number.
    pub fn authoritative(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.authority.iter().map(|(n, c)| (*n, *c))
    }

    /// Records that `reporter` holds piece `number` with CRC `crc`.
    pub fn report(&mut self, number: u32, crc: u32, reporter: Reporter) -> Outcome {
        if let Some(known) = self.authority.get(&number) {
            // The first authoritative digest stands (a seed never changes a piece).
            let right = *known == crc;
            return Outcome {
                wrong: if right {
                    Vec::new()
                } else {
                    vec![reporter.seq]
                },
                right,
                new_authority: false,
            };
        }
        if reporter.authoritative {
            self.authority.insert(number, crc);
            let wrong = self
                .reported
                .remove(&number)
                .unwrap_or_default()
                .into_iter()
                .filter(|side| side.crc != crc)
                .flat_map(|side| side.voters.into_iter().map(|(seq, _)| seq))
                .collect();
            return Outcome {
                wrong,
                right: true,
                new_authority: true,
            };
        }
        let sides = self.reported.entry(number).or_default();
        match sides.iter().position(|s| s.crc == crc) {
            Some(i) => sides[i].vote(reporter),
            None if sides.is_empty() => {
                sides.push(Side::new(crc, reporter));
                return Outcome {
                    right: true,
                    ..Outcome::default()
                };
            }
            None => {
                let leading = sides.iter().map(Side::support).max().unwrap_or(0);
                if leading >= MAJORITY {
                    // A lone dissenter against an established digest.
                    return Outcome {
                        wrong: vec![reporter.seq],
                        ..Outcome::default()
                    };
                }
                if sides.len() < 4 {
                    sides.push(Side::new(crc, reporter));
                }
            }
        }
        Self::resolve(sides, reporter.seq)
    }

    /// Settles a dispute once one side has [`MAJORITY`] addresses and every other side one.
    fn resolve(sides: &mut Vec<Side>, reporter: u32) -> Outcome {
        let right_of = |sides: &[Side]| {
            sides.iter().any(|s| {
                s.voters.iter().any(|(seq, _)| *seq == reporter) && s.support() >= MAJORITY
            })
        };
        if sides.len() < 2 {
            return Outcome {
                right: right_of(sides) || sides.len() == 1,
                ..Outcome::default()
            };
        }
        let Some(winner) = sides.iter().position(|s| s.support() >= MAJORITY) else {
            return Outcome::default();
        };
        if sides
            .iter()
            .enumerate()
            .any(|(i, s)| i != winner && s.support() >= MAJORITY)
        {
            return Outcome::default(); // two established digests: leave it to the seed
        }
        let right = right_of(sides);
        let wrong = sides
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != winner)
            .flat_map(|(_, s)| s.voters.iter().map(|(seq, _)| *seq))
            .collect();
        let kept = sides.swap_remove(winner);
        sides.clear();
        sides.push(kept);
        Outcome {
            wrong,
            right,
            new_authority: false,
        }
    }

    /// Forgets a reporter's votes (the peer left).
    pub fn forget(&mut self, seq: u32) {
        self.reported.retain(|_, sides| {
            for side in sides.iter_mut() {
                side.voters.retain(|(s, _)| *s != seq);
            }
            sides.retain(|s| !s.voters.is_empty());
            !sides.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 0, last]))
    }

    fn peer(seq: u32, last: u8) -> Reporter {
        Reporter {
            seq,
            ip: ip(last),
            authoritative: false,
        }
    }

    fn seed(seq: u32) -> Reporter {
        Reporter {
            seq,
            ip: ip(200),
            authoritative: true,
        }
    }

    #[test]
    fn the_authority_decides() {
        let mut book = DigestBook::default();
        // Before the seed speaks, a liar's report is only recorded.
        assert_eq!(book.report(0, 666, peer(1, 1)).wrong, Vec::<u32>::new());
        let o = book.report(0, 7, seed(9));
        assert_eq!(o.wrong, [1]);
        assert!(o.new_authority);
        // Afterwards every report is judged at once.
        assert!(book.report(0, 7, peer(2, 2)).right);
        assert_eq!(book.report(0, 8, peer(3, 3)).wrong, [3]);
        // The first authoritative digest stands.
        assert_eq!(book.report(0, 9, seed(10)).wrong, [10]);
        assert_eq!(book.authority(0), Some(7));
    }

    #[test]
    fn without_authority_the_majority_of_addresses_decides() {
        let mut book = DigestBook::default();
        assert!(book.report(1, 5, peer(1, 1)).right);
        assert!(book.report(1, 5, peer(2, 2)).wrong.is_empty());
        // Two addresses back 5: a lone 6 is wrong.
        assert_eq!(book.report(1, 6, peer(3, 3)).wrong, [3]);

        // One against one waits; a third address settles it.
        assert!(book.report(2, 5, peer(1, 1)).right);
        assert_eq!(book.report(2, 6, peer(3, 3)), Outcome::default());
        let o = book.report(2, 6, peer(4, 4));
        assert_eq!(o.wrong, [1]);
        assert!(o.right);
    }

    #[test]
    fn many_peers_on_one_address_count_once() {
        let mut book = DigestBook::default();
        assert!(book.report(0, 5, peer(1, 1)).right);
        // A stranger registers three peers from one address, all lying.
        for seq in 10..13 {
            let o = book.report(0, 6, peer(seq, 99));
            assert!(o.wrong.is_empty(), "{o:?}");
        }
        // An honest second address settles it against the liar's peers.
        let o = book.report(0, 5, peer(2, 2));
        assert_eq!(o.wrong, [10, 11, 12]);
        assert!(o.right);
    }

    #[test]
    fn forgotten_reporters_leave_no_trace() {
        let mut book = DigestBook::default();
        book.report(0, 5, peer(1, 1));
        book.report(1, 5, peer(1, 1));
        assert_eq!(book.len(), 2);
        book.forget(1);
        assert!(book.is_empty());
    }
}
