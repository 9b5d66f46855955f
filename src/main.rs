//! The `saliency-audit` command line. Parsing and printing only: the work is in the library.

use clap::{Parser, Subcommand};
use saliency_audit::engine::{self, EngineOptions, InterpolateMode, Rectifiers, TargetArg};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "saliency-audit",
    version,
    about = "Guided Grad-CAM attributions over image datasets, written to Parquet"
)]
struct Cli {
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Guided Grad-CAM for a preprocessed float32 .npy batch [N, C, H, W].
    Attribute {
        /// TorchScript model following the engine's contract.
        #[arg(long)]
        model: PathBuf,
        /// float32 .npy [N, C, H, W], already preprocessed.
        #[arg(long)]
        input: PathBuf,
        /// int64 .npy of N classes, one integer for all, or `predicted`.
        #[arg(long)]
        target: TargetArg,
        /// Output float32 .npy of the input's shape.
        #[arg(long)]
        out: PathBuf,
        /// Also write the CAM [N, 1, h, w] here.
        #[arg(long)]
        cam_out: Option<PathBuf>,
        #[arg(long, default_value = "nearest")]
        interpolate_mode: InterpolateMode,
        /// Rectifiers guided backprop clamps: relu, relu6 (hardtanh), leaky_relu; comma separated.
        #[arg(long, default_value = "relu", value_delimiter = ',')]
        guided_rectifiers: Vec<String>,
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(2)
        }
    }
}

fn init_logging(verbose: u8, quiet: bool) {
    let default = if quiet {
        "error"
    } else {
        match verbose {
            0 => "info",
            1 => "debug",
            _ => "trace",
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Attribute {
            model,
            input,
            target,
            out,
            cam_out,
            interpolate_mode,
            guided_rectifiers,
            batch_size,
            device,
        } => {
            let device = engine::parse_device(&device)?;
            let rectifiers =
                Rectifiers::from_names(&guided_rectifiers).map_err(anyhow::Error::msg)?;
            let opts = EngineOptions {
                interpolate: interpolate_mode,
                rectifiers,
            };
            let r = engine::attribute_npy(
                &model,
                &input,
                &target,
                &out,
                cam_out.as_deref(),
                batch_size,
                device,
                opts,
            )?;
            tracing::info!(examples = r.examples, batches = r.batches, out = %out.display(), "attribution written");
            Ok(ExitCode::SUCCESS)
        }
    }
}
