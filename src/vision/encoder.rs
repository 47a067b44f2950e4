//! The vision tower and projector graphs of a vision-language bundle, and the placeholder splice.

use std::sync::Arc;

use image::RgbImage;
use ndarray::{Array2, Array4, Axis};
use ort::session::SessionInputValue;

use super::{ImageProcessor, VisionError};
use crate::bundle::{Bundle, Dtype, SegmentKind, VisionConfig};
use crate::chain::segment::{load_segment, take, LoadedSegment};
use crate::chain::{run_error, ImageEmbeds, ModelError, Prompt};
use crate::runtime::values::{hidden_to_f32, value_in};
use crate::runtime::Runtime;

/// Images → embeddings in the language model's space, one `[image_tokens, d]` matrix per image.
///
/// Load it next to the [`crate::SegmentChain`] of a vision-language bundle; text-only bundles
/// have none ([`VisionEncoder::load`] returns `Ok(None)`).
pub struct VisionEncoder {
    config: VisionConfig,
    processor: ImageProcessor,
    dtype: Dtype,
    vision: LoadedSegment,
    projector: LoadedSegment,
}

impl VisionEncoder {
    /// The encoder of `bundle`, or `None` when the bundle has no vision section.
    pub fn load(bundle: &Bundle, runtime: &Runtime) -> Result<Option<Self>, VisionError> {
        let Some(config) = bundle.manifest().vision.clone() else {
            return Ok(None);
        };
        let segment = |kind| {
            bundle.segment(kind).ok_or_else(|| ModelError::Interface {
                file: "manifest.json".into(),
                problem: format!("no {kind:?} segment"),
            })
        };
        let vision = load_segment(
            bundle,
            runtime,
            segment(SegmentKind::Vision)?,
            &["pixel_values"],
            &["image_features"],
        )?;
        let projector = load_segment(
            bundle,
            runtime,
            segment(SegmentKind::Projector)?,
            &["image_features"],
            &["image_embeds"],
        )?;
        Ok(Some(Self {
            processor: ImageProcessor::new(&config.processor)?,
            config,
            dtype: bundle.manifest().dtype,
            vision,
            projector,
        }))
    }

    /// The manifest's vision section.
    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    /// Preprocess `images` and run them through the vision tower and projector as one batch.
    pub fn embed(&mut self, images: &[RgbImage]) -> Result<Vec<Arc<Array2<f32>>>, VisionError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let pixels = self.preprocess(images)?;
        self.encode(pixels)
    }

    /// `pixel_values` `[N, 3, H, W]` of `images` (the HF image processor's output).
    pub fn preprocess(&self, images: &[RgbImage]) -> Result<Array4<f32>, VisionError> {
        let rows: Vec<_> = images
            .iter()
            .map(|image| self.processor.preprocess(image))
            .collect();
        let views: Vec<_> = rows.iter().map(|row| row.view()).collect();
        Ok(ndarray::stack(Axis(0), &views)
            .map_err(|e| ModelError::Shape(format!("images do not stack: {e}")))?)
    }

    /// Run preprocessed `pixels` through the vision tower and projector: one `[image_tokens, d]`
    /// matrix per image.
    pub fn encode(&mut self, pixels: Array4<f32>) -> Result<Vec<Arc<Array2<f32>>>, VisionError> {
        let pixels = value_in(pixels, self.dtype, "pixel_values")?;
        let vision = &mut self.vision;
        let mut outputs = vision
            .session
            .run(vec![("pixel_values", SessionInputValue::from(&pixels))])
            .map_err(run_error(&vision.name))?;
        let features = take(&mut outputs, "image_features", &vision.name)?;
        drop(outputs);
        let projector = &mut self.projector;
        let mut outputs = projector
            .session
            .run(vec![("image_features", SessionInputValue::from(&features))])
            .map_err(run_error(&projector.name))?;
        let embeds = take(&mut outputs, "image_embeds", &projector.name)?;
        // [n, tokens, d] → one [tokens, d] matrix per image (fp32 whatever the bundle's dtype).
        let embeds = hidden_to_f32(&embeds)?;
        Ok(embeds
            .axis_iter(Axis(0))
            .map(|image| Arc::new(image.to_owned()))
            .collect())
    }

    /// Expand each image placeholder in `ids` to `image_tokens` copies and attach the image
    /// embeddings that replace them, in order; the counts must match.
    pub fn prompt(
        &self,
        ids: &[u32],
        images: Vec<Arc<Array2<f32>>>,
    ) -> Result<Prompt, VisionError> {
        expand_placeholders(ids, &self.config, images)
    }
}

/// See [`VisionEncoder::prompt`].
fn expand_placeholders(
    ids: &[u32],
    config: &VisionConfig,
    images: Vec<Arc<Array2<f32>>>,
) -> Result<Prompt, VisionError> {
    let placeholders = ids
        .iter()
        .filter(|&&id| id == config.image_token_id)
        .count();
    if placeholders != images.len() {
        return Err(VisionError::PlaceholderMismatch {
            images: images.len(),
            placeholders,
        });
    }
    let mut images = images.into_iter();
    let mut prompt = Prompt::default();
    for &id in ids {
        if id != config.image_token_id {
            prompt.ids.push(id);
            continue;
        }
        let embeds = images.next().ok_or(VisionError::PlaceholderMismatch {
            images: 0,
            placeholders,
        })?;
        if embeds.nrows() != config.image_tokens {
            return Err(ModelError::Shape(format!(
                "an image gave {} embeddings, the manifest promises {}",
                embeds.nrows(),
                config.image_tokens
            ))
            .into());
        }
        prompt.images.push(ImageEmbeds {
            start: prompt.ids.len(),
            embeds,
        });
        prompt.ids.extend(std::iter::repeat_n(
            config.image_token_id,
            config.image_tokens,
        ));
    }
    Ok(prompt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::{ImageProcessorConfig, ImageSize, Resample, VisionPositions};

    fn config() -> VisionConfig {
        VisionConfig {
            architecture: "llava".into(),
            image_token_id: 9,
            image_tokens: 3,
            positions: VisionPositions::Sequential,
            processor: ImageProcessorConfig {
                do_convert_rgb: true,
                do_pad: false,
                do_resize: true,
                size: ImageSize::default(),
                resample: Resample::Bicubic,
                do_center_crop: false,
                crop_size: None,
                do_rescale: true,
                rescale_factor: 1.0 / 255.0,
                do_normalize: false,
                image_mean: Vec::new(),
                image_std: Vec::new(),
            },
        }
    }

    fn image(value: f32) -> Arc<Array2<f32>> {
        Arc::new(Array2::from_elem((3, 2), value))
    }

    #[test]
    fn each_placeholder_expands_and_carries_its_image() {
        let prompt =
            expand_placeholders(&[1, 9, 2, 9, 3], &config(), vec![image(0.5), image(1.5)]).unwrap();
        assert_eq!(prompt.ids, vec![1, 9, 9, 9, 2, 9, 9, 9, 3]);
        let starts: Vec<usize> = prompt.images.iter().map(|i| i.start).collect();
        assert_eq!(starts, vec![1, 5]);
        assert_eq!(prompt.images[1].embeds[[0, 0]], 1.5);
    }

    #[test]
    fn more_images_than_placeholders_is_refused() {
        let err =
            expand_placeholders(&[1, 9, 2], &config(), vec![image(0.0), image(0.0)]).unwrap_err();
        assert!(
            err.to_string()
                .contains("2 image(s) given but the prompt has 1"),
            "{err}"
        );
    }
}
