//! `tlsmesh-cni`: run by the container runtime as a CNI plugin (no
//! arguments, `CNI_*` in the environment, the network configuration on
//! stdin), or by the `DaemonSet` as `tlsmesh-cni install|uninstall`.

#![forbid(unsafe_code)]
use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    path::PathBuf,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tlsmesh_cni::{
    client::SocketDaemon,
    install::{self, Installed, Options},
    plugin,
};

const USAGE: &str =
    "usage: tlsmesh-cni                   (as a CNI plugin: CNI_COMMAND etc. in the environment)
       tlsmesh-cni install [--bin-dir DIR] [--conf-dir DIR] [--socket-path PATH]
                           [--fail-open] [--exclude-namespace NS]… [--timeout-seconds N] [--wait] [--watch SECONDS]
       tlsmesh-cni uninstall [--bin-dir DIR] [--conf-dir DIR]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => cni(),
        Some("install") => installer(&args[1..], false),
        Some("uninstall") => installer(&args[1..], true),
        Some(_) => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn cni() -> ExitCode {
    let env: HashMap<String, String> =
        std::env::vars().filter(|(k, _)| k.starts_with("CNI_")).collect();
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        eprintln!("tlsmesh-cni: cannot read stdin: {e}");
    }
    let out = plugin::run(&env, &stdin, &mut SocketDaemon);
    if !out.stdout.is_empty() {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{}", out.stdout);
        let _ = o.flush();
    }
    if !out.stderr.is_empty() {
        eprintln!("{}", out.stderr);
    }
    ExitCode::from(u8::try_from(out.exit_code).unwrap_or(1))
}

struct InstallArgs {
    opts: Options,
    wait: bool,
    watch: Option<Duration>,
}

fn parse_install(args: &[String]) -> Result<InstallArgs, String> {
    let mut a = InstallArgs { opts: Options::default(), wait: false, watch: None };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--bin-dir" => a.opts.bin_dir = PathBuf::from(value()?),
            "--conf-dir" => a.opts.conf_dir = PathBuf::from(value()?),
            "--socket-path" => a.opts.socket_path = PathBuf::from(value()?),
            "--fail-open" => a.opts.fail_open = true,
            "--exclude-namespace" => {
                let ns = value()?;
                if !a.opts.exclude_namespaces.contains(&ns) {
                    a.opts.exclude_namespaces.push(ns);
                }
            }
            "--timeout-seconds" => {
                a.opts.timeout_seconds =
                    value()?.parse().map_err(|e| format!("--timeout-seconds: {e}"))?;
            }
            "--wait" => a.wait = true,
            "--watch" => {
                let s: u64 = value()?.parse().map_err(|e| format!("--watch: {e}"))?;
                a.watch = Some(Duration::from_secs(s.max(1)));
            }
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    Ok(a)
}

fn installer(args: &[String], remove: bool) -> ExitCode {
    let a = match parse_install(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tlsmesh-cni: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if remove {
        return match install::uninstall(&a.opts) {
            Ok(()) => {
                println!(
                    "tlsmesh-cni: removed from {} and {}",
                    a.opts.conf_dir.display(),
                    a.opts.bin_dir.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tlsmesh-cni: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tlsmesh-cni: cannot find my own binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    match install::install_binary(&exe, &a.opts) {
        Ok(p) => println!("tlsmesh-cni: binary at {}", p.display()),
        Err(e) => {
            eprintln!("tlsmesh-cni: {e}");
            return ExitCode::FAILURE;
        }
    }
    let poll = a.watch.unwrap_or(Duration::from_secs(2));
    // Run as its container's PID 1, which the kernel sends no default
    // SIGTERM action: without this the pod waits out its whole grace period.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(sig, Arc::clone(&stop)) {
            eprintln!("tlsmesh-cni: cannot handle signal {sig}: {e}");
            return ExitCode::FAILURE;
        }
    }
    loop {
        match install::install_conf(&a.opts) {
            Ok(done) => {
                if let Installed::Chained(p) = &done {
                    println!("tlsmesh-cni: chained into {}", p.display());
                }
                if a.watch.is_none() {
                    return ExitCode::SUCCESS;
                }
            }
            Err(install::InstallError::NoConfig(d)) if a.wait || a.watch.is_some() => {
                println!(
                    "tlsmesh-cni: waiting for the network plugin's configuration in {}",
                    d.display()
                );
            }
            Err(e) => {
                eprintln!("tlsmesh-cni: {e}");
                if a.watch.is_none() {
                    return ExitCode::FAILURE;
                }
            }
        }
        let until = Instant::now() + poll;
        while Instant::now() < until {
            if stop.load(Ordering::Relaxed) {
                println!("tlsmesh-cni: stopping (signal)");
                return ExitCode::SUCCESS;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
