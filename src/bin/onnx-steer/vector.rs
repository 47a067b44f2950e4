//! `onnx-steer vector`: steering-vector files.

use std::path::PathBuf;

use clap::Subcommand;
use onnx_steer::steer::vector;

use crate::CliError;

#[derive(Subcommand)]
pub(crate) enum VectorCommand {
    /// Convert between .safetensors and .gguf control vectors (repeng / llama.cpp layout), exactly.
    Convert {
        /// Input vector file (.safetensors or .gguf).
        input: PathBuf,
        /// Output file; the extension picks the format.
        output: PathBuf,
        /// `controlvector.model_hint` written into GGUF output.
        #[arg(long, default_value = "llama")]
        model_hint: String,
    },
}

pub(crate) fn run(command: VectorCommand) -> Result<(), CliError> {
    match command {
        VectorCommand::Convert {
            input,
            output,
            model_hint,
        } => Ok(vector::convert(&input, &output, &model_hint)?),
    }
}
