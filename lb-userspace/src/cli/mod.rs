//! The `maglb` command: [`args`] (what it takes), [`dispatch`] (what each subcommand does)
//! and [`output`] (what the read commands print).

mod args;
mod dispatch;
mod output;

use std::{io, process::ExitCode};

use clap::Parser as _;

pub use self::args::Cli;

type Error = Box<dyn std::error::Error>;

/// Entry point of the `maglb` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = io::stdout();
    match dispatch::run(cli, &mut stdout.lock()) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`maglb ... | head`): stop quietly.
        Err(e) if broken_pipe(e.as_ref()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("maglb: {}", crate::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn broken_pipe(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<io::Error>()
        .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
}
