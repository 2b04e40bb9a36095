//! The local engine's waiting room: requests wait in one lane per user, and the engine
//! takes them round-robin across the lanes, so one user's many queued requests cannot push
//! another user's request to the back.
//!
//! A user who gets a request taken goes behind every other user who is waiting; a user
//! who had nothing waiting joins at the back. So a request waits for at most one request
//! of each other waiting user before it (plus its own user's earlier ones), however many
//! those users queued. Within a lane requests keep their order.
//!
//! Lanes are kept in a `VecDeque` and found by a linear scan: there are at most as many as
//! requests waiting, which the engine bounds (`queue_capacity`, 64 by default), and a scan
//! of a few dozen keys is cheaper than hashing plus keeping a separate order.

use std::collections::VecDeque;

/// Items of type `T` waiting in lanes keyed by `K` (the user they are for).
#[derive(Debug)]
pub struct FairQueue<K, T> {
    /// Non-empty lanes, in the order they will be served.
    lanes: VecDeque<(K, VecDeque<T>)>,
    len: usize,
}

impl<K, T> Default for FairQueue<K, T> {
    fn default() -> Self {
        Self {
            lanes: VecDeque::new(),
            len: 0,
        }
    }
}

impl<K: PartialEq, T> FairQueue<K, T> {
    /// Adds `item` at the end of `key`'s lane (a new lane joins at the back).
    pub fn push(&mut self, key: K, item: T) {
        match self.lanes.iter_mut().find(|(lane_key, _)| *lane_key == key) {
            Some((_, lane)) => lane.push_back(item),
            None => self.lanes.push_back((key, VecDeque::from([item]))),
        }
        self.len += 1;
    }

    /// Takes the first item of the lane whose turn it is; that lane then goes to the back.
    pub fn pop(&mut self) -> Option<T> {
        let (key, mut lane) = self.lanes.pop_front()?;
        let item = lane.pop_front();
        if !lane.is_empty() {
            self.lanes.push_back((key, lane));
        }
        if item.is_some() {
            self.len -= 1;
        }
        item
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::FairQueue;

    fn drain(queue: &mut FairQueue<&'static str, String>) -> Vec<String> {
        std::iter::from_fn(|| queue.pop()).collect()
    }

    #[test]
    fn one_users_many_requests_do_not_push_anothers_to_the_back() {
        let mut queue = FairQueue::default();
        for i in 0..10 {
            queue.push("mallory", format!("mallory-{i}"));
        }
        queue.push("alice", "alice-0".to_string());
        assert_eq!(queue.len(), 11);
        let order = drain(&mut queue);
        let alice_at = order.iter().position(|item| item == "alice-0").unwrap();
        // First come would serve Alice 11th; taking turns serves her second.
        assert_eq!(alice_at, 1, "{order:?}");
        // Mallory's own requests keep their order.
        let mallory: Vec<_> = order.iter().filter(|i| i.starts_with("mallory")).collect();
        let expected: Vec<String> = (0..10).map(|i| format!("mallory-{i}")).collect();
        assert_eq!(mallory, expected.iter().collect::<Vec<_>>());
        assert!(queue.is_empty());
    }

    #[test]
    fn waiting_users_take_turns() {
        let mut queue = FairQueue::default();
        for i in 0..3 {
            queue.push("a", format!("a{i}"));
        }
        for i in 0..2 {
            queue.push("b", format!("b{i}"));
        }
        queue.push("c", "c0".to_string());
        assert_eq!(drain(&mut queue), ["a0", "b0", "c0", "a1", "b1", "a2"]);
    }

    #[test]
    fn a_user_served_just_now_waits_behind_the_others() {
        let mut queue = FairQueue::default();
        queue.push("a", "a0".to_string());
        queue.push("b", "b0".to_string());
        assert_eq!(queue.pop().as_deref(), Some("a0"));
        // A's lane emptied; A's next request joins behind B, who waited.
        queue.push("a", "a1".to_string());
        assert_eq!(drain(&mut queue), ["b0", "a1"]);
        assert_eq!(queue.pop(), None);
        assert_eq!(queue.len(), 0);
    }
}
