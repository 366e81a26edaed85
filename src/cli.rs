//! The admin CLI (`sparky`). Every command exits non-zero on failure with one line saying why;
//! listing commands take `--json` for scripts.

pub mod risk;
pub mod strategies;

use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use uuid::Uuid;

use crate::config::Config;
use crate::credentials::seal_row;
use crate::domain::{CredentialEnv, ExchangeKind};
use crate::queue::Queue;
use crate::replay;
use crate::secrets::{generate_webhook_secret, hash_webhook_secret, SecretString};
use crate::store::{CredentialRow, Store};

#[derive(Parser, Debug)]
#[command(name = "sparky", version, about = "Sparky admin CLI")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Apply the database migrations.
    Migrate,
    /// Manage users and their webhook secrets.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage exchange credentials (bot_credentials).
    #[command(subcommand)]
    Credentials(CredentialsCommand),
    /// The dead-letter list: rejected and dead jobs with their reasons.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Re-enqueue failed (rejected/dead) jobs on their user's partition.
    Replay(ReplayArgs),
    /// Compare Sparky's positions and resting orders with the brokers' and fix Sparky's record:
    /// stop-loss / take-profit fills recorded as trades, orphaned protective orders cancelled,
    /// working entries followed, positions set to the brokers' (drift reported). Never opens a
    /// position. Prints what it found and did, per account.
    Reconcile {
        /// Only this user's accounts (default: every account with a position or a resting order).
        #[arg(long)]
        user: Option<Uuid>,
        #[arg(long)]
        json: bool,
    },
    /// A user's notification channels: Discord, Slack, Telegram, or a signed HTTPS webhook.
    #[command(subcommand)]
    Notify(NotifyCommand),
    /// A user's strategies: named defaults for alerts (exchange, size, stop-loss, ...).
    #[command(subcommand)]
    Strategy(strategies::StrategyCommand),
    /// A user's risk limits (per user, optionally per strategy).
    #[command(subcommand)]
    Risk(risk::RiskCommand),
    /// Partitions (owner, lag, pending, oldest pending age), live workers, dead-letter size.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// List rejected and dead jobs, newest first.
    List {
        #[arg(long)]
        user: Option<Uuid>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["job", "user", "since", "all"])))]
pub struct ReplayArgs {
    /// Job id(s) to replay (repeat the flag, or give several).
    #[arg(long = "job", num_args = 1..)]
    pub job: Vec<Uuid>,
    /// Every failed job of this user, oldest first.
    #[arg(long)]
    pub user: Option<Uuid>,
    /// Jobs whose entries are in the partition streams from this time (RFC 3339)...
    #[arg(long, requires = "until")]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// ...to this time (RFC 3339).
    #[arg(long, requires = "since")]
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// Every rejected and dead job.
    #[arg(long)]
    pub all: bool,
    /// Only list what would be replayed.
    #[arg(long)]
    pub dry_run: bool,
    /// Run jobs that would be stale (older than SPARKY_MAX_SIGNAL_AGE_SECS / their max_lag_secs).
    #[arg(long)]
    pub allow_stale: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Create a user and print its webhook secret (shown once; only its hash is stored).
    Create {
        #[arg(long)]
        user_id: Option<Uuid>,
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Revoke the user's webhook secrets and print a new one.
    RotateSecret {
        #[arg(long)]
        user: Uuid,
        #[arg(long)]
        json: bool,
    },
    /// API tokens for the user API (`Authorization: Bearer`), separate from the webhook secret.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create an API token and print it (shown once; only its hash is stored).
    Create {
        #[arg(long)]
        user: Uuid,
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Revoke one API token (`--token-id`) or all of the user's (`--all`).
    #[command(group(clap::ArgGroup::new("which").required(true).args(["token_id", "all"])))]
    Revoke {
        #[arg(long)]
        user: Uuid,
        #[arg(long)]
        token_id: Option<Uuid>,
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum NotifyCommand {
    /// Add a channel. Its URL (Discord/Slack webhook URLs are secrets), signing secret and bot token
    /// are encrypted under SPARKY_MASTER_KEY; give any of them as `-` to read it from standard input.
    Add(NotifyAdd),
    /// The user's channels (no secrets shown).
    List {
        #[arg(long)]
        user: Uuid,
        #[arg(long)]
        json: bool,
    },
    /// Remove a channel (its undelivered notifications go with it).
    Remove {
        #[arg(long)]
        user: Uuid,
        #[arg(long)]
        channel: Uuid,
    },
    /// Send a test notification to a channel now and say what it answered.
    Test {
        #[arg(long)]
        user: Uuid,
        #[arg(long)]
        channel: Uuid,
    },
}

#[derive(Args, Debug)]
pub struct NotifyAdd {
    #[arg(long)]
    pub user: Uuid,
    /// webhook | discord | slack | telegram
    #[arg(long)]
    pub kind: String,
    /// The URL (webhook, discord, slack); `-` reads it from standard input (or env SPARKY_NOTIFY_URL).
    #[arg(long, env = "SPARKY_NOTIFY_URL", hide_env_values = true)]
    pub url: Option<SecretString>,
    /// Telegram: the chat id (numeric, or @channel).
    #[arg(long)]
    pub chat_id: Option<String>,
    /// Telegram: the bot token; `-` reads it from standard input (or env SPARKY_TELEGRAM_BOT_TOKEN).
    #[arg(long, env = "SPARKY_TELEGRAM_BOT_TOKEN", hide_env_values = true)]
    pub bot_token: Option<SecretString>,
    /// Webhook: the `whsec_` signing secret (default: a new one, printed once); `-` reads stdin.
    #[arg(long)]
    pub secret: Option<SecretString>,
    /// The events it wants, comma-separated: filled, rejected, dead, blocked, unprotected,
    /// stop_loss_fired, take_profit_fired; or `all`.
    #[arg(long, default_value = "all")]
    pub events: String,
    #[arg(long)]
    pub label: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum CredentialsCommand {
    /// Add or replace a user's credentials for an exchange (encrypted when SPARKY_MASTER_KEY is set).
    Set(SetCredentials),
    /// Encrypt every plaintext api_key/api_secret (rows inserted directly, as the original system did).
    /// A row changed while this runs is left alone and reported (run again to encrypt it).
    EncryptExisting {
        #[arg(long)]
        json: bool,
    },
    /// Re-encrypt every row under the current SPARKY_MASTER_KEY; rows written under an older key need
    /// that key in SPARKY_OLD_MASTER_KEYS. Plaintext rows are encrypted too.
    RotateKey {
        #[arg(long)]
        json: bool,
    },
}

/// Secrets never need to be on the command line (where `ps` and the shell history show them):
/// `--api-key -` / `--api-secret -` read the value from standard input (both `-`: the key on the
/// first line, the secret on the second), and `SPARKY_API_KEY` / `SPARKY_API_SECRET` are read when
/// the flag is absent.
#[derive(Args, Debug)]
pub struct SetCredentials {
    #[arg(long)]
    pub user: Uuid,
    #[arg(long)]
    pub exchange: String,
    /// The API key, `-` to read it from standard input (or env SPARKY_API_KEY).
    #[arg(long, env = "SPARKY_API_KEY", hide_env_values = true)]
    pub api_key: SecretString,
    /// The API secret, `-` to read it from standard input (or env SPARKY_API_SECRET).
    #[arg(long, env = "SPARKY_API_SECRET", hide_env_values = true)]
    pub api_secret: SecretString,
    #[arg(long)]
    pub account_id: Option<String>,
    #[arg(long, default_value = "production")]
    pub environment: String,
    #[arg(long)]
    pub label: Option<String>,
    /// extra_config as a JSON object, e.g. '{"leverage": 5}'
    #[arg(long)]
    pub extra: Option<String>,
}

/// `sparky status [--json]`. The partition count is the one recorded in Redis (what the workers
/// use), whatever `SPARKY_PARTITIONS` this shell has.
pub async fn status(config: &Config, json: bool) -> anyhow::Result<()> {
    let probe = Queue::connect(
        config.redis_target(),
        &config.namespace,
        config.partitions,
        Duration::from_secs(5),
    )
    .await?;
    let recorded: Option<u32> = redis::cmd("GET")
        .arg(probe.keys.partitions_meta())
        .query_async(&mut probe.conn())
        .await?;
    let queue = match recorded {
        Some(n) if n != config.partitions => {
            Queue::connect(
                config.redis_target(),
                &config.namespace,
                n,
                Duration::from_secs(5),
            )
            .await?
        }
        _ => probe,
    };
    let status = crate::status::collect(&queue).await?;
    if json {
        println!("{}", serde_json::to_string(&status)?);
    } else {
        print!("{}", crate::status::render_table(&status));
    }
    Ok(())
}

/// `sparky reconcile [--user U] [--json]`: what it found and did, per account, as printed. Uses the
/// worker's credential loading and clients; safe next to running workers (see
/// [`crate::reconcile`]). Fails when an account could not be reconciled to the end (after printing
/// the others).
pub async fn reconcile(
    config: &Config,
    store: &Store,
    user: Option<Uuid>,
    json: bool,
) -> anyhow::Result<String> {
    let queue = Queue::connect(
        &config.redis_url,
        &config.namespace,
        config.partitions,
        Duration::from_secs(5),
    )
    .await?;
    let worker = crate::worker::Worker::new(
        config.clone(),
        store.clone(),
        queue,
        tokio_util::sync::CancellationToken::new(),
    );
    let reports = worker.reconcile(user).await?;
    let out = if json {
        format!("{}\n", serde_json::to_string(&reports)?)
    } else if reports.is_empty() {
        "nothing to reconcile: no positions or resting orders recorded\n".to_string()
    } else {
        reports.iter().map(ToString::to_string).collect()
    };
    let failed = reports.iter().filter(|r| r.error.is_some()).count();
    if failed > 0 {
        print!("{out}");
        anyhow::bail!("{failed} account(s) could not be reconciled to the end");
    }
    Ok(out)
}

/// Run a parsed command. Errors are for the caller to print as one line.
pub async fn run(cli: Cli, config: Config) -> anyhow::Result<()> {
    if let Command::Status { json } = cli.command {
        // Redis only: it answers while Postgres is down.
        return status(&config, json).await;
    }
    if matches!(cli.command, Command::Migrate) {
        use sqlx::migrate::MigrateDatabase;
        if !sqlx::Postgres::database_exists(&config.database_url).await? {
            sqlx::Postgres::create_database(&config.database_url).await?;
            println!("created the database");
        }
    }
    let store = Store::connect(&config.database_url, 2).await?;
    match cli.command {
        Command::Migrate => {
            store.migrate().await?;
            println!("database migrated");
        }
        Command::User(UserCommand::Create {
            user_id,
            label,
            json,
        }) => {
            store.check_migrated().await?;
            let user_id = user_id.unwrap_or_else(Uuid::now_v7);
            let secret = generate_webhook_secret();
            store
                .create_user(
                    user_id,
                    label.as_deref(),
                    &hash_webhook_secret(secret.expose()),
                )
                .await?;
            print_secret(user_id, secret.expose(), json);
        }
        Command::User(UserCommand::RotateSecret { user, json }) => {
            store.check_migrated().await?;
            let secret = generate_webhook_secret();
            store
                .rotate_secret(user, &hash_webhook_secret(secret.expose()))
                .await?;
            print_secret(user, secret.expose(), json);
        }
        Command::Credentials(CredentialsCommand::Set(s)) => {
            store.check_migrated().await?;
            let (api_key, api_secret) =
                secrets_from_stdin(s.api_key, s.api_secret, &mut std::io::stdin().lock())?;
            let exchange: ExchangeKind = s
                .exchange
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--exchange: {e}"))?;
            let environment: CredentialEnv = s
                .environment
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--environment: {e}"))?;
            let extra_config = match &s.extra {
                None => json!({}),
                Some(t) => match serde_json::from_str(t) {
                    Ok(v @ serde_json::Value::Object(_)) => v,
                    _ => anyhow::bail!("--extra: must be a JSON object"),
                },
            };
            let mut row = CredentialRow {
                user_id: s.user,
                exchange: exchange.as_str().into(),
                api_key: api_key.expose().to_string(),
                api_secret: api_secret.expose().to_string(),
                account_id: s.account_id,
                environment: environment.as_str().into(),
                extra_config,
                label: s.label,
            };
            if config.master_key.is_none() {
                eprintln!("warning: SPARKY_MASTER_KEY is not set; credentials are stored in plaintext (run `sparky credentials encrypt-existing` once a key is set)");
            }
            seal_row(&mut row, config.master_key.as_ref());
            store.upsert_credentials(&row).await?;
            invalidate_cache(&config, s.user, exchange).await;
            println!(
                "saved {} {} credentials for user {}",
                exchange,
                environment.as_str(),
                s.user
            );
        }
        Command::Credentials(CredentialsCommand::EncryptExisting { json }) => {
            store.check_migrated().await?;
            let Some(key) = config.master_key.as_ref() else {
                anyhow::bail!("SPARKY_MASTER_KEY: required to encrypt credentials");
            };
            let report = encrypt_existing(&store, key).await?;
            if json {
                println!(
                    "{}",
                    json!({"encrypted": report.encrypted, "skipped": report.skipped})
                );
            } else {
                println!("encrypted {} credential rows", report.encrypted);
                if !report.skipped.is_empty() {
                    eprintln!(
                        "skipped {} rows changed while this ran (ids {}); they were left as written. Run `sparky credentials encrypt-existing` again to encrypt any still in plaintext",
                        report.skipped.len(),
                        report
                            .skipped
                            .iter()
                            .map(|id| id.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
        }
        Command::User(UserCommand::Token(TokenCommand::Create { user, label, json })) => {
            store.check_migrated().await?;
            let token = crate::secrets::generate_api_token();
            let token_id = Uuid::now_v7();
            store
                .create_api_token(
                    user,
                    token_id,
                    &crate::secrets::hash_api_token(token.expose()),
                    label.as_deref(),
                )
                .await
                .map_err(|e| anyhow::anyhow!("--user: {e}"))?;
            if json {
                println!(
                    "{}",
                    json!({"user_id": user, "token_id": token_id, "token": token.expose()})
                );
            } else {
                println!("token_id: {token_id}\ntoken:    {}\n(the token is shown once; only its hash is stored. Use it as `Authorization: Bearer <token>`)", token.expose());
            }
        }
        Command::User(UserCommand::Token(TokenCommand::Revoke {
            user,
            token_id,
            all: _,
        })) => {
            store.check_migrated().await?;
            let n = store.revoke_api_tokens(user, token_id).await?;
            if n == 0 {
                anyhow::bail!(
                    "no active API token matched (user {user}{})",
                    token_id.map(|t| format!(", token {t}")).unwrap_or_default()
                );
            }
            println!("revoked {n} API token(s) of user {user}");
        }
        Command::Notify(cmd) => {
            store.check_migrated().await?;
            notify_command(&store, &config, cmd).await?;
        }
        Command::Dlq(DlqCommand::List { user, limit, json }) => {
            store.check_migrated().await?;
            let jobs = store.failed_jobs(user, None, None, limit).await?;
            if json {
                println!("{}", serde_json::to_string(&jobs)?);
            } else if jobs.is_empty() {
                println!("no rejected or dead jobs");
            } else {
                println!(
                    "{:<36}  {:<36}  {:<8}  {:<11}  {:<20}  error",
                    "job_id", "user_id", "status", "class", "accepted_at"
                );
                for j in jobs {
                    println!(
                        "{:<36}  {:<36}  {:<8}  {:<11}  {:<20}  {}",
                        j.job_id,
                        j.user_id,
                        j.status,
                        j.error_class.map_or("-", |c| c.as_str()),
                        j.accepted_at.format("%Y-%m-%d %H:%M:%S"),
                        j.error.as_deref().unwrap_or("")
                    );
                }
            }
        }
        Command::Status { .. } => {} // answered above, without Postgres
        Command::Reconcile { user, json } => {
            store.check_migrated().await?;
            print!("{}", reconcile(&config, &store, user, json).await?);
        }
        Command::Strategy(c) => strategies::run(&store, c).await?,
        Command::Risk(c) => risk::run(&store, c).await?,
        Command::Replay(r) => {
            store.check_migrated().await?;
            let queue = Queue::from_config(&config, Duration::from_secs(5)).await?;
            queue.check_partitions().await?;
            let selector = if !r.job.is_empty() {
                replay::Selector::Jobs(r.job)
            } else if let Some(u) = r.user {
                replay::Selector::User(u)
            } else if let (Some(since), Some(until)) = (r.since, r.until) {
                replay::Selector::Range { since, until }
            } else {
                replay::Selector::AllFailed
            };
            let ids = replay::select(&store, &queue, &selector).await?;
            let opts = replay::Options {
                dry_run: r.dry_run,
                allow_stale: r.allow_stale,
                max_signal_age: config.max_signal_age,
            };
            let items = replay::replay(&store, &queue, &ids, &opts).await?;
            if r.json {
                println!("{}", serde_json::to_string(&items)?);
            } else {
                if items.is_empty() {
                    println!("nothing to replay");
                }
                for i in &items {
                    println!(
                        "{}  {:<14}  {}",
                        i.job_id,
                        serde_json::to_value(&i.decision)?.as_str().unwrap_or(""),
                        i.detail
                    );
                }
            }
            if items.iter().any(|i| i.decision == replay::Decision::Error) {
                anyhow::bail!("some jobs could not be re-enqueued");
            }
        }
        Command::Credentials(CredentialsCommand::RotateKey { json }) => {
            store.check_migrated().await?;
            let Some(key) = config.master_key.as_ref() else {
                anyhow::bail!("SPARKY_MASTER_KEY: required (the key to re-encrypt under)");
            };
            let report = rotate_key(&store, key).await?;
            let flushed = flush_credential_cache(&config).await;
            if json {
                println!(
                    "{}",
                    json!({
                        "key_id": key.id(),
                        "rotated": report.rotated,
                        "current": report.current,
                        "failed": report.failed,
                        "cache_flushed": flushed,
                    })
                );
            } else {
                println!(
                    "re-encrypted {} credential rows under key {} ({} already were)",
                    report.rotated,
                    key.id(),
                    report.current
                );
                if !flushed {
                    eprintln!("warning: Redis unreachable; cached credential rows (old ciphertext) expire within SPARKY_CREDENTIAL_CACHE_TTL_SECS: keep the old key configured until then");
                }
            }
            if !report.failed.is_empty() {
                anyhow::bail!(
                    "{} rows could not be re-encrypted (ids {}): {}",
                    report.failed.len(),
                    report
                        .failed
                        .iter()
                        .map(|(id, _)| id.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    report.failed[0].1
                );
            }
        }
    }
    Ok(())
}

/// `sparky notify ...`.
async fn notify_command(store: &Store, config: &Config, cmd: NotifyCommand) -> anyhow::Result<()> {
    use crate::notify::channel::{self, ChannelKind, NewChannel};
    let keys: Vec<&crate::secrets::MasterKey> = config.master_key.iter().collect();
    match cmd {
        NotifyCommand::Add(a) => {
            let kind: ChannelKind = a
                .kind
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--kind: {e}"))?;
            let events = crate::notify::EventKind::parse_list(&a.events)
                .map_err(|e| anyhow::anyhow!("--events: {e}"))?;
            let mut stdin = std::io::stdin().lock();
            let mut from_stdin =
                |v: Option<SecretString>, flag: &str| -> anyhow::Result<Option<SecretString>> {
                    match v {
                        Some(v) if v.expose() == "-" => {
                            let mut line = zeroize::Zeroizing::new(String::new());
                            std::io::BufRead::read_line(&mut stdin, &mut line).map_err(|e| {
                                anyhow::anyhow!("{flag} -: cannot read standard input: {e}")
                            })?;
                            let v = SecretString::new(line.trim());
                            if v.is_empty() {
                                anyhow::bail!("{flag}: empty");
                            }
                            Ok(Some(v))
                        }
                        other => Ok(other),
                    }
                };
            let (destination, secret) = match kind {
                ChannelKind::Telegram => {
                    if a.url.is_some() || a.secret.is_some() {
                        anyhow::bail!(
                            "--url/--secret: a telegram channel takes --chat-id and --bot-token"
                        );
                    }
                    let chat = a.chat_id.ok_or_else(|| {
                        anyhow::anyhow!("--chat-id: required for a telegram channel")
                    })?;
                    (
                        SecretString::new(chat),
                        from_stdin(a.bot_token, "--bot-token")?,
                    )
                }
                _ => {
                    if a.chat_id.is_some() || a.bot_token.is_some() {
                        anyhow::bail!("--chat-id/--bot-token: only for a telegram channel");
                    }
                    let url = from_stdin(a.url, "--url")?
                        .ok_or_else(|| anyhow::anyhow!("--url: required for a {kind} channel"))?;
                    (url, from_stdin(a.secret, "--secret")?)
                }
            };
            if config.master_key.is_none() {
                eprintln!("warning: SPARKY_MASTER_KEY is not set; the channel's URL and secrets are stored in plaintext");
            }
            let (info, generated) = channel::add(
                store,
                config.master_key.as_ref(),
                a.user,
                NewChannel {
                    kind,
                    destination,
                    secret,
                    events,
                    label: a.label,
                },
            )
            .await?;
            if a.json {
                let mut v = serde_json::to_value(&info)?;
                if let Some(s) = &generated {
                    v["signing_secret"] = json!(s.expose());
                }
                println!("{v}");
            } else {
                println!(
                    "channel_id: {}\nkind:       {}\nto:         {}",
                    info.channel_id, info.kind, info.display
                );
                if let Some(s) = generated {
                    println!("signing secret: {}\n(shown once; verify the webhook-signature header with it, per the Standard Webhooks spec)", s.expose());
                }
            }
        }
        NotifyCommand::List { user, json } => {
            let chans = channel::list(store, user).await?;
            if json {
                println!("{}", serde_json::to_string(&chans)?);
            } else if chans.is_empty() {
                println!("no notification channels for user {user}");
            } else {
                for c in chans {
                    let events: Vec<&str> = c.events.iter().map(|e| e.as_str()).collect();
                    println!(
                        "{}  {:<8}  {:<32}  {}  {}",
                        c.channel_id,
                        c.kind,
                        c.display,
                        events.join(","),
                        c.label.unwrap_or_default()
                    );
                }
            }
        }
        NotifyCommand::Remove { user, channel } => {
            if !channel::remove(store, user, channel).await? {
                anyhow::bail!("--channel: user {user} has no channel {channel}");
            }
            println!("removed channel {channel}");
        }
        NotifyCommand::Test { user, channel } => {
            let ch = channel::load(store, &keys, user, channel).await?;
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none())
                .build()?;
            let event = crate::notify::dispatch::test_event(user);
            let msg_id = event["event_id"].as_str().unwrap_or("test").to_string();
            let defaults = crate::notify::dispatch::DispatcherConfig::default();
            let a = crate::notify::dispatch::send(
                &http,
                &defaults.telegram_base_url,
                &ch,
                &msg_id,
                &event,
            )
            .await;
            if !a.ok {
                anyhow::bail!(
                    "the channel did not take the test notification: {}",
                    a.error.unwrap_or_default()
                );
            }
            println!(
                "delivered (the channel answered {})",
                a.http_status.unwrap_or(200)
            );
        }
    }
    Ok(())
}

fn print_secret(user_id: Uuid, secret: &str, json: bool) {
    if json {
        println!("{}", json!({"user_id": user_id, "secret": secret}));
    } else {
        println!("user_id: {user_id}\nsecret:  {secret}\n(the secret is shown once; only its hash is stored)");
    }
}

/// Drop cached credential rows of the user+exchange so a change is seen at once.
async fn invalidate_cache(config: &Config, user: Uuid, exchange: ExchangeKind) {
    let Ok(q) = Queue::connect(
        config.redis_target(),
        &config.namespace,
        config.partitions,
        Duration::from_secs(2),
    )
    .await
    else {
        eprintln!("warning: Redis unreachable; cached credentials expire within the cache TTL");
        return;
    };
    let keys: Vec<String> = ["default", "production", "sandbox"]
        .iter()
        .map(|e| q.keys.credentials(&user, exchange.as_str(), e))
        .collect();
    let _: Result<i64, _> = redis::cmd("DEL").arg(keys).query_async(&mut q.conn()).await;
}

/// What `sparky credentials rotate-key` did.
#[derive(Debug, Default)]
pub struct RotateReport {
    /// Rows re-encrypted (or encrypted, if they were plaintext) under the current key.
    pub rotated: u64,
    /// Rows that already were under the current key.
    pub current: u64,
    /// Rows left as they were: (row id, why). The reason never contains a credential.
    pub failed: Vec<(i64, String)>,
}

/// Re-encrypt every credential row under `key` (which carries the retired keys that can still
/// decrypt). Each row is updated only if it still holds what was read, so a concurrent
/// `credentials set` is never overwritten; such a row is read again.
pub async fn rotate_key(
    store: &Store,
    key: &crate::secrets::MasterKey,
) -> anyhow::Result<RotateReport> {
    use crate::credentials::aad;
    use crate::secrets::reseal;
    use sqlx::Row;
    let mut report = RotateReport::default();
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM bot_credentials ORDER BY id")
        .fetch_all(&store.pool)
        .await?;
    for id in ids {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let Some(r) = sqlx::query(
                "SELECT user_id, exchange, api_key, api_secret FROM bot_credentials WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(&store.pool)
            .await?
            else {
                break; // deleted meanwhile
            };
            let user: Uuid = r.get("user_id");
            let exchange: String = r.get("exchange");
            let (old_key, old_secret): (String, String) = (r.get("api_key"), r.get("api_secret"));
            let sealed = reseal(&old_key, &aad(&user, &exchange, "api_key"), key)
                .map_err(|e| format!("api_key: {e}"))
                .and_then(|k| {
                    reseal(&old_secret, &aad(&user, &exchange, "api_secret"), key)
                        .map(|s| (k, s))
                        .map_err(|e| format!("api_secret: {e}"))
                });
            let (new_key, new_secret) = match sealed {
                Ok((None, None)) => {
                    report.current += 1;
                    break;
                }
                Ok((k, s)) => (
                    k.unwrap_or_else(|| old_key.clone()),
                    s.unwrap_or_else(|| old_secret.clone()),
                ),
                Err(why) => {
                    report.failed.push((id, format!("row {id}: {why}")));
                    break;
                }
            };
            let n = sqlx::query(
                "UPDATE bot_credentials SET api_key = $2, api_secret = $3, updated_at = now()
                 WHERE id = $1 AND api_key = $4 AND api_secret = $5",
            )
            .bind(id)
            .bind(&new_key)
            .bind(&new_secret)
            .bind(&old_key)
            .bind(&old_secret)
            .execute(&store.pool)
            .await?
            .rows_affected();
            if n == 1 {
                report.rotated += 1;
                break;
            }
            if attempts >= 3 {
                report
                    .failed
                    .push((id, format!("row {id}: changed concurrently; run again")));
                break;
            }
        }
    }
    Ok(report)
}

/// Delete every cached credential row of the namespace (they hold ciphertext under the old key).
/// `false` when Redis could not be reached.
pub async fn flush_credential_cache(config: &Config) -> bool {
    let Ok(q) = Queue::connect(
        config.redis_target(),
        &config.namespace,
        config.partitions,
        Duration::from_secs(2),
    )
    .await
    else {
        return false;
    };
    let mut c = q.conn();
    // SCAN on every master of a cluster; DEL splits its keys by slot there.
    let Ok(keys) = c.scan_match(&format!("{}:cred:*", q.keys.ns)).await else {
        return false;
    };
    for chunk in keys.chunks(500) {
        let r: Result<i64, _> = redis::cmd("DEL").arg(chunk).query_async(&mut c).await;
        if r.is_err() {
            return false;
        }
    }
    true
}

/// What `sparky credentials encrypt-existing` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EncryptReport {
    /// Rows encrypted.
    pub encrypted: u64,
    /// Rows that changed between reading and writing them (ids): left as the other writer left them.
    pub skipped: Vec<i64>,
}

/// Encrypt every plaintext credential row in place. Each row is written only if it still holds
/// what was read (compare-and-set on `api_key` and `api_secret`), so a concurrent
/// `credentials set` (or another `encrypt-existing`) is never overwritten with stale values; such
/// a row is skipped and reported.
pub async fn encrypt_existing(
    store: &Store,
    key: &crate::secrets::MasterKey,
) -> anyhow::Result<EncryptReport> {
    use sqlx::Row;
    let rows = sqlx::query(
        "SELECT id, user_id, exchange, api_key, api_secret FROM bot_credentials
         WHERE api_key NOT LIKE 'enc:v1:%' OR api_secret NOT LIKE 'enc:v1:%'
         ORDER BY id",
    )
    .fetch_all(&store.pool)
    .await?;
    let mut report = EncryptReport::default();
    for r in rows {
        let id: i64 = r.get("id");
        let (old_key, old_secret): (String, String) = (r.get("api_key"), r.get("api_secret"));
        let mut row = CredentialRow {
            user_id: r.get("user_id"),
            exchange: r.get::<String, _>("exchange").to_ascii_lowercase(),
            api_key: old_key.clone(),
            api_secret: old_secret.clone(),
            account_id: None,
            environment: String::new(),
            extra_config: serde_json::Value::Null,
            label: None,
        };
        seal_row(&mut row, Some(key));
        let n = sqlx::query(
            "UPDATE bot_credentials SET api_key = $2, api_secret = $3, updated_at = now()
             WHERE id = $1 AND api_key = $4 AND api_secret = $5",
        )
        .bind(id)
        .bind(&row.api_key)
        .bind(&row.api_secret)
        .bind(&old_key)
        .bind(&old_secret)
        .execute(&store.pool)
        .await?
        .rows_affected();
        if n == 1 {
            report.encrypted += 1;
        } else {
            report.skipped.push(id);
        }
    }
    Ok(report)
}

/// Replace `-` in `--api-key` / `--api-secret` by a line of `stdin` (the key's first when both are
/// `-`). A value read is trimmed of its line end; an empty value is refused, naming the flag.
pub fn secrets_from_stdin(
    api_key: SecretString,
    api_secret: SecretString,
    stdin: &mut dyn std::io::BufRead,
) -> anyhow::Result<(SecretString, SecretString)> {
    let mut resolve = |v: SecretString, flag: &str| -> anyhow::Result<SecretString> {
        let v = if v.expose() == "-" {
            let mut line = zeroize::Zeroizing::new(String::new());
            stdin
                .read_line(&mut line)
                .map_err(|e| anyhow::anyhow!("{flag} -: cannot read standard input: {e}"))?;
            SecretString::new(line.trim_end_matches(['\r', '\n']))
        } else {
            v
        };
        if v.expose().trim().is_empty() {
            anyhow::bail!("{flag}: empty (give the value, `-` to read it from standard input, or set the environment variable)");
        }
        Ok(v)
    };
    let k = resolve(api_key, "--api-key")?;
    let s = resolve(api_secret, "--api-secret")?;
    Ok((k, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn strategy_set_changes_only_the_given_fields() {
        let parse = |args: &[&str]| match Cli::try_parse_from(args).unwrap().command {
            Command::Strategy(strategies::StrategyCommand::Set(s)) => s,
            other => panic!("{other:?}"),
        };
        let u = "0195f3d0-0000-7000-8000-000000000001";
        let first = parse(&[
            "sparky",
            "strategy",
            "set",
            "--user",
            u,
            "--name",
            "trend",
            "--exchange",
            "oanda",
            "--risk-usd",
            "50",
            "--stop-loss-percent",
            "1",
        ])
        .apply(None)
        .unwrap();
        assert_eq!(first.exchange, Some(ExchangeKind::Oanda));
        assert_eq!(
            first.sizing.map(|s| (s.mode, s.amount)),
            Some((
                crate::domain::SizingMode::RiskUsd,
                rust_decimal::Decimal::from(50)
            ))
        );
        let second = parse(&[
            "sparky",
            "strategy",
            "set",
            "--user",
            u,
            "--name",
            "trend",
            "--quantity",
            "3",
            "--clear",
            "stop_loss_percent",
        ])
        .apply(Some(first))
        .unwrap();
        assert_eq!(second.exchange, Some(ExchangeKind::Oanda), "kept");
        assert_eq!(second.stop_loss_percent, None, "cleared");
        assert_eq!(
            second.sizing.map(|s| s.mode),
            Some(crate::domain::SizingMode::Quantity)
        );
        // a trailing stop Tradier cannot run is refused at once
        let e = parse(&[
            "sparky",
            "strategy",
            "set",
            "--user",
            u,
            "--name",
            "t",
            "--exchange",
            "tradier",
            "--trailing-stop-percent",
            "1",
        ])
        .apply(None)
        .unwrap_err();
        assert!(e.to_string().contains("Tradier"), "{e}");
        // two sizes at once: clap refuses
        assert!(Cli::try_parse_from([
            "sparky",
            "strategy",
            "set",
            "--user",
            u,
            "--name",
            "t",
            "--quantity",
            "1",
            "--risk-usd",
            "2",
        ])
        .is_err());
    }

    #[test]
    fn risk_set_parses_hours_lists_and_clears() {
        let u = "0195f3d0-0000-7000-8000-000000000001";
        let set = match Cli::try_parse_from([
            "sparky",
            "risk",
            "set",
            "--user",
            u,
            "--kill-switch",
            "on",
            "--trading-hours",
            "22:00-06:00",
            "--time-zone",
            "Europe/Berlin",
            "--allow-symbols",
            "ethusdt, EUR_USD",
            "--max-daily-loss",
            "250",
        ])
        .unwrap()
        .command
        {
            Command::Risk(risk::RiskCommand::Set(s)) => s,
            other => panic!("{other:?}"),
        };
        let l = set.apply(None).unwrap();
        assert!(l.kill_switch);
        assert_eq!(l.time_zone, "Europe/Berlin");
        assert_eq!(
            l.allow_symbols,
            Some(vec!["ETHUSDT".to_string(), "EUR_USD".to_string()])
        );
        assert!(l.trading_hours.is_some());
        assert!(risk::parse_hours("9-17").is_err());
        assert!(risk::parse_hours("10:00-10:00").is_err());
    }

    fn s(v: &str) -> SecretString {
        SecretString::new(v)
    }

    #[test]
    fn dash_reads_secrets_from_stdin_in_order() {
        let mut input = std::io::Cursor::new("the-key\r\nthe-secret\n");
        let (k, v) = secrets_from_stdin(s("-"), s("-"), &mut input).unwrap();
        assert_eq!((k.expose(), v.expose()), ("the-key", "the-secret"));

        let mut input = std::io::Cursor::new("only-secret");
        let (k, v) = secrets_from_stdin(s("given"), s("-"), &mut input).unwrap();
        assert_eq!((k.expose(), v.expose()), ("given", "only-secret"));

        let mut input = std::io::Cursor::new("just-the-key\n");
        let e = secrets_from_stdin(s("-"), s("-"), &mut input).unwrap_err();
        assert!(e.to_string().starts_with("--api-secret"), "{e}");
        let e = secrets_from_stdin(s(""), s("x"), &mut std::io::empty()).unwrap_err();
        assert!(e.to_string().starts_with("--api-key"), "{e}");
    }

    #[test]
    fn parsed_secrets_never_print() {
        use clap::Parser;
        let cli = Cli::try_parse_from([
            "sparky",
            "credentials",
            "set",
            "--user",
            "00000000-0000-7000-8000-000000000001",
            "--exchange",
            "paper",
            "--api-key",
            "KEYVALUE",
            "--api-secret",
            "SECRETVALUE",
        ])
        .unwrap();
        let dbg = format!("{cli:?}");
        assert!(
            !dbg.contains("KEYVALUE") && !dbg.contains("SECRETVALUE"),
            "{dbg}"
        );
    }
}
