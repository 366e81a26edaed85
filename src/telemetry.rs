//! Logging: `tracing` with `LOG_LEVEL` (an `EnvFilter` directive such as `info` or
//! `sparky=debug,info`) and `LOG_FORMAT` (`pretty` or `json`). Job spans carry `job_id`, `user_id`,
//! `exchange` and `partition`, so every line a job logs says which job and user it is about.

use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

/// Install the global subscriber (once; later calls are no-ops, which tests rely on).
pub fn init(config: &Config) {
    let filter = EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match config.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}
