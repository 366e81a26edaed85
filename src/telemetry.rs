//! Logging: `tracing` with `LOG_LEVEL` (an `EnvFilter` directive such as `info` or
//! `sparky=debug,info`) and `LOG_FORMAT` (`pretty` or `json`). Job spans carry `job_id`, `user_id`,
//! `exchange` and `partition`, so every line a job logs says which job and user it is about: in JSON
//! each line is one object with the event's fields at the top level and the job's under `span`
//! (`{"level":"INFO","message":"job finished",...,"span":{"job_id":...,"user_id":...,
//! "exchange":"paper","partition":2,"name":"job"}}`). Code that runs inside a job (executor,
//! exchange clients, credentials) must not open spans of its own, or `span` would name those
//! instead (a test checks the job's lines).

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

fn filter(level: &str) -> EnvFilter {
    EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// The subscriber of `LOG_FORMAT=json`, writing to `writer` (tests capture it).
pub fn json_subscriber<W>(level: &str, writer: W) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter(level))
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_writer(writer)
        .finish()
}

/// Install the global subscriber (once; later calls are no-ops, which tests rely on).
pub fn init(config: &Config) {
    match config.log_format {
        LogFormat::Json => {
            let _ = json_subscriber(&config.log_level, std::io::stdout).try_init();
        }
        LogFormat::Pretty => {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter(&config.log_level))
                .compact()
                .try_init();
        }
    }
}
