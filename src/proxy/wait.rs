//! Single-threaded wake-ups inside a worker: the drain signal, the connection cap, and racing a
//! future against them. Nothing here is `Send`; nothing takes a lock.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Waiting tasks by slot, each slot holding a key (what the task waits for) and its waker. A
/// waiting future keeps its slot index, so re-polling costs O(1), and frees it when dropped.
struct WaiterSlots<K> {
    slots: RefCell<Vec<Option<(K, Waker)>>>,
    free: RefCell<Vec<usize>>,
}

impl<K> Default for WaiterSlots<K> {
    fn default() -> Self {
        WaiterSlots { slots: RefCell::new(Vec::new()), free: RefCell::new(Vec::new()) }
    }
}

impl<K> WaiterSlots<K> {
    /// Records `key` and `waker` in the waiter's slot, taking a slot on the first call.
    fn register(&self, slot: &mut Option<usize>, key: K, waker: &Waker) {
        let mut slots = self.slots.borrow_mut();
        let i = *slot.get_or_insert_with(|| {
            self.free.borrow_mut().pop().unwrap_or_else(|| {
                slots.push(None);
                slots.len() - 1
            })
        });
        match &mut slots[i] {
            Some((k, w)) if w.will_wake(waker) => *k = key,
            s => *s = Some((key, waker.clone())),
        }
    }

    /// Gives a dropped waiter's slot back.
    fn release(&self, slot: Option<usize>) {
        if let Some(i) = slot {
            if let Some(s) = self.slots.borrow_mut().get_mut(i) {
                *s = None;
            }
            self.free.borrow_mut().push(i);
        }
    }

    /// Wakes (once) every waiter whose key is `due`.
    fn wake_where(&self, due: impl Fn(&K) -> bool) {
        let wakers: Vec<Waker> = self
            .slots
            .borrow_mut()
            .iter_mut()
            .filter(|s| s.as_ref().is_some_and(|(k, _)| due(k)))
            .filter_map(|s| s.take().map(|(_, w)| w))
            .collect();
        wakers.into_iter().for_each(Waker::wake);
    }
}

/// A one-shot event many tasks can wait for (the worker's drain).
#[derive(Default)]
pub struct Event {
    fired: Cell<bool>,
    waiters: WaiterSlots<()>,
}

impl Event {
    pub fn is_fired(&self) -> bool {
        self.fired.get()
    }

    /// Fires the event and wakes every waiter; later waits complete at once.
    pub fn fire(&self) {
        self.fired.set(true);
        self.waiters.wake_where(|_| true);
    }

    pub fn wait(&self) -> EventWait<'_> {
        EventWait { event: self, slot: None }
    }
}

pub struct EventWait<'a> {
    event: &'a Event,
    slot: Option<usize>,
}

impl Future for EventWait<'_> {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.event.fired.get() {
            return Poll::Ready(());
        }
        let this = &mut *self;
        this.event.waiters.register(&mut this.slot, (), cx.waker());
        Poll::Pending
    }
}

impl Drop for EventWait<'_> {
    fn drop(&mut self) {
        self.event.waiters.release(self.slot);
    }
}

/// Wakes the few tasks (accept loops, the worker's exit) that wait for a connection to close.
#[derive(Default)]
pub struct WakeList {
    wakers: RefCell<Vec<Waker>>,
}

impl WakeList {
    pub fn wake_all(&self) {
        if self.wakers.borrow().is_empty() {
            return;
        }
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Completes once `ready()` holds, re-checking after each wake-up.
    pub async fn until(&self, ready: impl Fn() -> bool) {
        std::future::poll_fn(|cx| {
            if ready() {
                return Poll::Ready(());
            }
            self.wakers.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

/// Coarse deadlines for idle waits, checked by one sweep per worker: an idle connection holds a
/// slot (a few words) instead of a runtime timer, which in monoio is over 1 KiB inline (its
/// entries are cache-padded) and would be part of every idle connection's task.
#[derive(Default)]
pub struct IdleTimers {
    waiters: WaiterSlots<Instant>,
    /// Set by the drain: no idle wait lasts past this, whatever its own deadline.
    cutoff: Cell<Option<Instant>>,
}

impl IdleTimers {
    /// Completes once `deadline` (or the cutoff, if earlier) has passed and a sweep (or a
    /// poll) notices.
    pub fn until(&self, deadline: Instant) -> IdleWait<'_> {
        IdleWait { timers: self, deadline, slot: None }
    }

    /// Ends every idle wait, current and future, at `at` at the latest.
    pub fn cut_off(&self, at: Instant) {
        let at = self.cutoff.get().map_or(at, |c| c.min(at));
        self.cutoff.set(Some(at));
    }

    /// When a wait for `deadline` ends: the deadline, or the drain's cutoff if earlier.
    pub fn due(&self, deadline: Instant) -> Instant {
        self.cutoff.get().map_or(deadline, |c| c.min(deadline))
    }

    /// Wakes every waiter whose deadline has passed.
    pub fn sweep(&self, now: Instant) {
        self.waiters.wake_where(|deadline| self.due(*deadline) <= now);
    }
}

impl IdleTimers {
    /// Like [`IdleTimers::until`], with a deadline read again at every poll: it may move as
    /// the waiting task learns more (an HTTP/2 connection starting a header block).
    pub fn until_moving<F: Fn() -> Instant + Unpin>(&self, deadline: F) -> MovingWait<'_, F> {
        MovingWait { timers: self, deadline, slot: None }
    }
}

pub struct MovingWait<'a, F> {
    timers: &'a IdleTimers,
    deadline: F,
    slot: Option<usize>,
}

impl<F: Fn() -> Instant + Unpin> Future for MovingWait<'_, F> {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = (self.deadline)();
        if crate::clock::now() >= self.timers.due(deadline) {
            return Poll::Ready(());
        }
        let this = &mut *self;
        this.timers.waiters.register(&mut this.slot, deadline, cx.waker());
        Poll::Pending
    }
}

impl<F> Drop for MovingWait<'_, F> {
    fn drop(&mut self) {
        self.timers.waiters.release(self.slot);
    }
}

pub struct IdleWait<'a> {
    timers: &'a IdleTimers,
    deadline: Instant,
    slot: Option<usize>,
}

impl Future for IdleWait<'_> {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if crate::clock::now() >= self.timers.due(self.deadline) {
            return Poll::Ready(());
        }
        let this = &mut *self;
        this.timers.waiters.register(&mut this.slot, this.deadline, cx.waker());
        Poll::Pending
    }
}

impl Drop for IdleWait<'_> {
    fn drop(&mut self) {
        self.timers.waiters.release(self.slot);
    }
}

/// `fut`'s output, or `None` once `deadline` has passed. The deadline is a slot in `timers`
/// (a few words, checked by the worker's 100 ms sweep, so it fires at most a tick late and
/// never early), not a runtime timer: monoio's timer entry is over 1 KiB inline and a wheel
/// insert and removal per request, for timeouts (seconds) that almost never fire.
pub fn before<F: Future>(timers: &IdleTimers, deadline: Instant, fut: F) -> Before<'_, F> {
    Before(race(fut, timers.until(deadline)))
}

/// How long a write to a client may wait for the client to take bytes: the listener's
/// `send_timeout`, on the worker's request deadlines (which the drain never cuts short), and
/// the counter a timeout bumps. Passed by value to each write to a client.
#[derive(Clone, Copy)]
pub struct SendBound<'a> {
    pub timers: &'a IdleTimers,
    pub limit: Duration,
    pub timeouts: &'a Cell<u64>,
}

impl SendBound<'_> {
    /// `fut` (a write to the client), or `None` once it has waited `limit`, counted.
    pub async fn bound<F: Future>(self, fut: F) -> Option<F::Output> {
        let out = before(self.timers, crate::clock::now() + self.limit, fut).await;
        if out.is_none() {
            crate::stats::bump(self.timeouts);
        }
        out
    }
}

/// [`before`]'s future: a [`Race`] with the deadline's side read as `None`. (A struct for the
/// reason `Race` is one.)
pub struct Before<'a, F>(Race<F, IdleWait<'a>>);

impl<F: Future> Future for Before<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: structural pinning of the one field, which is never moved out; `Before` has
        // no `Drop` impl and is `Unpin` only when the `Race` is.
        let inner = unsafe { self.map_unchecked_mut(|b| &mut b.0) };
        inner.poll(cx).map(|won| match won {
            Either::Left(out) => Some(out),
            Either::Right(()) => None,
        })
    }
}

pub enum Either<A, B> {
    Left(A),
    Right(B),
}

/// Polls both futures; the first to finish wins and the other is dropped. `a` is polled first.
///
/// A struct rather than an `async fn`: an `async fn` keeps its arguments in one slot and the
/// pinned copies it polls in another, so every `race` (and every `before`, every per-request
/// deadline) carried its futures twice; an idle connection's read measured 728 bytes raced this
/// way, 344 as this struct.
pub fn race<A: Future, B: Future>(a: A, b: B) -> Race<A, B> {
    Race { a, b }
}

pub struct Race<A, B> {
    a: A,
    b: B,
}

impl<A: Future, B: Future> Future for Race<A, B> {
    type Output = Either<A::Output, B::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: structural pinning of both fields. `Race` never moves `a` or `b` out of
        // itself, has no `Drop` impl, and is `Unpin` only when both are (the auto trait), so a
        // pinned `Race` keeps its fields where they were pinned until they are dropped in place.
        let (a, b) = unsafe {
            let this = self.get_unchecked_mut();
            (Pin::new_unchecked(&mut this.a), Pin::new_unchecked(&mut this.b))
        };
        if let Poll::Ready(x) = a.poll(cx) {
            return Poll::Ready(Either::Left(x));
        }
        if let Poll::Ready(y) = b.poll(cx) {
            return Poll::Ready(Either::Right(y));
        }
        Poll::Pending
    }
}

/// Polls both fallible futures to the end, neither dropped before it finishes, unless one
/// fails: then the other is dropped at once. (A tunnel: both directions run until both closed,
/// or one broke.)
pub async fn join_both<A, B>(a: A, b: B)
where
    A: Future<Output = Result<(), ()>>,
    B: Future<Output = Result<(), ()>>,
{
    let mut a = pin!(a);
    let mut b = pin!(b);
    let (mut a_done, mut b_done) = (false, false);
    std::future::poll_fn(|cx| {
        if !a_done {
            match a.as_mut().poll(cx) {
                Poll::Ready(Err(())) => return Poll::Ready(()),
                Poll::Ready(Ok(())) => a_done = true,
                Poll::Pending => {}
            }
        }
        if !b_done {
            match b.as_mut().poll(cx) {
                Poll::Ready(Err(())) => return Poll::Ready(()),
                Poll::Ready(Ok(())) => b_done = true,
                Poll::Pending => {}
            }
        }
        if a_done && b_done {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(std::sync::atomic::AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn race_takes_the_first_ready_side_polling_a_first() {
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut both = pin!(race(std::future::ready(1), std::future::ready(2)));
        assert!(matches!(both.as_mut().poll(&mut cx), Poll::Ready(Either::Left(1))));
        let mut b_only = pin!(race(std::future::pending::<u8>(), std::future::ready(2)));
        assert!(matches!(b_only.as_mut().poll(&mut cx), Poll::Ready(Either::Right(2))));
        let mut neither = pin!(race(std::future::pending::<u8>(), std::future::pending::<u8>()));
        assert!(neither.as_mut().poll(&mut cx).is_pending());
    }

    #[test]
    fn race_holds_each_future_once() {
        // The reason `Race` is a struct: an `async fn` held both futures twice.
        let a = std::future::ready([0u8; 512]);
        let b = std::future::ready([0u8; 256]);
        let (sa, sb) = (std::mem::size_of_val(&a), std::mem::size_of_val(&b));
        assert!(std::mem::size_of_val(&race(a, b)) <= sa + sb + 8);
        let timers = IdleTimers::default();
        let read = std::future::ready([0u8; 512]);
        let alone =
            std::mem::size_of_val(&read) + std::mem::size_of_val(&timers.until(Instant::now()));
        assert!(std::mem::size_of_val(&before(&timers, Instant::now(), read)) <= alone + 8);
    }

    #[test]
    fn before_is_none_past_its_deadline_unless_the_future_is_ready() {
        let timers = IdleTimers::default();
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let later = Instant::now() + std::time::Duration::from_secs(3600);
        let mut waiting = pin!(before(&timers, later, std::future::pending::<u8>()));
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        let past = Instant::now();
        let mut late = pin!(before(&timers, past, std::future::pending::<u8>()));
        assert!(matches!(late.as_mut().poll(&mut cx), Poll::Ready(None)));
        let mut ready = pin!(before(&timers, past, std::future::ready(7)));
        assert!(matches!(ready.as_mut().poll(&mut cx), Poll::Ready(Some(7))), "polled first");
    }

    #[test]
    fn idle_waits_wake_at_the_sweep_after_their_deadline() {
        let timers = IdleTimers::default();
        let count = Arc::new(Count(0.into()));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let later = Instant::now() + std::time::Duration::from_secs(3600);
        let mut w = pin!(timers.until(later));
        assert!(w.as_mut().poll(&mut cx).is_pending());
        timers.sweep(Instant::now());
        assert_eq!(count.0.load(std::sync::atomic::Ordering::SeqCst), 0, "not due yet");
        timers.sweep(later);
        assert_eq!(count.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        timers.sweep(later);
        assert_eq!(count.0.load(std::sync::atomic::Ordering::SeqCst), 1, "woken once");
    }

    #[test]
    fn event_wakes_waiters_once_and_reuses_slots() {
        let ev = Event::default();
        let count = Arc::new(Count(0.into()));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        {
            let mut w1 = pin!(ev.wait());
            assert!(w1.as_mut().poll(&mut cx).is_pending());
            assert!(w1.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(ev.waiters.slots.borrow().len(), 1);
        let mut w2 = pin!(ev.wait());
        assert!(w2.as_mut().poll(&mut cx).is_pending());
        assert_eq!(ev.waiters.slots.borrow().len(), 1, "the dropped waiter's slot was reused");
        ev.fire();
        assert_eq!(count.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(w2.as_mut().poll(&mut cx).is_ready());
    }
}
