//! One shard's pins, stored compactly: a million pins must fit in the memory a proxy can spare.
//!
//! Entries live in one slab (`Vec<Slot>`) and are found through a `hashbrown::HashTable` of
//! slot numbers; the LRU order is a list linked by slot numbers, not pointers. A slot holds the
//! id's 128-bit hash, the pin's times in milliseconds and the number of its target: what many
//! pins share (the service scope, the kind, the revision's name and the pod) is kept once per
//! shard, counted by the slots that use it. About 90 bytes a pin, where a `LruCache` of the
//! full key and entry took about 290.
//!
//! Owns storage and order only: what a pin's times mean (expiry, verification, watches) is
//! `MemoryPins`'s.

use std::collections::HashMap;
use std::sync::Arc;

use hashbrown::HashTable;

use crate::pins::{Pin, PinKey, PinKind};

/// No slot: the end of the LRU list.
const NIL: u32 = u32::MAX;

/// What the table keeps of a pin besides its key and target, in milliseconds: wall-clock time
/// for what replicas share, this process's clock (`super::clock`) for the rest.
#[derive(Clone, Copy, Debug)]
pub(super) struct Meta {
    pub ttl_ms: u32,
    /// The epoch of the shared store's last confirmation; `UNVERIFIED` for none.
    pub verified_epoch: u32,
    /// `u64::MAX`: no absolute cap.
    pub max_age_ms: u64,
    /// Wall-clock time of the first write, shared with other replicas for `max_age`.
    pub written_ms: u64,
    /// The same moment on this process's clock.
    pub born: i64,
    pub expires: i64,
    /// When the shared store last confirmed this pin (with `verified_epoch`).
    pub verified_at: i64,
    /// Used since the last refresh (its slot is in the shard's touched list).
    pub touched: bool,
    /// Its session is watched for its end (the shard holds the watch).
    pub watched: bool,
}

/// `Meta::verified_epoch` of a pin the shared store never confirmed.
pub(super) const UNVERIFIED: u32 = u32::MAX;

struct Slot {
    /// The id's hash in two halves, so a slot aligns to 8 bytes rather than 16.
    id_hash: [u64; 2],
    meta: Meta,
    /// `NIL` while the slot is free.
    target: u32,
    prev: u32,
    /// The next slot in LRU order, or in the free list while the slot is free.
    next: u32,
}

/// What pins share: one per scope, kind and pin in the shard, with the count of its slots.
#[derive(Clone, PartialEq, Eq, Hash)]
struct TargetKey {
    scope: Arc<str>,
    kind: PinKind,
    pin: Pin,
}

pub(super) struct Table {
    index: HashTable<u32>,
    slots: Vec<Slot>,
    free: u32,
    /// Most and least recently used.
    head: u32,
    tail: u32,
    len: usize,
    /// Slots beyond this are never made: the shard's bound.
    bound: usize,
    targets: Vec<(TargetKey, u32)>,
    target_numbers: HashMap<TargetKey, u32>,
    free_targets: Vec<u32>,
}

fn halves(hash: u128) -> [u64; 2] {
    [hash as u64, (hash >> 64) as u64]
}

/// The index's hash of a key: the high half, as the shard was chosen by the low one.
fn index_hash(id_hash: [u64; 2]) -> u64 {
    id_hash[1]
}

impl Table {
    pub(super) fn new(bound: usize) -> Self {
        Table {
            index: HashTable::new(),
            slots: Vec::new(),
            free: NIL,
            head: NIL,
            tail: NIL,
            len: 0,
            bound,
            targets: Vec::new(),
            target_numbers: HashMap::new(),
            free_targets: Vec::new(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The slot holding `key`.
    pub(super) fn find(&self, key: &PinKey) -> Option<u32> {
        let id_hash = halves(key.id_hash);
        let (slots, targets) = (&self.slots, &self.targets);
        self.index
            .find(index_hash(id_hash), |&i| {
                let slot = &slots[i as usize];
                let (target, _) = &targets[slot.target as usize];
                slot.id_hash == id_hash && target.kind == key.kind && target.scope == key.scope
            })
            .copied()
    }

    pub(super) fn meta(&self, slot: u32) -> &Meta {
        &self.slots[slot as usize].meta
    }

    pub(super) fn meta_mut(&mut self, slot: u32) -> &mut Meta {
        &mut self.slots[slot as usize].meta
    }

    pub(super) fn pin(&self, slot: u32) -> &Pin {
        &self.targets[self.slots[slot as usize].target as usize].0.pin
    }

    /// The scope of the service whose pin the slot holds.
    pub(super) fn scope(&self, slot: u32) -> &Arc<str> {
        &self.targets[self.slots[slot as usize].target as usize].0.scope
    }

    /// Whether `slot` holds a pin (a slot named in the touched list may have been freed since).
    pub(super) fn holds(&self, slot: u32) -> bool {
        self.slots.get(slot as usize).is_some_and(|s| s.target != NIL)
    }

    pub(super) fn key(&self, slot: u32) -> PinKey {
        let s = &self.slots[slot as usize];
        let (target, _) = &self.targets[s.target as usize];
        let id_hash = u128::from(s.id_hash[0]) | (u128::from(s.id_hash[1]) << 64);
        PinKey { scope: target.scope.clone(), kind: target.kind, id_hash }
    }

    /// Marks `slot` the most recently used.
    pub(super) fn promote(&mut self, slot: u32) {
        if self.head != slot {
            self.unlink(slot);
            self.link_front(slot);
        }
    }

    /// The least recently used slot.
    pub(super) fn lru(&self) -> Option<u32> {
        (self.tail != NIL).then_some(self.tail)
    }

    /// The slots holding pins, in no order.
    pub(super) fn occupied(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.slots.len() as u32).filter(|&i| self.slots[i as usize].target != NIL)
    }

    /// Puts `pin` at `key`, most recently used. Returns the slot, and the pin and times it
    /// replaced.
    pub(super) fn insert(&mut self, key: &PinKey, pin: Pin, meta: Meta) -> (u32, Option<(Pin, Meta)>) {
        let target = self.intern(TargetKey { scope: key.scope.clone(), kind: key.kind, pin });
        if let Some(slot) = self.find(key) {
            let s = &mut self.slots[slot as usize];
            let (old_target, old_meta) =
                (std::mem::replace(&mut s.target, target), std::mem::replace(&mut s.meta, meta));
            let old_pin = self.release(old_target);
            self.promote(slot);
            return (slot, Some((old_pin, old_meta)));
        }
        let id_hash = halves(key.id_hash);
        let slot = self.allocate(Slot { id_hash, meta, target, prev: NIL, next: NIL });
        self.link_front(slot);
        let slots = &self.slots;
        self.index.insert_unique(index_hash(id_hash), slot, |&i| index_hash(slots[i as usize].id_hash));
        self.len += 1;
        (slot, None)
    }

    /// Takes the pin out of `slot`: its key, pin and times.
    pub(super) fn remove(&mut self, slot: u32) -> (PinKey, Pin, Meta) {
        let key = self.key(slot);
        self.unlink(slot);
        let id_hash = self.slots[slot as usize].id_hash;
        if let Ok(entry) = self.index.find_entry(index_hash(id_hash), |&i| i == slot) {
            entry.remove();
        }
        let s = &mut self.slots[slot as usize];
        let target = std::mem::replace(&mut s.target, NIL);
        let meta = s.meta;
        s.next = self.free;
        self.free = slot;
        self.len -= 1;
        (key, self.release(target), meta)
    }

    fn allocate(&mut self, slot: Slot) -> u32 {
        if self.free != NIL {
            let i = self.free;
            self.free = self.slots[i as usize].next;
            self.slots[i as usize] = slot;
            return i;
        }
        // Grown by a quarter at a time, never past the bound, so a full table wastes little.
        if self.slots.len() == self.slots.capacity() {
            let room = self.bound.saturating_add(1).saturating_sub(self.slots.len());
            self.slots.reserve_exact((self.slots.len() / 4).max(16).min(room.max(1)));
        }
        self.slots.push(slot);
        (self.slots.len() - 1) as u32
    }

    fn unlink(&mut self, slot: u32) {
        let (prev, next) = {
            let s = &self.slots[slot as usize];
            (s.prev, s.next)
        };
        match prev {
            NIL => self.head = next,
            p => self.slots[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n as usize].prev = prev,
        }
    }

    fn link_front(&mut self, slot: u32) {
        let old_head = self.head;
        let s = &mut self.slots[slot as usize];
        s.prev = NIL;
        s.next = old_head;
        match old_head {
            NIL => self.tail = slot,
            h => self.slots[h as usize].prev = slot,
        }
        self.head = slot;
    }

    /// The number of `target`, shared with the slots that already use it.
    fn intern(&mut self, target: TargetKey) -> u32 {
        if let Some(&n) = self.target_numbers.get(&target) {
            self.targets[n as usize].1 += 1;
            return n;
        }
        let n = match self.free_targets.pop() {
            Some(n) => {
                self.targets[n as usize] = (target.clone(), 1);
                n
            }
            None => {
                self.targets.push((target.clone(), 1));
                (self.targets.len() - 1) as u32
            }
        };
        self.target_numbers.insert(target, n);
        n
    }

    /// One slot less uses `target`; the last one frees it. Returns its pin.
    fn release(&mut self, target: u32) -> Pin {
        let (key, refs) = &mut self.targets[target as usize];
        *refs -= 1;
        let pin = key.pin.clone();
        if *refs == 0 {
            let key = key.clone();
            self.target_numbers.remove(&key);
            self.free_targets.push(target);
        }
        pin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(ttl_ms: u32) -> Meta {
        Meta {
            ttl_ms,
            verified_epoch: UNVERIFIED,
            max_age_ms: u64::MAX,
            written_ms: 0,
            born: 0,
            expires: 0,
            verified_at: 0,
            touched: false,
            watched: false,
        }
    }

    fn key(scope: &Arc<str>, kind: PinKind, id: u32) -> PinKey {
        PinKey::new(scope, kind, &id.to_le_bytes())
    }

    #[test]
    fn keys_differ_by_scope_and_kind_and_the_lru_order_follows_use() {
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("ns/a"), Arc::from("ns/b"));
        let mut table = Table::new(100);
        let pod = std::net::SocketAddr::from(([127, 0, 0, 1], 1));
        let (first, _) = table.insert(&key(&a, PinKind::Session, 1), Pin::session("r1", pod), meta(1));
        table.insert(&key(&a, PinKind::Flow, 1), Pin::flow("r1"), meta(2));
        table.insert(&key(&b, PinKind::Session, 1), Pin::session("r1", pod), meta(3));
        assert_eq!(table.len(), 3);
        assert_eq!(table.meta(table.find(&key(&a, PinKind::Flow, 1)).unwrap()).ttl_ms, 2);
        assert_eq!(table.meta(table.find(&key(&b, PinKind::Session, 1)).unwrap()).ttl_ms, 3);
        assert_eq!(table.lru(), Some(first));
        table.promote(first);
        let (evicted, _, _) = table.remove(table.lru().unwrap());
        assert_eq!(evicted, key(&a, PinKind::Flow, 1), "the least recently used went");
        assert!(table.find(&evicted).is_none());
        assert_eq!(table.targets.iter().filter(|(_, refs)| *refs > 0).count(), 2, "sessions into r1 share one target");
    }

    #[test]
    fn slots_and_targets_are_reused_and_replacing_returns_the_old_pin() {
        let scope: Arc<str> = Arc::from("ns/svc");
        let mut table = Table::new(1000);
        for round in 0..3u32 {
            for id in 0..100 {
                let (_, old) = table.insert(&key(&scope, PinKind::Flow, id), Pin::flow(format!("r{round}")), meta(id));
                assert!(old.is_none());
            }
            let (_, old) = table.insert(&key(&scope, PinKind::Flow, 7), Pin::flow("other"), meta(0));
            assert_eq!(old.map(|(pin, m)| (pin, m.ttl_ms)), Some((Pin::flow(format!("r{round}")), 7)));
            while let Some(lru) = table.lru() {
                table.remove(lru);
            }
            assert_eq!(table.len(), 0);
        }
        assert!(table.slots.len() <= 100, "freed slots are used again: {}", table.slots.len());
        assert!(table.targets.len() <= 2, "freed targets are used again: {}", table.targets.len());
        assert!(table.target_numbers.is_empty());
    }
}
