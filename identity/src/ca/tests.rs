use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::*;
use crate::keys::certs_from_pem;
use crate::testutil::{id, root_ca, TempDir, TD};

const DAY: Duration = Duration::from_secs(86_400);

fn csr_asking_for(san: &str) -> (PrivateKey, String) {
    let key = PrivateKey::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(san.try_into().unwrap())];
    let csr = params.serialize_request(key.key_pair()).unwrap().pem().unwrap();
    (key, csr)
}

#[test]
fn issued_certificate_has_authorized_san_eku_and_lifetime() {
    let ca = root_ca();
    let now = OffsetDateTime::now_utc();
    // The CSR asks for a different identity: the CA must ignore it.
    let (key, csr) = csr_asking_for("spiffe://cluster.local/ns/kube-system/sa/admin");
    let wanted = id("shop", "web");
    let issued =
        ca.issue(&csr, &Identity::Workload(wanted.clone()), DEFAULT_LIFETIME, now).unwrap();

    assert_eq!(issued.chain.len(), 1, "a root signs directly: no intermediates");
    let (_, cert) = X509Certificate::from_der(&issued.chain[0]).unwrap();
    let sans = cert.subject_alternative_name().unwrap().unwrap();
    let names: Vec<_> = sans.value.general_names.iter().collect();
    assert_eq!(names, vec![&GeneralName::URI("spiffe://cluster.local/ns/shop/sa/web")]);
    assert!(sans.critical, "SAN is critical with an empty subject");

    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.any);
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    assert!(!cert.is_ca());
    assert!(cert.basic_constraints().unwrap().is_some(), "CA:FALSE is explicit");

    let nb = cert.validity().not_before.to_datetime();
    let na = cert.validity().not_after.to_datetime();
    let slack = time::Duration::seconds(2);
    assert!((nb - (now - BACKDATE)).abs() < slack, "notBefore {nb} should be 1 min before {now}");
    assert!((na - (now + DEFAULT_LIFETIME)).abs() < slack, "notAfter {na}");
    assert_eq!(issued.info.identity, Identity::Workload(wanted));
    assert_eq!(
        cert.public_key().raw,
        key.public_key_der().as_slice(),
        "the CSR's key is certified"
    );
    assert!(cert.raw_serial().len() >= 16);

    // PEM chain matches the DER chain and verifies with the issuing CA.
    assert_eq!(certs_from_pem(&issued.chain_pem, "chain").unwrap(), issued.chain);
    assert!(cert
        .verify_signature(Some(X509Certificate::from_der(&ca.roots()[0]).unwrap().1.public_key()))
        .is_ok());
}

#[test]
fn serials_are_random_and_lifetime_configurable_down_to_a_minute() {
    let ca = root_ca();
    let now = OffsetDateTime::now_utc();
    let web = Identity::Workload(id("shop", "web"));
    let (_, csr) = csr_asking_for("spiffe://x/ns/a/sa/b");
    let a = ca.issue(&csr, &web, MIN_LIFETIME, now).unwrap();
    let b = ca.issue(&csr, &web, MIN_LIFETIME, now).unwrap();
    assert_ne!(a.info.serial, b.info.serial);
    assert_eq!(a.info.not_after - a.info.not_before, time::Duration::seconds(120));

    let err = ca.issue(&csr, &web, Duration::from_secs(59), now).unwrap_err();
    assert!(matches!(err, CaError::Lifetime { secs: 59 }), "{err}");
    assert!(err.to_string().contains("60 s"), "{err}");
}

#[test]
fn lifetime_is_capped_at_the_ca_expiry() {
    let now = OffsetDateTime::now_utc();
    let gen = Ca::generate_root_at(TD, now - BACKDATE, now + Duration::from_secs(3600)).unwrap();
    let ca =
        Ca::from_pem(&gen.cert_pem, &gen.key.to_pem(), &[], TD, now, &PemNames::memory()).unwrap();
    let (_, csr) = csr_asking_for("spiffe://x/ns/a/sa/b");
    let issued = ca.issue(&csr, &Identity::Workload(id("a", "b")), DAY, now).unwrap();
    assert!(issued.info.not_after <= ca.not_after());
}

#[test]
fn refuses_bad_csr_and_foreign_trust_domain() {
    let ca = root_ca();
    let now = OffsetDateTime::now_utc();
    let err = ca.issue("not a csr", &Identity::Workload(id("a", "b")), DAY, now).unwrap_err();
    assert!(matches!(err, CaError::BadCsr { .. }), "{err}");

    let (_, csr) = csr_asking_for("spiffe://x/ns/a/sa/b");
    let other = SpiffeId::new("evil.example", "a", "b").unwrap();
    let err = ca.issue(&csr, &Identity::Workload(other), DAY, now).unwrap_err();
    assert!(err.to_string().contains("not in this CA's trust domain"), "{err}");
}

#[test]
fn sign_csr_returns_chain_pem() {
    let ca = root_ca();
    let (_, csr) = csr_asking_for("spiffe://x/ns/a/sa/b");
    let pem = ca.sign_csr(&csr, &id("a", "b"), DEFAULT_LIFETIME).unwrap();
    let chain = certs_from_pem(&pem, "chain").unwrap();
    let info = CertInfo::from_der(&chain[0]).unwrap();
    assert_eq!(info.identity.to_string(), "spiffe://cluster.local/ns/a/sa/b");
}

#[test]
fn init_writes_private_key_and_refuses_overwrite() {
    let dir = TempDir::new("init");
    let files = CaFiles::init(dir.path(), TD, DAY, Overwrite::Refuse).unwrap();
    let key_mode = fs::metadata(dir.path().join("ca.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o600);
    assert_eq!(files.shared().current().trust_domain(), TD);

    let err = CaFiles::init(dir.path(), TD, DAY, Overwrite::Refuse).unwrap_err();
    assert!(matches!(err, CaError::Exists { .. }), "{err}");
    assert!(err.to_string().contains("ca.pem"), "{err}");

    let old_root = files.shared().current().roots()[0].clone();
    let again = CaFiles::init(dir.path(), TD, DAY, Overwrite::Replace).unwrap();
    assert_ne!(again.shared().current().roots()[0], old_root);
}

#[test]
fn unreadable_cert_is_named() {
    let dir = TempDir::new("unreadable");
    let mut paths = CaPaths::in_dir(dir.path());
    CaFiles::init(dir.path(), TD, DAY, Overwrite::Refuse).unwrap();
    paths.cert = dir.path().join("missing.pem");
    let err = CaFiles::open(paths, TD).unwrap_err();
    assert!(matches!(err, CaError::Read { .. }), "{err}");
    assert!(err.to_string().contains("missing.pem"), "{err}");
}

#[test]
fn group_readable_key_is_refused_with_chmod_hint() {
    let dir = TempDir::new("mode");
    CaFiles::init(dir.path(), TD, DAY, Overwrite::Refuse).unwrap();
    let key = dir.path().join("ca.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let err = CaFiles::open(CaPaths::in_dir(dir.path()), TD).unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&key.display().to_string()), "{text}");
    assert!(text.contains("chmod 600"), "{text}");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
    assert!(matches!(
        CaFiles::open(CaPaths::in_dir(dir.path()), TD),
        Err(CaError::KeyPermissions { mode: 0o640, .. })
    ));
    fs::set_permissions(&key, fs::Permissions::from_mode(0o400)).unwrap();
    CaFiles::open(CaPaths::in_dir(dir.path()), TD).unwrap();
}

#[test]
fn mismatched_key_is_refused() {
    let a = TempDir::new("mismatch-a");
    let b = TempDir::new("mismatch-b");
    CaFiles::init(a.path(), TD, DAY, Overwrite::Refuse).unwrap();
    CaFiles::init(b.path(), TD, DAY, Overwrite::Refuse).unwrap();
    let paths = CaPaths { key: b.path().join("ca.key"), ..CaPaths::in_dir(a.path()) };
    let err = CaFiles::open(paths, TD).unwrap_err();
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&b.path().join("ca.key").display().to_string()), "{text}");
    assert!(text.contains(&a.path().join("ca.pem").display().to_string()), "{text}");
}

#[test]
fn not_yet_valid_and_expired_certs_are_refused() {
    let dir = TempDir::new("validity");
    let now = OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    for (name, nb, na, needle) in [
        ("future", now + hour, now + 2 * hour, "clock"),
        ("past", now - 2 * hour, now - hour, "expired"),
    ] {
        let gen = Ca::generate_root_at(TD, nb, na).unwrap();
        let cert = dir.path().join(format!("{name}.pem"));
        let key = dir.path().join(format!("{name}.key"));
        files::write_file(&cert, gen.cert_pem.as_bytes(), 0o644).unwrap();
        files::write_file(&key, gen.key.to_pem().as_bytes(), 0o600).unwrap();
        let err = CaFiles::open(CaPaths { cert: cert.clone(), key, bundle: None }, TD).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&cert.display().to_string()), "{text}");
        assert!(text.contains(needle), "{text}");
    }
}

#[test]
fn external_intermediate_puts_chain_into_issued_certs() {
    let root = root_ca();
    let now = OffsetDateTime::now_utc();
    let inter = root.generate_intermediate(DAY, now).unwrap();
    let dir = TempDir::new("intermediate");
    let cert_path = dir.path().join("tls.crt");
    let key_path = dir.path().join("tls.key");
    // Like a cert-manager Secret: intermediate + root in tls.crt.
    files::write_file(&cert_path, inter.cert_pem.as_bytes(), 0o644).unwrap();
    files::write_file(&key_path, inter.key.to_pem().as_bytes(), 0o600).unwrap();
    let files =
        CaFiles::open(CaPaths { cert: cert_path.clone(), key: key_path.clone(), bundle: None }, TD)
            .unwrap();
    let ca = files.shared().current();
    assert_eq!(ca.roots(), root.roots(), "the root in the file is the trust anchor");
    assert_eq!(ca.chain().len(), 1);

    let (_, csr) = csr_asking_for("spiffe://x/ns/a/sa/b");
    let issued = ca.issue(&csr, &Identity::Workload(id("a", "b")), DAY, now).unwrap();
    assert_eq!(issued.chain.len(), 2, "leaf + intermediate");
    assert_eq!(issued.chain[1], ca.chain()[0]);

    // Without the root in the file, a bundle file must supply it.
    let only_inter = certs_from_pem(&inter.cert_pem, "x").unwrap();
    files::write_file(&cert_path, certs_to_pem(&only_inter[..1]).as_bytes(), 0o644).unwrap();
    let err =
        CaFiles::open(CaPaths { cert: cert_path.clone(), key: key_path.clone(), bundle: None }, TD)
            .unwrap_err();
    assert!(matches!(err, CaError::NoTrustAnchor { .. }), "{err}");
    let bundle = dir.path().join("ca.crt");
    files::write_file(&bundle, root.roots_pem().as_bytes(), 0o644).unwrap();
    CaFiles::open(
        CaPaths { cert: cert_path.clone(), key: key_path.clone(), bundle: Some(bundle) },
        TD,
    )
    .unwrap();

    // A bundle with an unrelated root: the self-test finds the broken chain.
    let stranger = dir.path().join("stranger.crt");
    files::write_file(&stranger, root_ca().roots_pem().as_bytes(), 0o644).unwrap();
    let err = CaFiles::open(CaPaths { cert: cert_path, key: key_path, bundle: Some(stranger) }, TD)
        .unwrap_err();
    assert!(matches!(err, CaError::BrokenChain { .. }), "{err}");
}

#[test]
fn leaf_certificate_is_not_accepted_as_ca() {
    let ca = root_ca();
    let now = OffsetDateTime::now_utc();
    let key = PrivateKey::generate().unwrap();
    let csr = key.csr_pem(&Identity::Workload(id("a", "b"))).unwrap();
    let issued = ca.issue(&csr, &Identity::Workload(id("a", "b")), DAY, now).unwrap();
    let err = Ca::from_pem(&issued.chain_pem, &key.to_pem(), &[], TD, now, &PemNames::memory())
        .unwrap_err();
    assert!(matches!(err, CaError::NotCa { .. }), "{err}");
}

#[test]
fn reload_if_changed_swaps_the_ca() {
    let dir = TempDir::new("reload");
    let files = CaFiles::init(dir.path(), TD, DAY, Overwrite::Refuse).unwrap();
    let shared = files.shared();
    let before = shared.current().roots()[0].clone();
    assert!(!files.reload_if_changed().unwrap());

    // Broken replacement: error, old CA stays.
    files::write_file(&dir.path().join("ca.pem"), b"garbage", 0o644).unwrap();
    assert!(files.reload_if_changed().is_err());
    assert_eq!(shared.current().roots()[0], before);

    let other = TempDir::new("reload-src");
    CaFiles::init(other.path(), TD, DAY, Overwrite::Refuse).unwrap();
    for name in ["ca.pem", "ca.key"] {
        let mode = if name == "ca.key" { 0o600 } else { 0o644 };
        files::write_file(
            &dir.path().join(name),
            &fs::read(other.path().join(name)).unwrap(),
            mode,
        )
        .unwrap();
    }
    assert!(files.reload_if_changed().unwrap());
    assert_ne!(shared.current().roots()[0], before);
    assert!(!files.reload_if_changed().unwrap());
}
