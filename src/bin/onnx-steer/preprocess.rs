//! `onnx-steer preprocess`: images as the vision tower sees them.

use std::path::PathBuf;

use clap::Args;

use onnx_steer::steer::vector;
use onnx_steer::vision::{self, VisionError};
use onnx_steer::Bundle;

use crate::args::read_images;
use crate::CliError;

/// `onnx-steer preprocess` arguments.
#[derive(Args)]
pub(crate) struct PreprocessArgs {
    /// A vision-language bundle directory.
    #[arg(long)]
    bundle: PathBuf,
    /// Image files (PNG, JPEG or WebP), in order.
    #[arg(long = "image", value_name = "FILE", required = true)]
    images: Vec<PathBuf>,
    /// Output .safetensors file.
    #[arg(long)]
    out: PathBuf,
}

pub(crate) fn run(args: PreprocessArgs) -> Result<(), CliError> {
    let (files, out) = (&args.images, &args.out);
    let bundle = Bundle::open(&args.bundle)?;
    let settings = &bundle
        .manifest()
        .vision
        .as_ref()
        .ok_or(VisionError::TextOnlyBundle)?
        .processor;
    let processor = vision::ImageProcessor::new(settings)?;
    let rows: Vec<_> = read_images(files)?
        .iter()
        .map(|image| processor.preprocess(image))
        .collect();
    let shape = rows.first().map(|r| r.dim()).unwrap_or_default();
    let data: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    let dims = vec![rows.len(), shape.0, shape.1, shape.2];
    vector::write_f32_tensors(out, &[("pixel_values".into(), dims, &data)])?;
    eprintln!(
        "wrote pixel_values {:?} to {}",
        [rows.len(), shape.0, shape.1, shape.2],
        out.display()
    );
    Ok(())
}
