//! The harness itself: a control plane starts, serves an admin client, gets
//! its controller-manager working, and leaves nothing behind when dropped —
//! also when the test panics.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Namespace;
use kube::{api::ListParams, Api};
use tlsmesh_kube_harness::ControlPlane;

fn alive(pid: u32) -> bool {
    // A zombie has no /proc/<pid>/exe link target left; the harness reaps.
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn assert_gone(pids: &[u32], dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while pids.iter().any(|p| alive(*p)) {
        assert!(Instant::now() < deadline, "processes {pids:?} still running after drop");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[tokio::test]
async fn real_apiserver_harness_serves_and_cleans_up() {
    let cp = ControlPlane::start().await;
    eprintln!("control plane up in {:?} at {}", cp.startup(), cp.url());
    let version = cp.client().apiserver_version().await.expect("GET /version");
    assert_eq!(version.git_version, tlsmesh_kube_harness::KUBE_VERSION);
    let nss: Api<Namespace> = Api::all(cp.client());
    let names: Vec<String> = nss
        .list(&ListParams::default())
        .await
        .expect("list namespaces")
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    assert!(names.iter().any(|n| n == "kube-system"), "{names:?}");
    // The kubeconfig works for a second client, and a ServiceAccount token
    // authenticates (as an unprivileged user: listing nodes is forbidden).
    let again = tlsmesh_kube_harness::client_from_kubeconfig(cp.kubeconfig()).await;
    again.apiserver_version().await.expect("a client from the kubeconfig");
    let token = cp.service_account_token("default", "default").await;
    let sa = cp.client_for_token("default-sa", &token).await;
    let err = Api::<k8s_openapi::api::core::v1::Node>::all(sa)
        .list(&ListParams::default())
        .await
        .expect_err("default/default may not list nodes");
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 403), "{err}");

    let (pids, dir) = (cp.pids(), cp.dir().to_path_buf());
    assert_eq!(pids.len(), 3);
    assert!(pids.iter().all(|p| alive(*p)));
    drop(cp);
    assert_gone(&pids, &dir);
}

#[test]
fn real_apiserver_harness_cleans_up_when_the_test_panics() {
    type Seen = Option<(Vec<u32>, PathBuf)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let inner = seen.clone();
    let result = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(
            async move {
                let cp = ControlPlane::start().await;
                *inner.lock().unwrap() = Some((cp.pids(), cp.dir().to_path_buf()));
                panic!("deliberate panic with a running control plane");
            },
        );
    })
    .join();
    assert!(result.is_err(), "the inner test was meant to panic");
    let (pids, dir) = seen.lock().unwrap().clone().expect("the control plane had started");
    assert_gone(&pids, &dir);
}
