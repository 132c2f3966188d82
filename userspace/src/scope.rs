//! Ownership of tasks. Every task the daemon spawns is spawned in a
//! [`Scope`]: the daemon's root scope, or the scope of the pod it serves.
//! Ending a scope cancels every task in it (their futures are dropped, so
//! guards such as connection-table entries run) and waits for them, so
//! removing a pod ends its listeners, its connections in both directions and
//! its tunnel servers — by construction, not by a flag each task must check.
//!
//! [`Drain`] is the separate, gentler signal of a shutdown: servers stop
//! accepting, HTTP/2 tunnel connections send GOAWAY, and open connections
//! finish on their own until the daemon ends the scopes at its deadline.

use std::future::Future;

use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// A set of tasks that end together.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    token: CancellationToken,
    tasks: TaskTracker,
}

impl Scope {
    /// A new root scope.
    pub fn new() -> Self {
        Self::default()
    }

    /// A scope that also ends when `self` ends (its own tasks are waited for
    /// by its own [`Scope::end`]).
    #[must_use]
    pub fn child(&self) -> Self {
        Self { token: self.token.child_token(), tasks: TaskTracker::new() }
    }

    /// Runs `fut` as a task of this scope: it stops when the scope ends.
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(Scoped { cancelled: self.token.clone().cancelled_owned(), fut });
    }

    /// True once the scope was ended (or its parent was).
    pub fn is_ended(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes when the scope ends.
    pub async fn ended(&self) {
        self.token.cancelled().await;
    }

    /// Tasks still running in this scope.
    pub fn running(&self) -> usize {
        self.tasks.len()
    }

    /// Cancels every task of the scope and waits until all have stopped.
    pub async fn end(&self) {
        self.token.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

pin_project_lite::pin_project! {
    /// A scope's task: `fut` until the scope ends. A future of its own, not
    /// an `async` block with a `select!`: that block held `fut` twice (the
    /// captured value and the copy `select!` polls), so every connection's
    /// task paid its state twice.
    struct Scoped<F> {
        #[pin]
        cancelled: tokio_util::sync::WaitForCancellationFutureOwned,
        #[pin]
        fut: F,
    }
}

impl<F: Future<Output = ()>> Future for Scoped<F> {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let this = self.project();
        // The end of the scope first: a cancelled task is not polled again.
        if this.cancelled.poll(cx).is_ready() {
            return std::task::Poll::Ready(());
        }
        this.fut.poll(cx)
    }
}

/// The daemon-wide drain signal (SIGTERM, `/quitquitquit`).
#[derive(Debug, Clone, Default)]
pub struct Drain(CancellationToken);

impl Drain {
    /// A drain that has not started.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the drain (idempotent).
    pub fn start(&self) {
        self.0.cancel();
    }

    /// True once the drain started.
    pub fn started(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Completes when the drain starts.
    pub async fn signalled(&self) {
        self.0.cancelled().await;
    }

    /// An owned future that completes when the drain starts (for servers
    /// that take a `drain` future).
    pub fn signal(&self) -> impl Future<Output = ()> + Send + 'static {
        self.0.clone().cancelled_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        },
        time::Duration,
    };

    use super::*;

    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A task holds its future once: the scope adds only its cancellation
    /// future (the old `async` + `select!` wrapper doubled every task).
    #[test]
    fn a_scoped_task_holds_its_future_once() {
        let big = async {
            let state = [7u8; 4096];
            std::future::pending::<()>().await;
            std::hint::black_box(state);
        };
        let inner = std::mem::size_of_val(&big);
        let scoped = Scoped { cancelled: CancellationToken::new().cancelled_owned(), fut: big };
        let size = std::mem::size_of_val(&scoped);
        let overhead = std::mem::size_of::<tokio_util::sync::WaitForCancellationFutureOwned>();
        assert!(inner >= 4096);
        // (at most one alignment's padding on top)
        assert!(
            size <= inner + overhead + std::mem::align_of_val(&scoped),
            "a scoped task of a {inner}-byte future is {size} bytes: more than the future and the token's wait ({overhead})"
        );
    }

    #[tokio::test]
    async fn ending_a_scope_drops_every_task_and_waits_for_them() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let root = Scope::new();
        let pod = root.child();
        for _ in 0..5 {
            let guard = Counted(Arc::clone(&dropped));
            pod.spawn(async move {
                let _g = guard;
                std::future::pending::<()>().await;
            });
        }
        tokio::task::yield_now().await;
        assert_eq!(pod.running(), 5);
        pod.end().await;
        assert_eq!(dropped.load(Ordering::SeqCst), 5, "every task's state was dropped");
        assert_eq!(pod.running(), 0);
        assert!(!root.is_ended(), "a child ending leaves its parent running");
    }

    #[tokio::test]
    async fn ending_the_parent_ends_the_children() {
        let root = Scope::new();
        let pod = root.child();
        pod.spawn(std::future::pending());
        root.end().await;
        assert!(pod.is_ended());
        tokio::time::timeout(Duration::from_secs(5), pod.end()).await.expect("child tasks end");
    }

    #[tokio::test]
    async fn drain_signal_fires_once_started() {
        let d = Drain::new();
        let sig = d.signal();
        assert!(!d.started());
        d.start();
        tokio::time::timeout(Duration::from_secs(1), sig).await.expect("signalled");
        assert!(d.started());
    }
}
