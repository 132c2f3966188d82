//! The CA's file edge: `tlsmesh ca init` (write a new root), loading a root or
//! an external intermediate with permission checks, and reloading when the
//! files change (checked by modification time, size and inode, so a
//! Kubernetes Secret volume's symlink swap is seen too).

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::{Ca, CaError, PemNames, SharedCa};
use crate::keys::certs_from_pem;

/// Where the CA's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaPaths {
    /// CA certificate PEM: the signing certificate first, then intermediates,
    /// optionally ending with the root.
    pub cert: PathBuf,
    /// The CA private key PEM; must not be readable by group or others.
    pub key: PathBuf,
    /// Optional extra trust anchors (PEM, several roots allowed): the root
    /// of an external intermediate, or old+new roots during rotation.
    pub bundle: Option<PathBuf>,
}

impl CaPaths {
    /// `<dir>/ca.pem` and `<dir>/ca.key`, as written by [`CaFiles::init`].
    pub fn in_dir(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref();
        Self { cert: dir.join("ca.pem"), key: dir.join("ca.key"), bundle: None }
    }

    fn all(&self) -> impl Iterator<Item = &Path> {
        [self.cert.as_path(), self.key.as_path()].into_iter().chain(self.bundle.as_deref())
    }
}

/// Whether [`CaFiles::init`] may replace existing files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overwrite {
    /// Fail if `ca.pem` or `ca.key` exists (the default for `ca init`).
    Refuse,
    /// Replace them (`ca init --force`).
    Replace,
}

/// A CA loaded from files, reloadable when they change.
#[derive(Debug)]
pub struct CaFiles {
    paths: CaPaths,
    trust_domain: String,
    shared: SharedCa,
    stamps: Mutex<Vec<Stamp>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

impl CaFiles {
    /// Creates a self-signed ECDSA P-256 root for `trust_domain` valid for
    /// `validity`, writing `<dir>/ca.pem` (0644) and `<dir>/ca.key` (0600),
    /// and loads it.
    pub fn init(
        dir: impl AsRef<Path>,
        trust_domain: &str,
        validity: Duration,
        overwrite: Overwrite,
    ) -> Result<CaFiles, CaError> {
        let dir = dir.as_ref();
        let paths = CaPaths::in_dir(dir);
        if overwrite == Overwrite::Refuse {
            for path in [&paths.cert, &paths.key] {
                if path.exists() {
                    return Err(CaError::Exists { path: path.display().to_string() });
                }
            }
        }
        fs::create_dir_all(dir)
            .map_err(|source| CaError::Write { path: dir.display().to_string(), source })?;
        let (_, generated) = Ca::generate_root(trust_domain, validity)?;
        write_file(&paths.key, generated.key.to_pem().as_bytes(), 0o600)?;
        write_file(&paths.cert, generated.cert_pem.as_bytes(), 0o644)?;
        tracing::info!(cert = %paths.cert.display(), key = %paths.key.display(), trust_domain, "created CA root");
        Self::open(paths, trust_domain)
    }

    /// Loads a CA (a root from `init`, or an external intermediate with its
    /// chain) and validates it: readable files, key mode 0600 or stricter,
    /// key matching the certificate, certificate valid now, chain complete.
    pub fn open(paths: CaPaths, trust_domain: &str) -> Result<CaFiles, CaError> {
        let stamps = stamp_all(&paths)?;
        let ca = load(&paths, trust_domain, OffsetDateTime::now_utc())?;
        Ok(CaFiles {
            paths,
            trust_domain: trust_domain.to_owned(),
            shared: SharedCa::new(ca),
            stamps: Mutex::new(stamps),
        })
    }

    /// The handle to sign with; it follows reloads.
    pub fn shared(&self) -> SharedCa {
        self.shared.clone()
    }

    pub fn paths(&self) -> &CaPaths {
        &self.paths
    }

    /// Reloads the CA if any of its files changed since the last load.
    /// Returns `Ok(true)` if a new CA is now in use. On error the previous CA
    /// stays in use (and the change is retried on the next call).
    pub fn reload_if_changed(&self) -> Result<bool, CaError> {
        let now_stamps = stamp_all(&self.paths)?;
        let mut stamps = self.stamps.lock().unwrap_or_else(PoisonError::into_inner);
        if *stamps == now_stamps {
            return Ok(false);
        }
        let ca = load(&self.paths, &self.trust_domain, OffsetDateTime::now_utc())?;
        tracing::info!(cert = %self.paths.cert.display(), not_after = %ca.not_after(), "reloaded CA files");
        self.shared.replace(ca);
        *stamps = now_stamps;
        Ok(true)
    }

    /// Spawns a task calling [`reload_if_changed`](Self::reload_if_changed)
    /// every `interval`, logging failures (the old CA stays in use).
    pub fn spawn_reload_loop(
        self: std::sync::Arc<Self>,
        interval: Duration,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = self.reload_if_changed() {
                    tracing::error!(error = %e, "CA files changed but cannot be loaded; still signing with the previous CA");
                }
            }
        })
    }
}

fn load(paths: &CaPaths, trust_domain: &str, now: OffsetDateTime) -> Result<Ca, CaError> {
    let cert_pem = read_to_string(&paths.cert)?;
    check_key_mode(&paths.key)?;
    let key_pem = Zeroizing::new(read_to_string(&paths.key)?);
    let extra_roots = match &paths.bundle {
        Some(bundle) => {
            let text = read_to_string(bundle)?;
            let what = bundle.display().to_string();
            certs_from_pem(&text, &what).map_err(|source| CaError::Parse { path: what, source })?
        }
        None => Vec::new(),
    };
    let names =
        PemNames { cert: paths.cert.display().to_string(), key: paths.key.display().to_string() };
    Ca::from_pem(&cert_pem, &key_pem, &extra_roots, trust_domain, now, &names)
}

fn read_to_string(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path)
        .map_err(|source| CaError::Read { path: path.display().to_string(), source })
}

/// Refuses a key file that group or others may read (follows symlinks, so a
/// Secret volume's `..data` link is checked at its target).
fn check_key_mode(path: &Path) -> Result<(), CaError> {
    let meta = fs::metadata(path)
        .map_err(|source| CaError::Read { path: path.display().to_string(), source })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(CaError::KeyPermissions { path: path.display().to_string(), mode });
    }
    Ok(())
}

fn stamp_all(paths: &CaPaths) -> Result<Vec<Stamp>, CaError> {
    paths
        .all()
        .map(|path| {
            let meta = fs::metadata(path)
                .map_err(|source| CaError::Read { path: path.display().to_string(), source })?;
            Ok(Stamp { modified: meta.modified().ok(), len: meta.len(), ino: meta.ino() })
        })
        .collect()
}

/// Writes a new file with `mode` from the start (no window where a key is
/// world-readable); an existing file is removed first.
pub(crate) fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let err = |source| CaError::Write { path: path.display().to_string(), source };
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let mut file =
        fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(err)?;
    // The umask may have narrowed the mode; set it exactly.
    file.set_permissions(fs::Permissions::from_mode(mode)).map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)
}
