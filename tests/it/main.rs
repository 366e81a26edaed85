//! Integration tests on real Redis and Postgres (one test binary; each test isolated by its own
//! database and Redis namespace).

mod auth;
mod credentials;
mod exchanges;
mod failures;
mod faults;
mod helpers;
mod operations;
mod ordering;
mod pipeline;
mod procs;
mod recovery;
mod security;
mod webhook;
