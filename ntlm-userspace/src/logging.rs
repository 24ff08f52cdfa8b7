//! Log set-up: one line per event, `ts=… level=… target: key=value …` (logfmt fields).
//! The access log is the target `access`, one line per connection.

use std::io::Write as _;

/// Initialises env_logger: `RUST_LOG` overrides the default `info`.
pub fn init() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| {
            let ts = buf.timestamp_millis();
            let target = match record.target() {
                "access" => "access",
                t => t.strip_prefix("ntlm_splice::").unwrap_or(t),
            };
            writeln!(
                buf,
                "ts={ts} level={} {target}: {}",
                record.level().as_str().to_ascii_lowercase(),
                record.args()
            )
        })
        .init();
}
