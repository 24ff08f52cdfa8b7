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
        None => match (cli.proxy.watch_config, cli.proxy.into_config()) {
            (watch, Ok((config, path))) => {
                let threads = ProxyArgs::worker_threads(&config);
                runtime(threads).and_then(|rt| rt.block_on(proxy(config, path, watch)))
            }
            (_, Err(e)) => Err(e.into()),
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
                    anyhow::bail!(
                        "{}: route {:?}: backend {b}: cannot resolve it ({e}); check the name or write an IP address",
                        path.display(),
                        r.name
                    );
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

async fn proxy(
    config: Config,
    path: Option<std::path::PathBuf>,
    watch: Option<std::time::Duration>,
) -> anyhow::Result<()> {
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
    // The content the running configuration came from, read before it is applied: a change
    // made while starting is then seen by the first poll.
    let watched = match (watch, &path) {
        (Some(every), Some(p)) => Some((p.clone(), every, std::fs::read(p).unwrap_or_default())),
        _ => None,
    };
    let inherited = upgrade::Inherited::from_env().await.context("taking over from the old process")?;
    let mut server = Server::start_with(config, path, inherited).await?;
    server.drop_privileges(account.as_ref())?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let tx_watch = tx.clone();
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
    if let Some((path, every, content)) = watched {
        tokio::spawn(watch_config(path, every, content, tx_watch));
    }
    server.run(rx).await
}

/// `--watch-config`: reads the file every `every` and asks for a reload when its content
/// differs from the last content seen. Content, not mtime: a Kubernetes ConfigMap update
/// swaps a symlink, and the file's own mtime says nothing. A reload that is rejected is not
/// asked for again until the content changes again (the server logs why it was rejected).
async fn watch_config(
    path: std::path::PathBuf,
    every: std::time::Duration,
    mut last: Vec<u8>,
    tx: tokio::sync::mpsc::Sender<Control>,
) {
    log::info!("watching {} for changes every {}", path.display(), humantime::format_duration(every));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut unreadable = false;
    loop {
        tick.tick().await;
        // A small local file (a ConfigMap volume is tmpfs): read in place.
        let now = match std::fs::read(&path) {
            Ok(now) => {
                unreadable = false;
                now
            }
            Err(e) => {
                if !std::mem::replace(&mut unreadable, true) {
                    log::warn!(
                        "--watch-config: cannot read {} ({e}); the running configuration stays; make it readable \
                         by the process's user",
                        path.display()
                    );
                }
                continue;
            }
        };
        if now != last {
            last = now;
            log::info!("{} changed: reloading the configuration", path.display());
            if tx.send(Control::Reload).await.is_err() {
                return;
            }
        }
    }
}

/// Raises the soft open-files limit to the hard limit: each connection holds two sockets.
fn raise_nofile_limit() {
    if let Err(e) = ntlm_splice::sys::rlimit::raise_nofile() {
        log::warn!("cannot raise the open-files limit: {e}");
    }
}
