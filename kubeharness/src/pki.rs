//! Throw-away PKI for one control plane: a serving CA and the API server's
//! serving certificate (`IP:127.0.0.1`, `DNS:localhost` and the in-cluster
//! names), a client CA and an admin client certificate (`O=system:masters`),
//! and the `ServiceAccount` token signing key pair. Everything is written as
//! PEM into the instance's directory; nothing outlives it.

use std::{fs, path::Path};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// File names inside the instance directory.
pub const SERVER_CA: &str = "server-ca.crt";
pub const SERVER_CERT: &str = "apiserver.crt";
pub const SERVER_KEY: &str = "apiserver.key";
pub const CLIENT_CA: &str = "client-ca.crt";
pub const CLIENT_CA_KEY: &str = "client-ca.key";
pub const ADMIN_CERT: &str = "admin.crt";
pub const ADMIN_KEY: &str = "admin.key";
pub const SA_KEY: &str = "sa.key";
pub const SA_PUB: &str = "sa.pub";

fn dn(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    if let Some(o) = org {
        dn.push(DnType::OrganizationName, o);
    }
    dn
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("no SANs to parse");
    p.distinguished_name = dn(cn, None);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

fn write(dir: &Path, name: &str, pem: &str) {
    let path = dir.join(name);
    fs::write(&path, pem).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Generates the PKI into `dir`.
pub fn generate(dir: &Path) {
    let gen = |what: &str| {
        KeyPair::generate().unwrap_or_else(|e| panic!("cannot generate the {what} key: {e}"))
    };

    let server_ca_key = gen("serving CA");
    let server_ca_params = ca_params("tlsmesh-test-server-ca");
    let server_ca = server_ca_params.self_signed(&server_ca_key).expect("self-sign the serving CA");
    let server_issuer = Issuer::new(server_ca_params, server_ca_key);
    write(dir, SERVER_CA, &server_ca.pem());

    let server_key = gen("API server");
    let mut p = CertificateParams::new(vec![
        "127.0.0.1".to_owned(),
        "localhost".to_owned(),
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
        "kubernetes.default.svc.cluster.local".to_owned(),
        // The `kubernetes` Service's ClusterIP (first of --service-cluster-ip-range).
        "10.96.0.1".to_owned(),
    ])
    .expect("valid SANs");
    p.distinguished_name = dn("kube-apiserver", None);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = p.signed_by(&server_key, &server_issuer).expect("sign the serving certificate");
    write(dir, SERVER_CERT, &server.pem());
    write(dir, SERVER_KEY, &server_key.serialize_pem());

    let client_ca_key = gen("client CA");
    let client_ca_params = ca_params("tlsmesh-test-client-ca");
    let client_ca = client_ca_params.self_signed(&client_ca_key).expect("self-sign the client CA");
    write(dir, CLIENT_CA, &client_ca.pem());
    write(dir, CLIENT_CA_KEY, &client_ca_key.serialize_pem());
    let client_issuer = Issuer::new(client_ca_params, client_ca_key);

    let admin_key = gen("admin client");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("no SANs to parse");
    p.distinguished_name = dn("tlsmesh-test-admin", Some("system:masters"));
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin = p.signed_by(&admin_key, &client_issuer).expect("sign the admin certificate");
    write(dir, ADMIN_CERT, &admin.pem());
    write(dir, ADMIN_KEY, &admin_key.serialize_pem());

    let sa = gen("ServiceAccount signing");
    write(dir, SA_KEY, &sa.serialize_pem());
    write(dir, SA_PUB, &sa.public_key_pem());
}
