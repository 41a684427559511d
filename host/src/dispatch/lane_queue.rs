//! Deliveries fan-out leased behind another of their lane that this instance holds: each
//! waits here until the one before it closes, then runs with no claim. If that one stays
//! open instead (a retry, a lost lease, an outcome not recorded, a lease given back), the
//! lane must wait in the store for a claim, and what queued behind it is given back.
//!
//! Fan-out reads a lane in the store and returns later; the delivery it queued behind may
//! have ended in between, or be claimed and not yet started. So an ending is kept until no
//! fan-out that could have read the lane before it is still running.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::store::ClaimedDelivery;

/// How a delivery this instance held ended, as the one queued behind it needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Closed (delivered, skipped, dead): the lane moves on.
    Closed,
    /// Still open in the store: the lane waits for a claim.
    Open,
}

/// What the caller must do after a change.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// Leases to give back: these deliveries will not run here.
    pub release: Vec<i64>,
    /// Deliveries that became due.
    pub ready: usize,
}

impl Effects {
    pub fn add(&mut self, more: Effects) {
        self.release.extend(more.release);
        self.ready += more.ready;
    }
}

#[derive(Default)]
pub struct LaneQueue {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Queued deliveries by the id of the one each waits for.
    behind: HashMap<i64, Waiting>,
    /// Due: the one before closed.
    ready: VecDeque<ClaimedDelivery>,
    /// Held deliveries that ended, while a running fan-out may still queue behind them.
    endings: HashMap<i64, Ending>,
    /// Fan-outs begun so far.
    fan_outs: u64,
}

struct Waiting {
    delivery: ClaimedDelivery,
    since: Instant,
}

struct Ending {
    ended: Ended,
    /// Fan-outs begun before it was recorded.
    fan_outs: u64,
    at: Instant,
}

/// A fan-out in progress, from [`LaneQueue::begin_fan_out`].
#[derive(Debug, Clone, Copy)]
pub struct FanOutTicket(u64);

impl LaneQueue {
    /// Queue `delivery` behind the delivery `behind`, or as due with none.
    pub fn queue(&self, behind: Option<i64>, delivery: ClaimedDelivery) -> Effects {
        let mut state = self.lock();
        let mut effects = Effects::default();
        let Some(behind) = behind else {
            state.ready.push_back(delivery);
            effects.ready = 1;
            return effects;
        };
        match state.endings.get(&behind).map(|e| e.ended) {
            Some(Ended::Closed) => {
                state.ready.push_back(delivery);
                effects.ready = 1;
            }
            Some(Ended::Open) => state.give_back(delivery.delivery_id, &mut effects),
            None if state.behind.contains_key(&behind) => {
                // Fan-out queues behind a lane's latest only; two behind one would be a
                // fault of the store. Giving this one back keeps the lane in order.
                tracing::warn!(
                    delivery_id = delivery.delivery_id,
                    behind,
                    "a second delivery queued behind the same one; giving it back"
                );
                state.give_back(delivery.delivery_id, &mut effects);
            }
            None => {
                state.behind.insert(
                    behind,
                    Waiting {
                        delivery,
                        since: Instant::now(),
                    },
                );
            }
        }
        effects
    }

    /// Record how the delivery `id` ended (its outcome is committed, or will not be).
    pub fn settle(&self, id: i64, ended: Ended) -> Effects {
        let mut state = self.lock();
        let mut effects = Effects::default();
        state.record(id, ended);
        if let Some(next) = state.behind.remove(&id) {
            match ended {
                Ended::Closed => {
                    state.ready.push_back(next.delivery);
                    effects.ready = 1;
                }
                Ended::Open => state.give_back(next.delivery.delivery_id, &mut effects),
            }
        }
        effects
    }

    /// Give back `id`, a delivery held here that will not run, and what queued behind it.
    pub fn give_back(&self, id: i64) -> Effects {
        let mut effects = Effects::default();
        self.lock().give_back(id, &mut effects);
        effects
    }

    /// Up to `max` due deliveries, oldest first.
    pub fn take_ready(&self, max: usize) -> Vec<ClaimedDelivery> {
        let mut state = self.lock();
        let count = max.min(state.ready.len());
        state.ready.drain(..count).collect()
    }

    /// Deliveries queued or due here.
    pub fn len(&self) -> usize {
        let state = self.lock();
        state.behind.len() + state.ready.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Deliveries waiting longer than `older_than` behind one that `held` does not hold
    /// (nothing here runs or queues it, so nothing here will end it: its claim's answer
    /// was lost, say). Their predecessors, to be settled as [`Ended::Open`].
    pub fn stranded(&self, held: &HashSet<i64>, older_than: Duration) -> Vec<i64> {
        let state = self.lock();
        state
            .behind
            .iter()
            .filter(|(behind, waiting)| {
                !held.contains(behind) && waiting.since.elapsed() >= older_than
            })
            .map(|(behind, _)| *behind)
            .collect()
    }

    /// Every delivery queued or due here, taken out (on shutdown, to give them back).
    pub fn take_all(&self) -> Vec<i64> {
        let mut state = self.lock();
        let mut ids: Vec<i64> = state
            .behind
            .drain()
            .map(|(_, waiting)| waiting.delivery.delivery_id)
            .collect();
        ids.extend(state.ready.drain(..).map(|d| d.delivery_id));
        ids
    }

    pub fn begin_fan_out(&self) -> FanOutTicket {
        let mut state = self.lock();
        state.fan_outs += 1;
        FanOutTicket(state.fan_outs)
    }

    /// A fan-out ended: forget the endings no fan-out still running can have read as
    /// open. Fan-outs run one at a time, so every one begun before this one has ended. An
    /// ending that left the delivery open is kept until its lease (up to `lease` from its
    /// last renewal) has run out too: until then the store shows the lane held here.
    pub fn end_fan_out(&self, ticket: FanOutTicket, lease: Duration) {
        let mut state = self.lock();
        let FanOutTicket(begun) = ticket;
        state.endings.retain(|_, ending| {
            let read_since = ending.fan_outs < begun;
            let lease_over = ending.at.elapsed() >= lease * 2;
            let forget = match ending.ended {
                Ended::Closed => read_since,
                Ended::Open => read_since && lease_over,
            };
            !forget
        });
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    fn record(&mut self, id: i64, ended: Ended) {
        let ending = Ending {
            ended,
            fan_outs: self.fan_outs,
            at: Instant::now(),
        };
        self.endings.insert(id, ending);
    }

    /// Give back `id` and, in turn, whatever queued behind it.
    fn give_back(&mut self, id: i64, effects: &mut Effects) {
        let mut next = Some(id);
        while let Some(id) = next {
            effects.release.push(id);
            self.record(id, Ended::Open);
            next = self
                .behind
                .remove(&id)
                .map(|waiting| waiting.delivery.delivery_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Event, EventStatus};

    fn delivery(id: i64) -> ClaimedDelivery {
        ClaimedDelivery {
            delivery_id: id,
            route: "orders".into(),
            attempt: 1,
            idempotency_key: format!("key-{id}"),
            already_completed: None,
            event: Event {
                event_id: id,
                event_target: None,
                event_type: "order.created".into(),
                entity_type: "order".into(),
                entity_id: "1".into(),
                event_data: Some("{}".into()),
                event_status: EventStatus::Ready,
                status_reason: None,
                idempotency_key: None,
                headers: None,
                created_at: chrono::Utc::now(),
            },
        }
    }

    fn ready_ids(queue: &LaneQueue) -> Vec<i64> {
        queue
            .take_ready(usize::MAX)
            .iter()
            .map(|d| d.delivery_id)
            .collect()
    }

    #[test]
    fn a_queued_delivery_is_due_once_the_one_before_closes() {
        let queue = LaneQueue::default();
        assert_eq!(queue.queue(Some(1), delivery(2)), Effects::default());
        assert_eq!(queue.queue(Some(2), delivery(3)), Effects::default());
        assert!(ready_ids(&queue).is_empty());
        assert_eq!(queue.settle(1, Ended::Closed).ready, 1);
        assert_eq!(ready_ids(&queue), vec![2]);
        assert_eq!(queue.len(), 1, "3 still waits for 2");
        queue.settle(2, Ended::Closed);
        assert_eq!(ready_ids(&queue), vec![3]);
        assert!(queue.is_empty());
    }

    #[test]
    fn a_delivery_queued_behind_nothing_is_due_at_once() {
        let queue = LaneQueue::default();
        assert_eq!(queue.queue(None, delivery(9)).ready, 1);
        assert_eq!(ready_ids(&queue), vec![9]);
    }

    #[test]
    fn a_lane_left_open_gives_back_everything_queued_behind_it_in_turn() {
        let queue = LaneQueue::default();
        queue.queue(Some(1), delivery(2));
        queue.queue(Some(2), delivery(3));
        let effects = queue.settle(1, Ended::Open);
        assert_eq!(effects.release, vec![2, 3]);
        assert_eq!(effects.ready, 0);
        assert!(queue.is_empty());
        // A fan-out that read the lane before the retry queues behind 3: given back too.
        assert_eq!(queue.queue(Some(3), delivery(4)).release, vec![4]);
    }

    #[test]
    fn a_delivery_queued_after_the_one_before_ended_is_decided_by_that_ending() {
        let queue = LaneQueue::default();
        let ticket = queue.begin_fan_out();
        queue.settle(1, Ended::Closed);
        queue.settle(5, Ended::Open);
        assert_eq!(queue.queue(Some(1), delivery(2)).ready, 1);
        assert_eq!(queue.queue(Some(5), delivery(6)).release, vec![6]);
        queue.end_fan_out(ticket, Duration::from_secs(60));
        assert_eq!(ready_ids(&queue), vec![2]);
    }

    #[test]
    fn endings_are_kept_until_a_fan_out_begun_after_them_ends() {
        let queue = LaneQueue::default();
        let running = queue.begin_fan_out();
        queue.settle(1, Ended::Closed);
        queue.end_fan_out(running, Duration::from_secs(60));
        // The fan-out that was running may have read the lane before 1 closed.
        assert_eq!(queue.queue(Some(1), delivery(2)).ready, 1);
        let later = queue.begin_fan_out();
        queue.end_fan_out(later, Duration::from_secs(60));
        // Now the ending is gone; a delivery behind 1 would wait for it.
        assert_eq!(queue.queue(Some(1), delivery(3)), Effects::default());
        assert_eq!(queue.len(), 2);
    }

    #[test]
    fn an_open_ending_outlives_the_lease_it_may_still_hold() {
        let queue = LaneQueue::default();
        queue.settle(1, Ended::Open);
        let later = queue.begin_fan_out();
        queue.end_fan_out(later, Duration::from_secs(60));
        assert_eq!(queue.queue(Some(1), delivery(2)).release, vec![2]);
        queue.settle(7, Ended::Open);
        let ticket = queue.begin_fan_out();
        queue.end_fan_out(ticket, Duration::ZERO);
        assert_eq!(queue.queue(Some(7), delivery(8)), Effects::default());
    }

    #[test]
    fn a_second_delivery_behind_the_same_one_is_given_back() {
        let queue = LaneQueue::default();
        queue.queue(Some(1), delivery(2));
        assert_eq!(queue.queue(Some(1), delivery(3)).release, vec![3]);
        queue.settle(1, Ended::Closed);
        assert_eq!(ready_ids(&queue), vec![2]);
    }

    #[test]
    fn a_delivery_behind_one_nothing_here_holds_is_stranded_after_a_while() {
        let queue = LaneQueue::default();
        queue.queue(Some(1), delivery(2));
        queue.queue(Some(2), delivery(3));
        let held: HashSet<i64> = [2, 3].into_iter().collect();
        assert!(queue.stranded(&held, Duration::from_secs(60)).is_empty());
        assert_eq!(queue.stranded(&held, Duration::ZERO), vec![1]);
        let mut everything = queue.take_all();
        everything.sort_unstable();
        assert_eq!(everything, vec![2, 3]);
    }
}
