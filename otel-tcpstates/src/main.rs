//! otel-tcpstates: every TCP socket's state changes, from the kernel.
mod app;
mod cli;
mod clock;
mod event;
mod loader;
mod output;
mod preflight;
mod reader;

use std::process::ExitCode;

use clap::Parser as _;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    init_logging(cli.verbose);
    // One line, no backtrace, should a bug ever panic.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("otel-tcpstates: internal error: {info}; please report this");
    }));

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("otel-tcpstates: error: starting the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(app::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("otel-tcpstates: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "otel_tcpstates=info",
        1 => "otel_tcpstates=debug",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_env("OTEL_TCPSTATES_LOG").unwrap_or_else(|_| default.into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .init();
}
