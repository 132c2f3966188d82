//! Builds the eBPF object from `../ebpf` and leaves it in `OUT_DIR` for
//! `include_bytes_aligned!`. Rebuilt when the eBPF or shared-type sources change.
//!
//! Toolchain, first that works:
//! 1. `TLSMESH_EBPF_OBJECT=<path>`: a prebuilt object, copied as is.
//! 2. Debian's rustc-web + rust-web-src (`/usr/bin/rustc`, sources under
//!    `/usr/lib/rustlib/src/rust/library`) with `RUSTC_BOOTSTRAP=1`.
//! 3. A rustup nightly that has `rust-src`.
//!
//! Both need `bpf-linker` on PATH (or in ~/.cargo/bin). With neither the
//! build stops with one message naming the command that installs them.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

const SETUP_HINT: &str =
    "run `sudo bash scripts/bootstrap.sh` (or `cargo xtask setup`) from the repository root; \
     it installs rustc-web, cargo-web, rust-web-src, llvm-22-dev and bpf-linker 0.13";

fn main() {
    let manifest =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest.parent().expect("userspace/ has a parent").to_path_buf();
    let ebpf_dir = root.join("ebpf");
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("tlsmesh-ebpf.o");
    for p in ["ebpf/src", "ebpf/Cargo.toml", "ebpf/Cargo.lock", "common/src", "common/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=TLSMESH_EBPF_OBJECT");

    if let Some(obj) = env::var_os("TLSMESH_EBPF_OBJECT") {
        std::fs::copy(&obj, &out).unwrap_or_else(|e| {
            fail(&format!(
                "TLSMESH_EBPF_OBJECT={} cannot be copied: {e}",
                Path::new(&obj).display()
            ))
        });
        return;
    }

    build(&root, &ebpf_dir, &out, "ebpf", &[]);
    // The test variant: the same programs plus one counter (see
    // `tlsmesh_common::counter::VARIANT_CAPTURED`), a second object for the
    // program-replacement test. Built only with the `ebpf-variant` feature.
    if env::var_os("CARGO_FEATURE_EBPF_VARIANT").is_some() {
        let variant = out.with_file_name("tlsmesh-ebpf-variant.o");
        build(&root, &ebpf_dir, &variant, "ebpf-variant", &["--cfg=tlsmesh_variant"]);
        println!("cargo:rustc-env=TLSMESH_EBPF_VARIANT={}", variant.display());
    }
}

/// Builds the eBPF crate into `target/<subdir>` and copies the object to `out`.
fn build(root: &Path, ebpf_dir: &Path, out: &Path, subdir: &str, extra_flags: &[&str]) {
    let home = env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let mut path = OsString::from(home.join(".cargo/bin"));
    path.push(":");
    path.push(env::var_os("PATH").unwrap_or_default());
    if !linker_present(&path) {
        fail(&format!("bpf-linker not found on PATH or in ~/.cargo/bin; {SETUP_HINT}"));
    }
    let Some(mut cmd) = toolchain_command(&path) else {
        fail(&format!(
            "no Rust toolchain with library sources for the bpfel-unknown-none target \
             (Debian's rustc-web + rust-web-src, or a rustup nightly with rust-src); {SETUP_HINT}"
        ));
    };

    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join(subdir);
    // The child cargo must not inherit the outer build's settings.
    for (k, _) in env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if (k.starts_with("CARGO") && k != "CARGO_HOME")
            || k.starts_with("RUSTC")
            || k == "RUSTFLAGS"
            || k == "RUSTDOCFLAGS"
            || k == "RUSTUP_TOOLCHAIN"
        {
            cmd.env_remove(&k);
        }
    }
    if let Some((rustc, bootstrap)) = debian_rustc() {
        cmd.env("RUSTC", rustc);
        if bootstrap {
            cmd.env("RUSTC_BOOTSTRAP", "1");
        }
    }
    cmd.current_dir(ebpf_dir)
        .env("PATH", &path)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["--cfg=bpf_target_arch=\"x86_64\"", "-Cdebuginfo=2", "-Clink-arg=--btf"]
                .iter()
                .chain(extra_flags)
                .copied()
                .collect::<Vec<_>>()
                .join("\x1f"),
        )
        .args(["build", "--release", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir);
    let status = cmd.status().unwrap_or_else(|e| {
        fail(&format!("cannot run cargo for the eBPF build: {e}; {SETUP_HINT}"))
    });
    if !status.success() {
        fail(&format!("the eBPF build failed ({status}); see the compiler output above"));
    }
    let built = target_dir.join("bpfel-unknown-none/release/tlsmesh-ebpf");
    std::fs::copy(&built, out).unwrap_or_else(|e| {
        fail(&format!("eBPF object {} missing after build: {e}", built.display()))
    });
    strip_debug(out, &path);
}

/// Drops the DWARF sections from the object: bpf-linker needs them to
/// write BTF, the loader reads only `.BTF`/`.BTF.ext`, and they are most of
/// the object (1.7 MB of 1.9 with aya-log's formatting code), which the
/// daemon embeds, hashes and parses at every start — resident memory.
fn strip_debug(object: &Path, path: &OsString) {
    let objcopy = [PathBuf::from("/usr/lib/llvm-22/bin/llvm-objcopy")]
        .into_iter()
        .chain(env::split_paths(path).map(|d| d.join("llvm-objcopy")))
        .find(|p| p.is_file());
    let Some(objcopy) = objcopy else {
        println!("cargo:warning=llvm-objcopy not found: the eBPF object keeps its DWARF sections (larger daemon RSS); {SETUP_HINT}");
        return;
    };
    let status = Command::new(&objcopy).arg("--strip-debug").arg(object).status();
    if !status.is_ok_and(|s| s.success()) {
        fail(&format!("{} --strip-debug {} failed", objcopy.display(), object.display()));
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("\ntlsmesh eBPF build: {msg}\n");
    panic!("tlsmesh eBPF build: {msg}");
}

fn linker_present(path: &OsString) -> bool {
    env::split_paths(path).any(|d| d.join("bpf-linker").is_file())
}

/// Debian's rustc-web: `/usr/bin/rustc` with sources in its sysroot.
fn debian_rustc() -> Option<(PathBuf, bool)> {
    let rustc = PathBuf::from("/usr/bin/rustc");
    let src = Path::new("/usr/lib/rustlib/src/rust/library/core");
    (rustc.is_file() && src.is_dir() && Path::new("/usr/bin/cargo").is_file())
        .then_some((rustc, true))
}

fn toolchain_command(path: &OsString) -> Option<Command> {
    if debian_rustc().is_some() {
        return Some(Command::new("/usr/bin/cargo"));
    }
    // rustup nightly with rust-src.
    let rustup = env::split_paths(path).map(|d| d.join("rustup")).find(|p| p.is_file())?;
    let sysroot = Command::new(&rustup)
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return None;
    }
    let mut cmd = Command::new(rustup);
    cmd.args(["run", "nightly", "cargo"]);
    Some(cmd)
}
