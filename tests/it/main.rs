//! Integration tests on real Redis and Postgres (one test binary; each test isolated by its own
//! database and Redis namespace).

mod aster;
mod auth;
mod chaos;
mod cluster;
mod credentials;
mod exchanges;
mod failures;
mod fakes;
mod faults;
mod helpers;
mod hostile;
mod lifecycle;
mod notify;
mod oanda;
mod operations;
mod ordering;
mod partial_entries;
mod pipeline;
mod procs;
mod reconcile;
mod reconcile_brokers;
mod recovery;
mod scripted;
mod security;
mod takeover;
mod templates;
mod trader;
mod tradier;
mod user_api;
mod webhook;
