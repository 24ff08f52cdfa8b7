use std::{path::Path, process::ExitCode};

use anyhow::Context as _;
use clap::Parser as _;
use ntlm_splice::{
    config::{Cli, Command, Config, ProxyArgs, file},
    logging,
    server::{Control, Server, UpgradeRequest},
    upgrade,
};
use tokio::signal::unix::{SignalKind, signal};

fn main() -> ExitCode {
    upgrade::remember_exe();
    let cli = Cli::parse();
    logging::init();
    let result = match cli.command {
        Some(Command::Doctor) => runtime(1).and_then(|rt| rt.block_on(async { ntlm_splice::doctor::run() })),
        Some(Command::Upgrade { pid, binary }) => {
            return match upgrade::control::request(pid, binary) {
                Ok(summary) => {
                    println!("upgraded: {summary}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("upgrade failed, process {pid} goes on serving: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Check { config }) => {
            // Plain lines on stderr, one per problem, as `nginx -t` prints them.
            return match check(&config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("{e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        None => match cli.proxy.into_config() {
            Ok((config, path)) => {
                let threads = ProxyArgs::worker_threads(&config);
                runtime(threads).and_then(|rt| rt.block_on(proxy(config, path)))
            }
            Err(e) => Err(e.into()),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the runtime: {e}"))
}

/// `ntlm-splice check --config FILE`: validates the file and resolves its backends; binds
/// and loads nothing.
fn check(path: &Path) -> anyhow::Result<()> {
    let config = file::load(path)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        for r in &config.routes {
            for b in &r.backends {
                if let Err(e) = tokio::net::lookup_host(b.to_string()).await {
                    anyhow::bail!("{}: route {:?}: backend {b}: cannot resolve it ({e}); check the name or write an IP address", path.display(), r.name);
                }
            }
        }
        Ok(())
    })?;
    if let Some(user) = &config.global.user {
        let account = ntlm_splice::sys::privs::lookup(user, config.global.group.as_deref())
            .with_context(|| format!("{}: [global] user", path.display()))?;
        println!("{}: user {user:?} exists (uid {}, gid {})", path.display(), account.uid, account.gid);
    }
    let names: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
    let mut listen: Vec<_> = config.routes.iter().flat_map(|r| r.listen.iter()).collect();
    listen.sort();
    listen.dedup();
    println!(
        "{}: ok: {} route(s) ({}), {} listen address(es), {} backend(s) resolved",
        path.display(),
        names.len(),
        names.join(", "),
        listen.len(),
        config.routes.iter().map(|r| r.backends.len()).sum::<usize>()
    );
    Ok(())
}

async fn proxy(config: Config, path: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    raise_nofile_limit();
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigusr2 = signal(SignalKind::user_defined2())?;
    // Looked up before anything is bound: an unknown user fails at once, with the fix.
    let account = match &config.global.user {
        Some(user) => Some(
            ntlm_splice::sys::privs::lookup(user, config.global.group.as_deref())
                .with_context(|| format!("--user {user:?} (or [global] user)"))?,
        ),
        None => None,
    };
    let inherited = upgrade::Inherited::from_env().await.context("taking over from the old process")?;
    let mut server = Server::start_with(config, path, inherited).await?;
    server.drop_privileges(account.as_ref())?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(upgrade::control::serve(tx.clone()));
    tokio::spawn(async move {
        loop {
            let c = tokio::select! {
                _ = sigterm.recv() => { log::info!("received SIGTERM"); Control::Shutdown }
                _ = sigint.recv() => { log::info!("received SIGINT"); Control::Shutdown }
                _ = sighup.recv() => { log::info!("received SIGHUP: reloading the configuration"); Control::Reload }
                _ = sigusr2.recv() => {
                    log::info!("received SIGUSR2: upgrading (starting the binary again and handing it everything)");
                    Control::Upgrade(UpgradeRequest::default())
                }
            };
            let stop = matches!(c, Control::Shutdown);
            if tx.send(c).await.is_err() || stop {
                return;
            }
        }
    });
    server.run(rx).await
}

/// Raises the soft open-files limit to the hard limit: each connection holds two sockets.
fn raise_nofile_limit() {
    if let Err(e) = ntlm_splice::sys::rlimit::raise_nofile() {
        log::warn!("cannot raise the open-files limit: {e}");
    }
}
