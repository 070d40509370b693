//! Containing a panic to the connection that caused it.
//!
//! A panic inside one connection's task would otherwise unwind the whole worker thread and drop
//! every connection it serves. Parsing is fuzzed so that this never happens; this is the
//! backstop if it does.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

/// Polls `inner`; a panic while polling completes the future (dropping the connection) and is
/// reported through `on_panic`. `inner` lives inline (not boxed): the runtime's task allocation
/// is the connection's one allocation for its future.
pub struct Isolated<F, P> {
    inner: F,
    on_panic: Option<P>,
}

pub fn isolate<F: Future<Output = ()>, P: FnOnce(String)>(inner: F, on_panic: P) -> Isolated<F, P> {
    Isolated { inner, on_panic: Some(on_panic) }
}

impl<F: Future<Output = ()>, P: FnOnce(String) + Unpin> Future for Isolated<F, P> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // SAFETY: `inner` is structurally pinned: it is never moved out of `self` nor handed
        // out unpinned, and `Isolated` has no `Drop` impl. `on_panic` is not pinned (it is only
        // taken by value, which moves nothing pinned).
        let this = unsafe { self.get_unchecked_mut() };
        // SAFETY: see above; `this.inner` stays where it is for as long as `self` is pinned.
        let inner = unsafe { Pin::new_unchecked(&mut this.inner) };
        // One clock reading serves the whole poll (see `clock`).
        let _clock = crate::clock::Scope::enter();
        // Unwind safety: after a panic the inner future is never polled again, and the
        // worker's shared state is only `RefCell`s whose guards are released on unwind.
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(p) => p,
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic".into());
                if let Some(report) = this.on_panic.take() {
                    report(msg);
                }
                Poll::Ready(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    #[test]
    fn a_panicking_task_completes_and_reports() {
        let reported = std::cell::RefCell::new(None);
        let fut = isolate(async { panic!("boom") }, |m| *reported.borrow_mut() = Some(m));
        let mut fut = std::pin::pin!(fut);
        let mut cx = Context::from_waker(Waker::noop());
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let polled = fut.as_mut().poll(&mut cx);
        std::panic::set_hook(prev);
        assert!(polled.is_ready());
        assert_eq!(reported.borrow().as_deref(), Some("boom"));
    }
}
