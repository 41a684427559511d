//! The `herald` binary: parse, run, and report a failure as one `error:` line.

use std::process::ExitCode;

use clap::Parser;
use herald::cli::{self, Cli};

/// jemalloc rather than glibc's allocator: glibc's took 13 % of the process's samples in a
/// webhook drain, most of it consolidating and unlinking free chunks that tokio's worker
/// threads hand to one another. With jemalloc the webhook drain made 21 % more events/s
/// for 9 MiB more resident memory; mimalloc gained 12 % and tripled the resident size
/// (docs/benchmarks-history.md, the eleventh refresh).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return cli::usage_error(err),
    };
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", cli::one_line(&err));
            ExitCode::FAILURE
        }
    }
}
