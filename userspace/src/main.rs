//! The `tlsmesh` binary: parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::Parser;
use tlsmesh::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Test builds only: the fault points FAILPOINTS names (see `faults`).
    #[cfg(feature = "failpoints")]
    let _faults = tlsmesh::faults::setup();
    // quinn pulls in rustls' ring feature next to aws-lc-rs: name the provider.
    let _ = rustls::crypto::CryptoProvider::install_default(
        (*tlsmesh_identity::tls::provider()).clone(),
    );
    match cli.command {
        Command::Ca(cmd) => {
            tlsmesh::logging::init(cmd.log_format());
            match tlsmesh::ca_cmd::run(cmd) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&*e),
            }
        }
        Command::Node(args) => {
            let cfg = match args.resolve() {
                Ok(c) => c,
                Err(e) => return fail(&e),
            };
            tlsmesh::logging::init(cfg.log_format);
            if args.uninstall {
                return match tlsmesh::app::uninstall(&cfg) {
                    Ok(n) => {
                        println!("removed {n} pinned objects from {}", cfg.pin_dir.display());
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(&e),
                };
            }
            let cfg = match cfg.validate() {
                Ok(c) => c,
                Err(e) => return fail(&e),
            };
            // One worker: a current-thread runtime (no work-stealing
            // machinery; +15 % new connections/s measured, docs/BENCHMARKS.md).
            let rt = if cfg.worker_threads == 1 {
                tokio::runtime::Builder::new_current_thread().enable_all().build()
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(cfg.worker_threads)
                    .enable_all()
                    .build()
            }
            .expect("tokio runtime");
            match rt.block_on(tlsmesh::app::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Command::Check(args) => {
            let thresholds = tlsmesh::check::Thresholds {
                min_cert_validity: args.min_cert_validity,
                min_root_validity: args.min_root_validity,
            };
            match tlsmesh::check::run(&args, &thresholds) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Command::Logging(args) => match tlsmesh::status::logging(&args) {
            Ok(answer) => {
                println!("{answer}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Status(args) => match tlsmesh::status::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
    }
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("tlsmesh: {e}");
    ExitCode::FAILURE
}
