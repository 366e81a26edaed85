//! `sparky risk set|show` (issue 14; the rules are in [`crate::risk`]).

use clap::Subcommand;

use crate::store::Store;

#[derive(Subcommand, Debug)]
pub enum RiskCommand {}

pub async fn run(_store: &Store, cmd: RiskCommand) -> anyhow::Result<()> {
    match cmd {}
}
