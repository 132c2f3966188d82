//! Developer workflows: `cargo xtask setup | test | demo | bench | kube-scale | cluster | cleanup | build`.
//!
//! Each command first runs the idempotent bootstrap (scripts/bootstrap.sh:
//! apt packages, bpf-linker, the Kubernetes control plane the
//! `real_apiserver_*` tests run against — built once per machine, about 7–12
//! minutes the first time — cgroup v2 and bpffs checks), so a fresh Debian 12
//! machine needs nothing else. The work itself is done by cargo and by the
//! binaries of the tests crate (netkit demo, bench, cleanup).

#![forbid(unsafe_code)]
use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "tlsmesh developer workflows")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the project needs (apt packages, bpf-linker) and check the kernel.
    Setup,
    /// Set up, build everything, and run the whole test suite (as root).
    Test {
        /// Extra arguments for `cargo test` (after `--` go to the test binaries).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build, and run the local two-node demo.
    Demo {
        /// Node-to-node transport for the demo.
        #[arg(long, default_value = "tcp")]
        transport: String,
        /// On a real local Kubernetes cluster instead (docs/CLUSTER.md):
        /// cluster up, helm install, the demo with real pods; the cluster
        /// stays up (`cargo xtask cluster down` removes it).
        #[arg(long)]
        cluster: bool,
    },
    /// Set up, build (release), and run the benchmark.
    Bench {
        /// Extra arguments for the bench binary (e.g. --quick).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build (release), and run the Kubernetes scale benchmark: one
    /// node daemon against a real API server with a cluster's worth of objects.
    KubeScale {
        /// Extra arguments (--nodes N --pods N --services N --churn N --local N).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A real two-node Kubernetes cluster on this machine (kubelet,
    /// containerd, bridge CNI, kube-proxy; scripts/cluster.sh, docs/CLUSTER.md).
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Remove namespaces, cgroups and pins a killed test run left behind.
    Cleanup,
    /// Set up and build the release binary.
    Build,
}

#[derive(Subcommand, Clone, Copy)]
enum ClusterAction {
    /// Set up, then start the control plane and two nodes and wait until both are Ready (idempotent).
    Up,
    /// Stop everything `up` started and remove its state, netns, mounts and cgroups.
    Down,
    /// What runs, and whether the nodes are Ready (exit status 0 only when all is up).
    Status,
    /// Build the release binaries and the tlsmesh image, then install the
    /// chart into the running cluster with Helm, as a user would.
    Install,
}

impl ClusterAction {
    fn arg(self) -> &'static str {
        match self {
            ClusterAction::Up => "up",
            ClusterAction::Down => "down",
            ClusterAction::Status => "status",
            ClusterAction::Install => "install",
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent").to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd.current_dir(root()).status().with_context(|| format!("cannot run {shown}"))?;
    if !st.success() {
        bail!("{shown} failed ({st})");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn setup() -> Result<()> {
    run(Command::new("bash").arg("scripts/bootstrap.sh")).context(
        "set-up failed; the message above says what is missing (run as root on Debian 12 with a cgroup-v2 capable kernel)",
    )
}

/// The release binaries the demo and the bench run: `tlsmesh`, `demo`, `bench`.
fn build_release_bins() -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "tlsmesh", "-p", "tlsmesh-tests", "--bins"]))
}

/// Removes what killed test runs left behind.
fn cleanup() -> Result<()> {
    run(cargo().args(["run", "--quiet", "-p", "tlsmesh-tests", "--bin", "netkit-cleanup"]))
}

/// Features every build of the suite uses (so `cargo test` reuses what
/// `cargo build` made, and the `kube-scale` benchmark is compiled too).
const FEATURES: &[&str] = &["--features", "tlsmesh-tests/kube-scale"];

/// Tests that spend minutes mostly waiting (a certificate lifetime, a
/// five-minute stream) and little CPU: `(package, test target, test name)`.
/// They run beside the rest of the suite instead of after it.
const WAITING_TESTS: &[(&str, &str, &str)] = &[(
    "tlsmesh-tests",
    "identity",
    "rotation_keeps_a_five_minute_stream_and_new_connections_use_the_new_serial",
)];

/// The built test executable of `package`'s test target `target`.
fn test_executable(package: &str, target: &str) -> Result<PathBuf> {
    let out = cargo()
        .args(["test", "--no-run", "--message-format=json", "-p", package, "--test", target])
        .args(FEATURES)
        .current_dir(root())
        .output()
        .context("cannot run cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run -p {package} --test {target} failed");
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == target)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("no test executable for {package} --test {target}"))
}

/// The whole suite: the waiting tests start first, each as its own process
/// (output to a log under target/), the rest runs with them skipped; then
/// the waiting ones are awaited and their output printed.
fn test_suite() -> Result<()> {
    let mut waiting = Vec::new();
    for (package, target, name) in WAITING_TESTS {
        let exe = test_executable(package, target)?;
        let log = root().join(format!("target/xtask-{name}.log"));
        let file = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
        let dir = root().join(if *package == "tlsmesh-tests" { "tests" } else { package });
        let child = Command::new(&exe)
            .args(["--exact", name, "--nocapture"])
            .current_dir(dir)
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        eprintln!("xtask: {name} runs beside the suite (log: {})", log.display());
        waiting.push((name, log, child));
    }
    let mut cmd = cargo();
    cmd.args(["test", "--workspace"]).args(FEATURES).arg("--");
    for (_, _, name) in WAITING_TESTS {
        cmd.args(["--skip", name]);
    }
    let rest = run(&mut cmd);
    let mut failed = Vec::new();
    for (name, log, mut child) in waiting {
        let st = child.wait().with_context(|| format!("waiting for {name}"))?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        eprintln!("xtask: --- {name} ({st}) ---\n{text}");
        if !st.success() {
            failed.push(*name);
        }
    }
    rest?;
    if !failed.is_empty() {
        bail!("failed beside the suite: {failed:?}");
    }
    Ok(())
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let t0 = Instant::now();
    match cli.cmd {
        Cmd::Setup => setup()?,
        Cmd::Build => {
            setup()?;
            run(cargo().args(["build", "--release", "-p", "tlsmesh"]))?;
        }
        Cmd::Cleanup => {
            cleanup()?;
        }
        Cmd::Cluster { action } => {
            if matches!(action, ClusterAction::Up | ClusterAction::Install) {
                setup()?;
            }
            if matches!(action, ClusterAction::Install) {
                run(cargo().args(["build", "--release", "-p", "tlsmesh", "-p", "tlsmesh-cni"]))?;
            }
            run(Command::new("bash").args(["scripts/cluster.sh", action.arg()]))?;
        }
        Cmd::Test { args } => {
            setup()?;
            cleanup()?;
            run(cargo().args(["build", "--workspace", "--all-targets"]).args(FEATURES))?;
            if args.is_empty() {
                test_suite()?;
            } else {
                run(cargo().args(["test", "--workspace"]).args(FEATURES).args(&args))?;
            }
            eprintln!("xtask: all tests passed in {:.0?}", t0.elapsed());
        }
        Cmd::Demo { cluster: true, .. } => {
            setup()?;
            run(cargo().args(["build", "--release", "-p", "tlsmesh", "-p", "tlsmesh-cni"]))?;
            for step in ["up", "install", "demo"] {
                run(Command::new("bash").args(["scripts/cluster.sh", step]))?;
            }
            eprintln!(
                "xtask: the cluster stays up (KUBECONFIG=/var/lib/tlsmesh-cluster/admin.kubeconfig); \
                 cargo xtask cluster down removes it"
            );
        }
        Cmd::Demo { transport, cluster: false } => {
            setup()?;
            build_release_bins()?;
            run(Command::new(root().join("target/release/demo")).args(["--transport", &transport]))?;
        }
        Cmd::KubeScale { args } => {
            setup()?;
            run(cargo().args([
                "build",
                "--release",
                "-p",
                "tlsmesh",
                "-p",
                "tlsmesh-cni",
                "-p",
                "tlsmesh-tests",
                "--features",
                "tlsmesh-tests/kube-scale",
                "--bins",
            ]))?;
            run(Command::new(root().join("target/release/kube-scale")).args(&args))?;
        }
        Cmd::Bench { args } => {
            setup()?;
            build_release_bins()?;
            run(Command::new(root().join("target/release/bench")).args(&args))?;
        }
    }
    Ok(())
}
