//! Connection slots, for both ports: a slab whose entries are named by a `ConnId` (the
//! slot's index plus a generation that changes every time the slot is filled), so a
//! late readiness event or completion for a closed connection never reaches the one that
//! took its slot; and the mio `Token` that carries a `ConnId` and its port.

use mio::Token;
use slab::Slab;

/// Identifies a connection across slot reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnId {
    pub(crate) index: usize,
    pub(crate) generation: u32,
}

/// Which listener a connection came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Port {
    Sensor,
    Http,
}

/// Token layout: bits 0-31 index, bits 32-62 generation, bit 63 set for HTTP
/// connections. Generation 0 is never used by a connection, which leaves tokens with
/// generation 0 for the listeners, the waker and the signal pipe.
const HTTP_BIT: usize = 1 << 63;
const GENERATION_MASK: u32 = 0x7fff_ffff;

impl ConnId {
    pub(crate) fn token(self, port: Port) -> Token {
        let t = ((self.generation as usize) << 32) | self.index;
        Token(match port {
            Port::Sensor => t,
            Port::Http => t | HTTP_BIT,
        })
    }

    /// Splits a connection's token into its port and id.
    pub(crate) fn from_token(token: Token) -> (Port, ConnId) {
        let t = token.0;
        let id = ConnId {
            index: t & 0xffff_ffff,
            generation: ((t & !HTTP_BIT) >> 32) as u32,
        };
        let port = if t & HTTP_BIT != 0 {
            Port::Http
        } else {
            Port::Sensor
        };
        (port, id)
    }
}

/// The generation after `g`, skipping 0.
fn next_generation(g: u32) -> u32 {
    match g.wrapping_add(1) & GENERATION_MASK {
        0 => 1,
        n => n,
    }
}

/// Connections by `ConnId`.
pub(crate) struct Slots<T> {
    slab: Slab<(u32, T)>,
    generation: u32,
}

impl<T> Slots<T> {
    pub(crate) fn with_capacity(capacity: usize) -> Slots<T> {
        Slots {
            slab: Slab::with_capacity(capacity),
            generation: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.slab.len()
    }

    /// Fills a free slot with what `make` builds from the slot's new id (it registers
    /// the socket under the id's token); leaves the slot free if `make` fails.
    pub(crate) fn insert_with<E>(
        &mut self,
        make: impl FnOnce(ConnId) -> Result<T, E>,
    ) -> Result<ConnId, E> {
        self.generation = next_generation(self.generation);
        let entry = self.slab.vacant_entry();
        let id = ConnId {
            index: entry.key(),
            generation: self.generation,
        };
        entry.insert((id.generation, make(id)?));
        Ok(id)
    }

    /// The connection `id` names, if it is still open.
    pub(crate) fn get_mut(&mut self, id: ConnId) -> Option<&mut T> {
        self.slab
            .get_mut(id.index)
            .filter(|(generation, _)| *generation == id.generation)
            .map(|(_, value)| value)
    }

    /// Takes connection `id` out, if it is still open.
    pub(crate) fn remove(&mut self, id: ConnId) -> Option<T> {
        self.get_mut(id)?;
        Some(self.slab.remove(id.index).1)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (ConnId, &T)> {
        self.slab.iter().map(|(index, (generation, value))| {
            let id = ConnId {
                index,
                generation: *generation,
            };
            (id, value)
        })
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (ConnId, &mut T)> {
        self.slab.iter_mut().map(|(index, (generation, value))| {
            let id = ConnId {
                index,
                generation: *generation,
            };
            (id, value)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_keep_the_ports_apart() {
        let id = ConnId {
            index: 12345,
            generation: GENERATION_MASK,
        };
        assert_eq!(
            ConnId::from_token(id.token(Port::Sensor)),
            (Port::Sensor, id)
        );
        assert_eq!(ConnId::from_token(id.token(Port::Http)), (Port::Http, id));
        assert_ne!(id.token(Port::Sensor), id.token(Port::Http));
        assert_eq!(next_generation(GENERATION_MASK), 1);
        assert_eq!(next_generation(7), 8);
    }

    #[test]
    fn a_reused_slot_does_not_answer_to_its_old_id() {
        let mut slots = Slots::with_capacity(1);
        let old = slots.insert_with(|_| Ok::<_, ()>("old")).expect("inserted");
        assert_eq!(slots.remove(old), Some("old"));
        let new = slots.insert_with(|_| Ok::<_, ()>("new")).expect("inserted");
        assert_eq!(new.index, old.index);
        assert_eq!(slots.get_mut(old), None);
        assert_eq!(slots.remove(old), None);
        assert_eq!(slots.get_mut(new), Some(&mut "new"));
        assert_eq!(slots.iter().map(|(id, _)| id).collect::<Vec<_>>(), [new]);
    }

    #[test]
    fn a_failed_insert_leaves_the_slot_free() {
        let mut slots: Slots<&str> = Slots::with_capacity(1);
        assert_eq!(slots.insert_with(|_| Err("refused")), Err("refused"));
        assert_eq!(slots.len(), 0);
    }
}
