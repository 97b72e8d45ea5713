//! The `fraiseql-observers` command line: parses arguments, sets up logging, calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use fraiseql_observers::config::{self, LoadOptions, MissingEnv};
use fraiseql_observers::error::ErrorCode;
use fraiseql_observers::report;

#[derive(Parser)]
#[command(
    name = "fraiseql-observers",
    version,
    about = "Turns PostgreSQL changes into reliable side effects"
)]
struct Cli {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "FRAISEQL_OBSERVERS_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Check an observers file (YAML, or TOML by extension) and report what it defines.
    ///
    /// Every problem is listed with `file:line:column` and path. Exits 2 when the file is invalid.
    ValidateConfig {
        /// The observers file.
        file: PathBuf,
        /// Print the result as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Treat environment variables named by the file but not set as errors (as `run` does),
        /// rather than warnings.
        #[arg(long)]
        require_env: bool,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn validate_config(file: &std::path::Path, json: bool, require_env: bool) -> ExitCode {
    let missing_env = if require_env {
        MissingEnv::Error
    } else {
        MissingEnv::Warn
    };
    let result = config::load_file(file, &LoadOptions::from_process_env(missing_env));
    if json {
        println!("{:#}", report::validation_json(&result));
    }
    match result {
        Ok(config) => {
            if !json {
                print!("{}", report::validation_report(&config));
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            if !json {
                eprint!("{errors}");
                eprintln!(
                    "\n✗ Configuration is invalid ({})",
                    ErrorCode::ConfigInvalid
                );
            }
            ExitCode::from(ErrorCode::ConfigInvalid.exit_code())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::ValidateConfig {
            file,
            json,
            require_env,
        } => validate_config(&file, json, require_env),
    }
}
