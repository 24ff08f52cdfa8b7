//! ntlm-testd: an HTTP backend that authenticates connections with NTLM the way IIS
//! Windows Authentication does. Serves `GET /whoami` as `DOMAIN\user`.
//!
//! ```text
//! ntlm-testd --listen 127.0.0.1:18080 [--domain EXAMPLE] [--user name:password ...]
//! ```

use std::io::Write as _;
use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use ntlm_splice_tests::ntlm::{DEFAULT_DOMAIN, NtlmServer, User, demo_users};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(
    name = "ntlm-testd",
    version,
    about = "NTLM test backend that behaves like IIS Windows Authentication"
)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the real one is printed).
    #[arg(long, default_value = "127.0.0.1:18080")]
    listen: SocketAddr,
    /// NetBIOS domain name users log in to (an empty domain is accepted too).
    #[arg(long, default_value = DEFAULT_DOMAIN)]
    domain: String,
    /// An account, repeatable. Without any: alice, bob and carol (passwords
    /// Alice-Pass-1, Bob-Pass-2, Carol-Pass-3).
    #[arg(long = "user", value_name = "NAME:PASSWORD", value_parser = parse_user)]
    users: Vec<User>,
}

fn parse_user(s: &str) -> Result<User, String> {
    match s.split_once(':') {
        Some((name, password)) if !name.is_empty() => Ok(User::new(name, password)),
        _ => Err("expected NAME:PASSWORD with a non-empty NAME".to_owned()),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    let users = if args.users.is_empty() {
        demo_users()
    } else {
        args.users
    };

    // Install the handlers before announcing readiness, so a signal sent right after
    // the "listening" line is not lost (background jobs may start with SIGINT ignored).
    let mut sigterm =
        signal(SignalKind::terminate()).context("failed to install the SIGTERM handler")?;
    let mut sigint =
        signal(SignalKind::interrupt()).context("failed to install the SIGINT handler")?;
    let server = NtlmServer::start(args.listen, &args.domain, users)
        .await
        .with_context(|| format!("failed to listen on {} - is the port free?", args.listen))?;
    println!(
        "ntlm-testd listening on {} domain={} users={}",
        server.local_addr(),
        server.domain(),
        server.user_names().join(",")
    );
    std::io::stdout()
        .flush()
        .context("failed to write to stdout")?;

    tokio::select! {
        _ = sigint.recv() => {}
        _ = sigterm.recv() => {}
    }
    drop(server);
    Ok(())
}
