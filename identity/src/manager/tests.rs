//! Certificate manager tests with 1-minute certificates and a manual clock:
//! nothing sleeps for the schedule.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::*;
use crate::authz::{Placement, SharedPlacement};
use crate::ca::{SharedCa, MIN_LIFETIME};
use crate::spiffe::NodeId;
use crate::testutil::{id, root_ca, TD};

#[derive(Debug)]
struct ManualClock(Mutex<OffsetDateTime>);

impl ManualClock {
    fn new() -> Arc<Self> {
        Arc::new(Self(Mutex::new(OffsetDateTime::now_utc())))
    }

    fn advance(&self, secs: i64) -> OffsetDateTime {
        let mut t = self.0.lock().unwrap();
        *t += time::Duration::seconds(secs);
        *t
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.0.lock().unwrap()
    }
}

/// A local CA that can be told to fail, counting calls.
#[derive(Debug)]
struct Flaky {
    inner: LocalCa,
    fail: AtomicBool,
    calls: AtomicUsize,
}

impl CertSource for Flaky {
    fn issue<'a>(
        &'a self,
        csr_pem: &'a str,
        id: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<String, SourceError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) {
            return Box::pin(async { Err("CA unreachable (test)".into()) });
        }
        self.inner.issue(csr_pem, id)
    }
}

fn setup(placed: &[&str]) -> (Arc<CertManager>, Arc<Flaky>, Arc<ManualClock>) {
    let placement: Placement =
        placed.iter().map(|sa| (id("shop", sa), "node-a".to_owned())).collect();
    let source = LocalCa::new(
        SharedCa::new(root_ca()),
        SharedPlacement::new(placement),
        NodeId::new(TD, "node-a").unwrap(),
    )
    .with_lifetime(MIN_LIFETIME);
    let flaky =
        Arc::new(Flaky { inner: source, fail: AtomicBool::new(false), calls: AtomicUsize::new(0) });
    let clock = ManualClock::new();
    let options = ManagerOptions { clock: clock.clone(), fixed_jitter: Some(0.0) };
    let manager = Arc::new(CertManager::with_options(flaky.clone(), options));
    (manager, flaky, clock)
}

fn serial_of(key: &CertifiedKey) -> String {
    CertInfo::from_der(&key.cert[0]).unwrap().serial
}

#[tokio::test]
async fn ensure_fetches_once_even_when_concurrent() {
    let (manager, source, _) = setup(&["web"]);
    let web = id("shop", "web");
    let (a, b, c) = tokio::join!(manager.ensure(&web), manager.ensure(&web), manager.ensure(&web));
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    assert!(Arc::ptr_eq(&a, &b) && Arc::ptr_eq(&b, &c));
    assert_eq!(source.calls.load(Ordering::SeqCst), 1);
    assert!(Arc::ptr_eq(&manager.ensure(&web).await.unwrap(), &a));
    assert_eq!(source.calls.load(Ordering::SeqCst), 1);

    let info = manager.cert_info(&web).unwrap();
    assert_eq!(info.identity, Identity::Workload(web.clone()));
    assert!(Arc::ptr_eq(&manager.get_by_sni(&sni_string(&web)).unwrap(), &a));
}

#[tokio::test]
async fn renewal_at_half_life_yields_a_new_serial() {
    let (manager, _, clock) = setup(&["web"]);
    let web = id("shop", "web");
    let old = manager.ensure(&web).await.unwrap();
    let start = clock.now();
    let due = manager.next_due().unwrap();
    // Half of the remaining 60 s (X.509 times have whole seconds).
    let expected = start + time::Duration::seconds(30);
    assert!((due - expected).abs() < time::Duration::seconds(1), "{due} vs {expected}");

    assert_eq!(manager.renew_due(clock.advance(28)).await, 0, "not due yet");
    assert!(Arc::ptr_eq(&CertStore::get(&*manager, &web).unwrap(), &old));

    assert_eq!(manager.renew_due(clock.advance(3)).await, 1);
    let new = CertStore::get(&*manager, &web).unwrap();
    assert!(!Arc::ptr_eq(&new, &old));
    assert_ne!(serial_of(&new), serial_of(&old));
    // The old Arc stays valid for sessions that hold it.
    assert_eq!(old.cert.len(), 1);

    let snap = manager.snapshot();
    assert_eq!(snap.len(), 1);
    assert_eq!(snap[0].identity, "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(snap[0].serial, serial_of(&new));
    assert_eq!(snap[0].renewals, 1);
    assert_eq!(snap[0].failures, 0);
    assert!(snap[0].not_after.ends_with('Z'), "RFC 3339: {}", snap[0].not_after);
    assert!(manager.next_due().unwrap() > clock.now());
}

#[tokio::test]
async fn failed_renewal_backs_off_and_keeps_the_old_certificate() {
    let (manager, source, clock) = setup(&["web"]);
    let web = id("shop", "web");
    let old = manager.ensure(&web).await.unwrap();
    source.fail.store(true, Ordering::SeqCst);

    let now = clock.advance(31);
    assert_eq!(manager.renew_due(now).await, 0);
    assert!(Arc::ptr_eq(&CertStore::get(&*manager, &web).unwrap(), &old), "old certificate in use");
    let snap = &manager.snapshot()[0];
    assert_eq!(snap.failures, 1);
    assert!(snap.last_error.as_deref().unwrap().contains("CA unreachable"), "{snap:?}");
    // Backoff 1 s scaled by jitter 0 → 0.5 s.
    assert_eq!(manager.next_due().unwrap(), now + time::Duration::milliseconds(500));

    let calls = source.calls.load(Ordering::SeqCst);
    assert_eq!(manager.renew_due(now).await, 0);
    assert_eq!(source.calls.load(Ordering::SeqCst), calls, "no retry before the backoff");

    let now = clock.advance(1);
    manager.renew_due(now).await;
    assert_eq!(manager.snapshot()[0].failures, 2);
    assert_eq!(manager.next_due().unwrap(), now + time::Duration::seconds(1), "doubled");

    source.fail.store(false, Ordering::SeqCst);
    assert_eq!(manager.renew_due(clock.advance(2)).await, 1);
    let snap = &manager.snapshot()[0];
    assert_eq!((snap.failures, snap.renewals, snap.last_error.as_deref()), (0, 1, None));
    assert_ne!(snap.serial, serial_of(&old));
}

#[tokio::test]
async fn retain_drops_identities_that_left_the_node() {
    let (manager, _, _) = setup(&["web", "db"]);
    let (web, db) = (id("shop", "web"), id("shop", "db"));
    manager.ensure(&web).await.unwrap();
    manager.ensure(&db).await.unwrap();
    let dropped = manager.retain(&HashSet::from([web.clone()]));
    assert_eq!(dropped, vec![db.clone()]);
    assert!(CertStore::get(&*manager, &db).is_none());
    assert!(manager.get_by_sni(&sni_string(&db)).is_none());
    assert!(CertStore::get(&*manager, &web).is_some());
    assert_eq!(manager.snapshot().len(), 1);
}

#[tokio::test]
async fn identity_not_on_this_node_is_refused() {
    let (manager, _, _) = setup(&["web"]);
    let err = manager.ensure(&id("shop", "db")).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("spiffe://cluster.local/ns/shop/sa/db"), "{text}");
    assert!(text.contains("no pod with that identity"), "{text}");
    assert!(manager.snapshot().is_empty());
}

#[tokio::test]
async fn expired_certificate_is_not_served_and_ensure_refetches() {
    let (manager, source, clock) = setup(&["web"]);
    let web = id("shop", "web");
    let old = manager.ensure(&web).await.unwrap();
    source.fail.store(true, Ordering::SeqCst);
    clock.advance(120);
    assert!(CertStore::get(&*manager, &web).is_none(), "expired certificates are not handed out");
    assert!(manager.ensure(&web).await.is_err());
    source.fail.store(false, Ordering::SeqCst);
    let new = manager.ensure(&web).await.unwrap();
    assert_ne!(serial_of(&new), serial_of(&old));
}

#[tokio::test]
async fn background_task_renews_due_certificates() {
    let (manager, _, clock) = setup(&["web"]);
    let web = id("shop", "web");
    let old = manager.ensure(&web).await.unwrap();
    clock.advance(31);
    let task = manager.spawn_renewal();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while manager.snapshot()[0].renewals == 0 {
        assert!(tokio::time::Instant::now() < deadline, "renewal task did not renew");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    assert!(!Arc::ptr_eq(&CertStore::get(&*manager, &web).unwrap(), &old));
}
