//! otel-tcpstates: every TCP socket's state changes, from the kernel.
use otel_tcpstates::{app, cli, usage::UsageError};

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

    // One worker besides the main thread: the span export worker (encoding, the
    // requests in flight) and the metrics exporter run there, so they make progress
    // even while the main loop drains events or shuts down.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("otel-tcpstates: error: starting the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(app::run(cli));
    // run() has kept the shutdown deadline: an export it cut off is abandoned here,
    // not waited for.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => match err.downcast_ref::<UsageError>() {
            Some(usage) => {
                eprintln!("error: {usage}\n\nFor more information, try '--help'.");
                ExitCode::from(2)
            }
            None => {
                eprintln!("otel-tcpstates: error: {err:#}");
                ExitCode::FAILURE
            }
        },
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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
