//! Integration tests on real Redis and Postgres (one test binary; each test isolated by its own
//! database and Redis namespace).

mod credentials;
mod helpers;
mod pipeline;
mod webhook;
