//! Index pools: VIP indices and backend slots are handed out from a free list and go back to
//! it when their VIP or backend goes. The list is first-in, first-out, so a freed index is
//! reused as late as possible (a packet still reading an old table never meets it reused at
//! once), and every reuse of a backend slot comes with a new generation, so no
//! connection-table entry made for its previous owner is honoured.

use std::collections::VecDeque;

/// Free indices below a limit, reused oldest-freed first.
#[derive(Clone, Debug)]
pub struct Pool {
    free: VecDeque<u32>,
    limit: u32,
}

impl Pool {
    /// Every index below `limit` free.
    pub fn new(limit: u32) -> Self {
        Self::with_used(limit, |_| false)
    }

    /// The indices below `limit` for which `used` is false are free.
    pub fn with_used(limit: u32, used: impl Fn(u32) -> bool) -> Self {
        Self {
            free: (0..limit).filter(|i| !used(*i)).collect(),
            limit,
        }
    }

    pub fn take(&mut self) -> Option<u32> {
        self.free.pop_front()
    }

    pub fn give_back(&mut self, i: u32) {
        debug_assert!(i < self.limit && !self.free.contains(&i));
        self.free.push_back(i);
    }

    /// How many are free.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// How many are in use.
    pub fn in_use(&self) -> usize {
        self.limit as usize - self.free.len()
    }
}

/// Generations of the backend slots: a slot's generation changes whenever the
/// connection-table entries that point at it must stop being honoured. Zero means never used.
#[derive(Clone, Debug)]
pub struct Generations(Vec<u32>);

impl Generations {
    pub fn new(slots: u32) -> Self {
        Self(vec![0; slots as usize])
    }

    pub fn get(&self, slot: u32) -> u32 {
        self.0[slot as usize]
    }

    /// Records what the map holds (adoption).
    pub fn set(&mut self, slot: u32, generation: u32) {
        self.0[slot as usize] = generation;
    }

    /// The slot's next generation (never 0), recorded.
    pub fn bump(&mut self, slot: u32) -> u32 {
        let g = &mut self.0[slot as usize];
        *g = g.wrapping_add(1).max(1);
        *g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_freed_first_reused() {
        let mut p = Pool::new(4);
        let taken: Vec<u32> = (0..4).map(|_| p.take().unwrap()).collect();
        assert_eq!(taken, [0, 1, 2, 3]);
        assert_eq!(p.take(), None);
        p.give_back(2);
        p.give_back(0);
        assert_eq!(p.in_use(), 2);
        assert_eq!(p.take(), Some(2));
        assert_eq!(p.take(), Some(0));
        let p = Pool::with_used(5, |i| i % 2 == 0);
        assert_eq!(p.available(), 2);
    }

    #[test]
    fn generations_never_repeat_zero() {
        let mut g = Generations::new(2);
        assert_eq!(g.bump(1), 1);
        g.set(0, u32::MAX);
        assert_eq!(g.bump(0), 1);
    }
}
