//! `ntlm-bench serve`: the loopback backend (sink, source, echo by header).
//! `ntlm-bench run WORKLOAD`: one measured client run; prints one JSON [`Report`] line.
//!
//! Both are started by `cargo xtask bench`, each in its own process so that the open-file
//! limit of each covers its own side of 10,000 connections.
//!
//! [`Report`]: ntlm_bench::report::Report

mod client;
mod serve;

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ntlm-bench",
    about = "Load generator and loopback backend for cargo xtask bench"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve sink/source/echo connections until killed or `--max-secs` pass. Prints
    /// `listening addr=IP:PORT` on stdout once bound.
    Serve {
        /// Address to bind (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Exit after this many seconds whatever happens (a bound for a forgotten backend).
        #[arg(long, default_value_t = 3600)]
        max_secs: u64,
    },
    /// Run one workload against `--target` and print its JSON report on stdout.
    Run(client::RunArgs),
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Serve { listen, max_secs } => {
            match serve::serve(listen, Duration::from_secs(max_secs)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ntlm-bench serve: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Run(args) => {
            let report = client::run(&args);
            match serde_json::to_string(&report) {
                Ok(line) => println!("{line}"),
                Err(e) => {
                    eprintln!("ntlm-bench run: cannot encode the report: {e}");
                    return ExitCode::FAILURE;
                }
            }
            // The report says what failed; the exit code only says whether it is usable.
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            }
        }
    }
}
