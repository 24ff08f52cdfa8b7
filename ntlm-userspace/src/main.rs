use std::{process::ExitCode, sync::Arc};

use anyhow::Context as _;
use clap::Parser as _;
use ntlm_splice::{
    config::{Cli, Command},
    engine::Engine,
    logging, server,
};
use tokio::signal::unix::{SignalKind, signal};

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init();
    let threads = match &cli.command {
        Some(Command::Doctor) => 1,
        None => match cli.proxy.worker_threads() {
            Ok(n) => n,
            Err(e) => {
                log::error!("{e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            log::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Some(Command::Doctor) => rt.block_on(async { ntlm_splice::doctor::run() }),
        None => rt.block_on(proxy(cli.proxy, threads)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn proxy(args: ntlm_splice::config::ProxyArgs, threads: usize) -> anyhow::Result<()> {
    let config = Arc::new(args.into_config().await?);
    raise_nofile_limit();
    let (engine, reason) = Engine::select(&config)?;
    let listeners = server::bind(&config.listen)?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    log::info!("engine={} reason=\"{reason}\"", engine.kind());
    for l in &listeners {
        log::info!(
            "listening addr={} backends={} max_connections={} threads={threads}",
            l.local_addr()?,
            config.backends.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(","),
            config.max_connections
        );
    }
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => log::info!("received SIGTERM"),
            _ = sigint.recv() => log::info!("received SIGINT"),
        }
    };
    server::run(listeners, config, Arc::new(engine), shutdown).await
}

/// Raises the soft open-files limit to the hard limit: each connection holds two sockets.
fn raise_nofile_limit() {
    if let Err(e) = ntlm_splice::sys::rlimit::raise_nofile() {
        log::warn!("cannot raise the open-files limit: {e}");
    }
}
