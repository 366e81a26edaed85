//! Issue 12 items 4 and 5: the working-order follower and the reconciliation with the broker, end
//! to end (real Postgres and Redis, the fake brokers). Sweeps are explicit calls
//! (`Worker::reconcile`, `sparky::cli::reconcile`), never waited for.

use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde_json::{json, Value};
use sparky::domain::{Account, CredentialEnv, ExchangeKind, Side};
use sparky::exchanges::{client_order_id, Leg};
use sparky::job::{ExitReason, JobStatus};
use sparky::reconcile::{AccountReport, DriftKind, Finding};
use uuid::Uuid;

use crate::fakes::*;
use crate::helpers::*;

fn account(user: Uuid, exchange: ExchangeKind) -> Account {
    Account {
        user_id: user,
        exchange,
        environment: CredentialEnv::Production,
    }
}

fn protected(mut hook: Value, sl: u32, tp: u32) -> Value {
    hook["stop_loss_percent"] = json!(sl);
    hook["take_profit_percent"] = json!(tp);
    hook
}

async fn reconcile(app: &TestApp, user: Uuid) -> Vec<AccountReport> {
    let reports = app.worker().reconcile(Some(user)).await.unwrap();
    for r in &reports {
        assert_eq!(r.error, None, "{r}");
    }
    reports
}

fn findings(reports: &[AccountReport]) -> Vec<Finding> {
    reports.iter().flat_map(|r| r.findings.clone()).collect()
}

async fn broker_order_state(app: &TestApp, coid: &str) -> String {
    sqlx::query_scalar("SELECT state FROM broker_orders WHERE client_order_id = $1")
        .bind(coid)
        .fetch_one(&app.store.pool)
        .await
        .unwrap()
}

/// An aster user with a 100 USD ETHUSDT long at 3000, protected by a 2% stop and a 4% take-profit
/// (`buy`: its job).
async fn a_protected_eth_long() -> (std::sync::Arc<AsterFake>, TestApp, Uuid, String, Uuid) {
    let (fake, _, app, user, secret) = aster_app().await;
    let buy = app
        .run_expecting(
            &protected(webhook(user, &secret, "aster", "buy", "ETHUSDT", 100), 2, 4),
            JobStatus::Succeeded,
        )
        .await;
    (fake, app, user, secret, buy)
}

/// What a sweep finds and records when the stop of `buy` (a 100 USD ETHUSDT long at 3000 with a 2%
/// stop and a 4% take-profit) filled at 2900: the `sl` exit with its PnL, the take-profit cancelled
/// as an orphan, the position gone without drift.
async fn assert_the_stop_at_2900_is_recorded(
    app: &TestApp,
    user: Uuid,
    buy: Uuid,
    found: &[Finding],
) {
    let sl = client_order_id(buy, Leg::StopLoss);
    let tp = client_order_id(buy, Leg::TakeProfit);
    assert_eq!(
        found,
        [
            Finding::ProtectionFilled {
                symbol: "ETHUSDT".into(),
                job_id: buy,
                client_order_id: sl.clone(),
                exit_reason: ExitReason::StopLoss,
                quantity: dec!(0.033),
                price: Some(dec!(2900)),
                pnl: Some(dec!(-3.3)),
            },
            Finding::OrphanCancelled {
                symbol: "ETHUSDT".into(),
                client_order_id: tp.clone(),
            },
            Finding::PositionSynced {
                symbol: "ETHUSDT".into(),
                sparky: Some(sparky::reconcile::Held {
                    side: Side::Long,
                    quantity: dec!(0.033)
                }),
                broker: None,
                drift: None,
            },
        ]
    );
    let (qty, price, pnl, reason, _fee) = trade_leg(app, buy, "sl").await;
    assert_eq!(
        (qty, price, pnl, reason),
        (
            dec!(0.033),
            Some(dec!(2900)),
            Some(dec!(-3.3)),
            Some(ExitReason::StopLoss)
        )
    );
    assert_eq!(broker_order_state(app, &sl).await, "filled");
    assert_eq!(broker_order_state(app, &tp).await, "cancelled");
    assert_eq!(app.position(user, "ETHUSDT").await, None);
}

/// A stop fires at the broker: the reconciliation records the `sl` exit (quantity, price, PnL,
/// exit reason) as a trade of the job that placed it, cancels the take-profit left orphaned,
/// deletes Sparky's position without calling it drift, and the next buy opens.
#[tokio::test]
async fn a_stop_fired_at_the_broker_is_recorded_and_the_next_buy_opens() {
    let (fake, app, user, secret, buy) = a_protected_eth_long().await;

    // The price falls through the stop (2940): the broker closes the long at 2900.
    fake.set_price("ETHUSDT", dec!(2900));
    assert_eq!(fake.position("ETHUSDT"), Decimal::ZERO);
    assert_eq!(
        fake.open_orders("ETHUSDT").len(),
        1,
        "the take-profit rests"
    );

    let found = findings(&reconcile(&app, user).await);
    assert_the_stop_at_2900_is_recorded(&app, user, buy, &found).await;
    assert!(fake.open_orders("ETHUSDT").is_empty(), "no orphan left");

    // A second sweep finds nothing more.
    assert!(findings(&reconcile(&app, user).await).is_empty());

    // The next buy opens a new long (it is not "already long").
    let again = app
        .enqueue(&webhook(user, &secret, "aster", "buy", "ETHUSDT", 100))
        .await;
    app.run_worker_until_idle().await;
    let job = app.job(again).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    assert_eq!(fake.position("ETHUSDT"), dec!(0.034), "100 USD at 2900");
    let pos = app.position(user, "ETHUSDT").await.unwrap();
    assert_eq!((pos.side, pos.quantity), (Side::Long, dec!(0.034)));
}

/// The stop fires while a sweep runs, between its listing of the orders (the stop still rests)
/// and its reading of the position (flat): the stop is cancelled as an orphan, but its fill is
/// what the broker reports after the cancel, so it is recorded as the `sl` exit it was, and the
/// close is not drift. (Before, it ended `cancelled` with a "closed" drift and no trade.)
#[tokio::test]
async fn a_stop_that_fires_between_the_listing_and_the_position_read_is_recorded_as_the_exit() {
    let (fake, app, user, _, buy) = a_protected_eth_long().await;
    fake.set_price_after_next_listing("ETHUSDT", dec!(2900));

    let found = findings(&reconcile(&app, user).await);
    assert_eq!(fake.position("ETHUSDT"), Decimal::ZERO, "the stop fired");
    assert_the_stop_at_2900_is_recorded(&app, user, buy, &found).await;
    assert!(findings(&reconcile(&app, user).await).is_empty());
}

/// The user closes the position by hand at the broker: Sparky's stop-loss and take-profit are
/// orphaned and cancelled, the position row goes, and it is drift (metric, `sparky status`).
#[tokio::test]
async fn orphaned_protection_is_cancelled_and_a_hand_close_is_drift() {
    let (fake, url, app, user, secret) = aster_app().await;
    let buy = app
        .run_expecting(
            &protected(webhook(user, &secret, "aster", "buy", "ETHUSDT", 100), 2, 4),
            JobStatus::Succeeded,
        )
        .await;
    let (s, body) = aster_call(
        &url,
        "POST",
        "/fapi/v1/order",
        &[
            ("symbol", "ETHUSDT"),
            ("side", "SELL"),
            ("type", "MARKET"),
            ("quantity", "0.033"),
            ("newClientOrderId", "by-hand-1"),
        ],
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(fake.open_orders("ETHUSDT").len(), 2);

    let found = findings(&reconcile(&app, user).await);
    let mut orphans: Vec<String> = found
        .iter()
        .filter_map(|f| match f {
            Finding::OrphanCancelled {
                client_order_id, ..
            } => Some(client_order_id.clone()),
            _ => None,
        })
        .collect();
    orphans.sort();
    assert_eq!(
        orphans,
        [
            client_order_id(buy, Leg::StopLoss),
            client_order_id(buy, Leg::TakeProfit)
        ]
    );
    assert_eq!(
        found.iter().filter_map(Finding::drift).collect::<Vec<_>>(),
        [DriftKind::Closed]
    );
    assert!(fake.open_orders("ETHUSDT").is_empty());
    assert_eq!(app.position(user, "ETHUSDT").await, None);
    // No trade is invented for the hand close.
    assert_eq!(app.trades(user).await.len(), 1, "only the open");

    let status = sparky::status::collect(&app.queue).await.unwrap();
    let r = &status.reconciliation;
    assert!(r.last_sweep_at.is_some());
    assert_eq!((r.accounts, r.errors, r.drift_total), (1, 0, 1));
    assert_eq!(r.drift.get("closed"), Some(&1));
    assert!(sparky::status::render_table(&status).contains("drift 1 (closed 1"));
    let metrics = sparky::metrics::render();
    assert!(
        metrics.contains("sparky_reconcile_drift_total"),
        "the drift metric is exported"
    );
}

fn limit_buy(user: Uuid, secret: &str, price: u32, ttl: u64) -> Value {
    let mut hook = protected(webhook(user, secret, "aster", "buy", "ETHUSDT", 100), 2, 4);
    hook["order_type"] = json!("limit");
    hook["price"] = json!(price);
    hook["limit_ttl_secs"] = json!(ttl);
    hook
}

/// A working limit entry fills when the price crosses it: the follower records the open fill, the
/// position and the protection at levels from the fill price, and the job ends `succeeded`.
#[tokio::test]
async fn a_working_limit_entry_that_fills_is_recorded_and_protected_by_the_follower() {
    let (fake, _, app, user, secret) = aster_app().await;
    let entry = app
        .run_expecting(&limit_buy(user, &secret, 2900, 600), JobStatus::Working)
        .await;
    // Not yet crossed: the follower leaves it alone.
    assert!(findings(&reconcile(&app, user).await).is_empty());
    assert_eq!(app.job(entry).await.status, JobStatus::Working);

    fake.set_price("ETHUSDT", dec!(2890));
    assert_eq!(fake.position("ETHUSDT"), dec!(0.034), "filled at the limit");
    let found = findings(&reconcile(&app, user).await);
    assert_eq!(
        found,
        [Finding::EntryFilled {
            symbol: "ETHUSDT".into(),
            job_id: entry,
            quantity: dec!(0.034),
            price: Some(dec!(2900)),
            status: JobStatus::Succeeded,
        }]
    );
    assert_eq!(app.job(entry).await.status, JobStatus::Succeeded);
    let open: Vec<_> = app
        .trades(user)
        .await
        .into_iter()
        .map(|t| (t.leg, t.quantity, t.price))
        .collect();
    assert_eq!(open, [("open".into(), dec!(0.034), Some(dec!(2900)))]);
    let pos = app.position(user, "ETHUSDT").await.unwrap();
    assert_eq!(
        (
            pos.side,
            pos.quantity,
            pos.entry_price,
            pos.stop_loss_price,
            pos.take_profit_price
        ),
        (
            Side::Long,
            dec!(0.034),
            dec!(2900),
            Some(dec!(2842)),
            Some(dec!(3016))
        )
    );
    assert_eq!(
        fake.open_orders("ETHUSDT").len(),
        2,
        "stop-loss and take-profit"
    );
    assert_eq!(
        broker_order_state(&app, &client_order_id(entry, Leg::Open)).await,
        "filled"
    );
    assert_eq!(
        broker_order_state(&app, &client_order_id(entry, Leg::StopLoss)).await,
        "open"
    );
    // Nothing else to do on the next sweep.
    assert!(findings(&reconcile(&app, user).await).is_empty());
}

/// A working entry past its time is cancelled at the broker and the job ends `expired`. (Its
/// `expires_at` is moved into the past rather than waited for.)
#[tokio::test]
async fn a_working_entry_past_its_time_is_cancelled_and_the_job_expires() {
    let (fake, _, app, user, secret) = aster_app().await;
    let entry = app
        .run_expecting(&limit_buy(user, &secret, 2900, 600), JobStatus::Working)
        .await;
    sqlx::query(
        "UPDATE broker_orders SET expires_at = now() - interval '1 second' WHERE job_id = $1",
    )
    .bind(entry)
    .execute(&app.store.pool)
    .await
    .unwrap();

    let found = findings(&reconcile(&app, user).await);
    assert_eq!(
        found,
        [Finding::EntryExpired {
            symbol: "ETHUSDT".into(),
            job_id: entry
        }]
    );
    assert_eq!(app.job(entry).await.status, JobStatus::Expired);
    assert!(
        fake.open_orders("ETHUSDT").is_empty(),
        "cancelled at the broker"
    );
    assert_eq!(
        broker_order_state(&app, &client_order_id(entry, Leg::Open)).await,
        "cancelled"
    );
    assert!(app.trades(user).await.is_empty());
    assert_eq!(app.position(user, "ETHUSDT").await, None);
    // The price crossing later fills nothing.
    fake.set_price("ETHUSDT", dec!(2800));
    assert_eq!(fake.position("ETHUSDT"), Decimal::ZERO);
}

/// `sparky reconcile --user U` prints what it found and did for that user's accounts only.
#[tokio::test]
async fn sparky_reconcile_user_prints_what_it_found_per_account() {
    let (fake, _, app, user, secret) = aster_app().await;
    let (other, other_secret) = app.create_user().await;
    store_credentials(
        &app,
        other,
        "aster",
        ASTER_KEY,
        ASTER_SECRET,
        None,
        json!({}),
    )
    .await;
    app.enqueue(&protected(
        webhook(user, &secret, "aster", "buy", "ETHUSDT", 100),
        2,
        4,
    ))
    .await;
    app.enqueue(&webhook(
        other,
        &other_secret,
        "aster",
        "buy",
        "SOLUSDT",
        300,
    ))
    .await;
    app.run_worker_until_idle().await;
    fake.set_price("ETHUSDT", dec!(2900));

    let out = sparky::cli::reconcile(&app.config, &app.store, Some(user), false)
        .await
        .unwrap();
    assert!(
        out.starts_with(&format!("{user}/aster/production:\n")),
        "{out}"
    );
    assert!(
        out.contains("ETHUSDT: stop_loss filled at the broker (0.033 at 2900, pnl -3.3)"),
        "{out}"
    );
    assert!(out.contains("ETHUSDT: orphaned protective order"), "{out}");
    assert!(
        out.contains("ETHUSDT: position long 0.033 -> flat (explained by the fills above)"),
        "{out}"
    );
    assert!(
        !out.contains(&other.to_string()),
        "only --user's accounts: {out}"
    );
    assert_eq!(out.lines().count(), 4, "{out}");

    // JSON for scripts; the other user's long is in line with the broker.
    let out = sparky::cli::reconcile(&app.config, &app.store, Some(other), true)
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["account"]["user_id"], json!(other));
    assert_eq!(v[0]["findings"], json!([]));
    let again = sparky::cli::reconcile(&app.config, &app.store, Some(user), false)
        .await
        .unwrap();
    assert_eq!(
        again,
        "nothing to reconcile: no positions or resting orders recorded\n"
    );
}

/// A write based on a stale read changes nothing: the reconciliation's position update is
/// compare-and-set on the row it read, so a job that committed in between wins (the race
/// `sparky reconcile`, which runs outside the lanes, can have with a job).
#[tokio::test]
async fn a_position_a_job_changed_meanwhile_is_left_alone() {
    let (_fake, _, app, user, secret) = aster_app().await;
    app.enqueue(&webhook(user, &secret, "aster", "buy", "ETHUSDT", 100))
        .await;
    app.run_worker_until_idle().await;
    let acct = account(user, ExchangeKind::Aster);
    let seen = app.store.position(&acct, "ETHUSDT").await.unwrap().unwrap();
    // A job commits a bigger position after the sweep read the row.
    sqlx::query("UPDATE positions SET quantity = 0.066 WHERE user_id = $1")
        .bind(user)
        .execute(&app.store.pool)
        .await
        .unwrap();
    let wrote =
        sparky::reconcile::db::set_position(&app.store, &acct, "ETHUSDT", Some(&seen), None)
            .await
            .unwrap();
    assert!(!wrote);
    let now = app.store.position(&acct, "ETHUSDT").await.unwrap().unwrap();
    assert_eq!(now.quantity, dec!(0.066), "the job's position stands");
}

/// One user of the "done when" run: an exchange, a symbol of its own (the fakes are one account
/// each), the alert size, and whether its last entry carries a stop-loss / take-profit.
struct Trader {
    user: Uuid,
    secret: String,
    exchange: ExchangeKind,
    symbol: &'static str,
    usd: u32,
    last_entry_protected: bool,
}

impl Trader {
    fn hook(&self, action: &str, protect: bool) -> Value {
        let hook = webhook(
            self.user,
            &self.secret,
            self.exchange.as_str(),
            action,
            self.symbol,
            self.usd,
        );
        if protect {
            protected(hook, 2, 4)
        } else {
            hook
        }
    }

    /// buy, sell (a reversal), close, buy: stop-loss / take-profit on the first entry or on the
    /// other two, so half the entries are protected across users.
    fn alerts(&self) -> Vec<Value> {
        let p = self.last_entry_protected;
        vec![
            self.hook("buy", !p),
            self.hook("sell", p),
            self.hook("close", false),
            self.hook("buy", p),
        ]
    }
}

/// Every `n`th first close order (client id ending in the close leg's letter `c`) fills half.
fn every_nth_close(n: usize, id_field: &'static str) -> impl FnMut(&Value) -> Option<Partial> {
    let mut seen = 0usize;
    move |o| {
        let first_close = o[id_field]
            .as_str()
            .is_some_and(|id| id.starts_with("sp") && id.ends_with('c'));
        if !first_close {
            return None;
        }
        seen += 1;
        (seen % n == 1).then_some(Partial::Fraction(dec!(0.5)))
    }
}

/// Issue 12's "done when": several users on the Aster, Tradier and OANDA fakes, stop-loss /
/// take-profit on half the entries, a fifth of the Aster and Tradier closes partially filled (an
/// OANDA close is all or nothing), a price move that fires the stops, then a reconciliation. Ends with no orphaned protective order at any broker, every broker position
/// what the alerts asked for (flat where a stop fired), and Sparky's positions equal to the
/// brokers'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn done_when_protection_partial_closes_and_fired_stops_end_in_line_with_the_brokers() {
    let (aster, aster_url) = AsterFake::start().await;
    let (tradier, tradier_url) = TradierFake::start().await;
    let (oanda, oanda_url) = OandaFake::start().await;
    let app = TestApp::spawn_with(|c| {
        c.aster_base_url = Some(aster_url.clone());
        c.tradier_base_url = Some(format!("{tradier_url}/v1"));
        c.oanda_base_url = Some(oanda_url.clone());
    })
    .await;
    let brokers = Brokers {
        aster: &aster,
        tradier: &tradier,
        oanda: &oanda,
    };
    aster.partial_when(every_nth_close(5, "clientOrderId"));
    tradier.partial_when(every_nth_close(5, "tag"));

    let plan = [
        (ExchangeKind::Aster, "ETHUSDT", 100, true),
        (ExchangeKind::Aster, "SOLUSDT", 300, false),
        (ExchangeKind::Tradier, "AAPL", 1000, true),
        (ExchangeKind::Tradier, "SPY", 1000, false),
        (ExchangeKind::Oanda, "EUR_USD", 1000, true),
        (ExchangeKind::Oanda, "XAU_USD", 1000, false),
    ];
    let mut traders = vec![];
    for (exchange, symbol, usd, last_entry_protected) in plan {
        let (user, secret) = app.create_user().await;
        match exchange {
            ExchangeKind::Aster => {
                store_credentials(
                    &app,
                    user,
                    "aster",
                    ASTER_KEY,
                    ASTER_SECRET,
                    None,
                    json!({}),
                )
                .await
            }
            ExchangeKind::Oanda => {
                store_credentials(
                    &app,
                    user,
                    "oanda",
                    OANDA_TOKEN,
                    "unused",
                    Some(OANDA_ACCOUNT),
                    json!({}),
                )
                .await
            }
            _ => {
                store_credentials(
                    &app,
                    user,
                    "tradier",
                    TRADIER_TOKEN,
                    "unused",
                    Some(TRADIER_ACCOUNT),
                    json!({}),
                )
                .await
            }
        }
        traders.push(Trader {
            user,
            secret,
            exchange,
            symbol,
            usd,
            last_entry_protected,
        });
    }
    // The users' alerts interleaved, each user's in order.
    let mut jobs = vec![];
    for step in 0..4 {
        for t in &traders {
            jobs.push(app.enqueue(&t.alerts()[step]).await);
        }
    }
    app.run_worker_until_idle().await;
    for j in &jobs {
        let row = app.job(*j).await;
        assert_eq!(row.status, JobStatus::Succeeded, "{row:?}");
    }
    let partial_closes: i64 =
        sqlx::query_scalar("SELECT count(*) FROM trades WHERE leg = 'close2'")
            .fetch_one(&app.store.pool)
            .await
            .unwrap();
    assert!(
        partial_closes >= 2,
        "some closes filled partly and were completed"
    );

    // Every user is long again; the price falls 10 %: the protected longs' stops fire.
    for t in &traders {
        let before = broker_position(&brokers, t);
        assert!(before > Decimal::ZERO, "{}: {before}", t.symbol);
    }
    aster.set_price("ETHUSDT", dec!(2700));
    aster.set_price("SOLUSDT", dec!(135));
    tradier.set_price("AAPL", dec!(171));
    tradier.set_price("SPY", dec!(450));
    oanda.set_price("EUR_USD", dec!(0.97));
    oanda.set_price("XAU_USD", dec!(1800));

    let reports = app.worker().reconcile(None).await.unwrap();
    for r in &reports {
        assert_eq!(r.error, None, "{r}");
        assert_eq!(r.drift().count(), 0, "every change is explained: {r}");
    }

    // No orphaned protective order at any broker: nothing Sparky placed rests where the broker is
    // flat, and what rests protects the open longs.
    for t in &traders {
        let held = broker_position(&brokers, t);
        let resting = sparky_resting(&brokers, t);
        if t.last_entry_protected {
            assert_eq!(held, Decimal::ZERO, "{}: the stop fired", t.symbol);
            assert!(resting.is_empty(), "{}: orphans {resting:?}", t.symbol);
            let reason: ExitReason = sqlx::query_scalar(
                "SELECT exit_reason FROM trades WHERE user_id = $1 AND leg = 'sl'",
            )
            .bind(t.user)
            .fetch_one(&app.store.pool)
            .await
            .unwrap();
            assert_eq!(reason, ExitReason::StopLoss, "{}", t.symbol);
        } else {
            assert!(held > Decimal::ZERO, "{}: still long", t.symbol);
            assert!(resting.is_empty(), "{}: unprotected entry", t.symbol);
        }
        // Sparky's position equals the broker's.
        let mine = app
            .store
            .position(&account(t.user, t.exchange), t.symbol)
            .await
            .unwrap()
            .map(|p| match p.side {
                Side::Long => p.quantity,
                Side::Short => -p.quantity,
            })
            .unwrap_or_default();
        assert_eq!(mine, held, "{}", t.symbol);
    }
    let open_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM broker_orders WHERE state = 'open'")
            .fetch_one(&app.store.pool)
            .await
            .unwrap();
    assert_eq!(open_rows, 0, "Sparky records nothing resting");
}

/// The fake brokers of the "done when" run.
struct Brokers<'a> {
    aster: &'a AsterFake,
    tradier: &'a TradierFake,
    oanda: &'a OandaFake,
}

fn broker_position(b: &Brokers<'_>, t: &Trader) -> Decimal {
    match t.exchange {
        ExchangeKind::Aster => b.aster.position(t.symbol),
        ExchangeKind::Oanda => b.oanda.position(t.symbol),
        _ => b.tradier.position(t.symbol),
    }
}

/// Sparky's orders resting at `t`'s broker in its symbol.
fn sparky_resting(b: &Brokers<'_>, t: &Trader) -> Vec<Value> {
    let orders = match t.exchange {
        ExchangeKind::Aster => b.aster.open_orders(t.symbol),
        // Pending OANDA orders of the instrument: entries name it, a trade's stop-loss /
        // take-profit carry the trade's client id (the opening job's).
        ExchangeKind::Oanda => b
            .oanda
            .pending_orders()
            .into_iter()
            .filter(|o| {
                o["instrument"] == t.symbol
                    || o["tradeID"].as_str().is_some_and(|id| {
                        b.oanda
                            .trade(id)
                            .is_some_and(|tr| tr["instrument"] == t.symbol)
                    })
            })
            .collect(),
        _ => b
            .tradier
            .open_orders()
            .into_iter()
            .filter(|o| {
                o["symbol"] == t.symbol
                    || o["leg"]
                        .as_array()
                        .is_some_and(|l| l.iter().any(|l| l["symbol"] == t.symbol))
            })
            .collect(),
    };
    let id = |o: &Value| {
        o["clientOrderId"]
            .as_str()
            .or(o["tag"].as_str())
            .or(o["clientExtensions"]["id"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    orders
        .into_iter()
        .filter(|o| id(o).starts_with("sp"))
        .collect()
}

/// Wait until `done` holds, checking every 20 ms; fail with `what` after a minute (a deadline for
/// liveness on a loaded machine, not a measure of speed).
async fn eventually<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !done().await {
        if std::time::Instant::now() >= deadline {
            let logs = captured_logs();
            let tail: Vec<&str> = logs.lines().rev().take(60).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "{what}; the last log lines (of every test):\n{}",
                tail.join("\n")
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The periodic sweep runs on the user's lane, between the user's jobs and never alongside one: a
/// worker sweeping every 10 ms while it runs a stream of reversals and closes (each a cancel, a
/// close, an open and new protection at the broker) never catches a job half-way, which would
/// show as drift (a position the broker has and Sparky has not committed yet). It also picks up
/// the stop that fires at the end on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_sweep_never_runs_alongside_the_users_jobs() {
    let (fake, _, app, user, secret) = aster_app().await;
    let mut config = app.config.clone();
    config.reconcile_interval = std::time::Duration::from_millis(10);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let worker = sparky::worker::Worker::new(
        config,
        app.store.clone(),
        app.queue.clone(),
        shutdown.clone(),
    );
    let watch = worker.clone();
    let run = tokio::spawn(async move {
        worker
            .run(
                sparky::worker::RunMode::Forever,
                std::time::Duration::from_secs(10),
            )
            .await
    });
    // Sweeps start once the partitions are live (their history passes done).
    eventually("the worker owns its partitions", || async {
        watch.partitions().settled()
    })
    .await;
    // One alert at a time, the next as soon as the last finished, so the sweeps (queued every
    // 10 ms) land between and next to the jobs.
    let mut jobs = vec![];
    for action in ["buy", "sell", "buy", "close", "sell", "buy", "sell", "buy"] {
        let hook = protected(
            webhook(user, &secret, "aster", action, "ETHUSDT", 100),
            2,
            4,
        );
        let job = app.enqueue(&hook).await;
        jobs.push(job);
        let store = app.store.clone();
        eventually("the job finished", || {
            let store = store.clone();
            async move {
                let row = store.get_job(job).await.unwrap();
                row.is_some_and(|r| r.status.is_final() && r.status != JobStatus::Working)
            }
        })
        .await;
    }
    // The last buy's stop fires; a sweep records it by itself.
    fake.set_price("ETHUSDT", dec!(2900));
    eventually("a sweep recorded the stop", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM trades WHERE leg = 'sl'")
            .fetch_one(&app.store.pool)
            .await
            .unwrap()
            == 1
    })
    .await;
    eventually("a sweep cancelled the orphaned take-profit", || async {
        fake.open_orders("ETHUSDT").is_empty()
    })
    .await;
    shutdown.cancel();
    run.await.unwrap().unwrap();

    let r = sparky::status::collect(&app.queue)
        .await
        .unwrap()
        .reconciliation;
    assert!(r.accounts >= 2, "swept during the jobs too: {r:?}");
    for j in &jobs {
        let row = app.job(*j).await;
        assert_eq!(row.status, JobStatus::Succeeded, "{row:?}");
    }
    assert_eq!((r.drift_total, r.errors), (0, 0), "{r:?}");
    assert_eq!(fake.position("ETHUSDT"), Decimal::ZERO);
    assert_eq!(app.position(user, "ETHUSDT").await, None);
}

/// A stop that fired at the broker raises its `stop_loss_fired` notification (issue 15) in the
/// transaction that records the exit, once: a second sweep finds nothing new and writes nothing.
#[tokio::test]
async fn a_stop_fired_at_the_broker_raises_its_notification_once() {
    let (fake, _, app, user, secret) = aster_app().await;
    sparky::notify::channel::add(
        &app.store,
        app.config.master_key.as_ref(),
        user,
        sparky::notify::channel::NewChannel {
            kind: sparky::notify::channel::ChannelKind::Webhook,
            destination: sparky::secrets::SecretString::new("https://hooks.example.com/sparky"),
            secret: None,
            events: vec![sparky::notify::EventKind::StopLossFired],
            label: Some("stops".into()),
        },
    )
    .await
    .unwrap();
    let buy = app
        .run_expecting(
            &protected(webhook(user, &secret, "aster", "buy", "ETHUSDT", 100), 2, 4),
            JobStatus::Succeeded,
        )
        .await;
    fake.set_price("ETHUSDT", dec!(2900));
    reconcile(&app, user).await;
    reconcile(&app, user).await;
    let events: Vec<(String, Option<Uuid>, Value)> =
        sqlx::query_as("SELECT kind, job_id, payload FROM notification_outbox WHERE user_id = $1")
            .bind(user)
            .fetch_all(&app.store.pool)
            .await
            .unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    let (kind, job, payload) = &events[0];
    assert_eq!((kind.as_str(), *job), ("stop_loss_fired", Some(buy)));
    assert_eq!(payload["data"]["symbol"], "ETHUSDT");
    assert_eq!(payload["data"]["exit_reason"], "stop_loss");
    assert_eq!(payload["data"]["pnl"], json!(dec!(-3.3)));
}

/// The sweep selects the accounts of the partitions it owns in SQL: `sparky_partition` (the
/// migration's copy of `queue::partition_of`) agrees with the Rust function, and
/// `accounts_in_partitions` returns exactly the accounts of the partitions asked for.
#[tokio::test]
async fn the_sweep_selects_only_the_accounts_of_its_partitions_in_sql() {
    let app = TestApp::spawn().await;
    for n in [1u32, 7, 16, 64, 1000] {
        for _ in 0..40 {
            let u = Uuid::new_v4();
            let sql: i32 = sqlx::query_scalar("SELECT sparky_partition($1, $2)")
                .bind(u)
                .bind(n as i32)
                .fetch_one(&app.store.pool)
                .await
                .unwrap();
            assert_eq!(sql as u32, sparky::queue::partition_of(&u, n), "{u} of {n}");
        }
    }
    let n = 4;
    let mut users = vec![];
    for _ in 0..12 {
        let (user, _) = app.create_user().await;
        sqlx::query(
            "INSERT INTO positions (user_id, exchange, environment, symbol, side, quantity, entry_price)
             VALUES ($1, 'aster', 'production', 'ETHUSDT', 'long', 1, 100)",
        )
        .bind(user)
        .execute(&app.store.pool)
        .await
        .unwrap();
        users.push(user);
    }
    let mut seen = 0;
    for p in 0..n {
        let got: Vec<Uuid> = sparky::reconcile::db::accounts_in_partitions(&app.store, &[p], n)
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.user_id)
            .collect();
        let mut want: Vec<Uuid> = users
            .iter()
            .copied()
            .filter(|u| sparky::queue::partition_of(u, n) == p)
            .collect();
        want.sort();
        assert_eq!(got, want, "partition {p}");
        seen += got.len();
    }
    assert_eq!(seen, users.len());
    let all = sparky::reconcile::db::accounts_in_partitions(&app.store, &[0, 1, 2, 3], n)
        .await
        .unwrap();
    assert_eq!(all.len(), users.len());
}
