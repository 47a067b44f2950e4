//! Image decoding and the HF image processor's steps (convert to RGB, pad to square, resize,
//! center crop, rescale, normalise, channels first), reproduced to the byte where HF works in 8 bits.
//!
//! HF's reference path runs Pillow on `uint8` images, so the resampler here is Pillow's: the same
//! separable filters, fixed-point coefficients and rounding. A float resampler would differ by one
//! grey level on many pixels, which after normalisation is 0.015, far above the 1e-3 parity target.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage, RgbaImage};
use ndarray::Array3;

use super::VisionError;
use crate::bundle::{ImageProcessorConfig, ImageSize, Resample};

/// Pixels an image may have before it is refused, checked before the pixels are allocated
/// (Pillow's decompression-bomb limit).
pub const MAX_IMAGE_PIXELS: u64 = 89_478_485;

/// Formats the runtime decodes.
const FORMATS: [ImageFormat; 3] = [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP];

/// Decode PNG, JPEG or WebP bytes to upright RGB, as HF's `load_image` + `convert_rgb` do:
/// EXIF orientation applied, transparency composited onto white, grey replicated to RGB.
///
/// `name` labels errors (a file name, or `image_url[2]`).
pub fn decode(bytes: &[u8], name: &str) -> Result<RgbImage, VisionError> {
    let decode_error = |source| VisionError::Decode {
        name: name.to_string(),
        source,
    };
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| decode_error(e.into()))?;
    match reader.format() {
        Some(ImageFormat::Jpeg) => return decode_jpeg(bytes, name),
        Some(format) if FORMATS.contains(&format) => {}
        other => {
            return Err(VisionError::UnsupportedFormat {
                name: name.to_string(),
                format: other.map(|f| format!("{f:?}")),
            })
        }
    }
    let mut decoder = reader.into_decoder().map_err(decode_error)?;
    let (width, height) = decoder.dimensions();
    check_size(name, width, height)?;
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_IMAGE_PIXELS * 8);
    decoder.set_limits(limits).map_err(decode_error)?;
    let orientation = decoder.orientation().map_err(decode_error)?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(decode_error)?;
    image.apply_orientation(orientation);
    Ok(if image.color().has_alpha() {
        composite_on_white(&image.to_rgba8())
    } else {
        image.to_rgb8()
    })
}

/// Refuse empty images and images over [`MAX_IMAGE_PIXELS`], before their pixels are allocated.
fn check_size(name: &str, width: u32, height: u32) -> Result<(), VisionError> {
    let pixels = u64::from(width) * u64::from(height);
    if pixels == 0 {
        return Err(VisionError::Empty {
            name: name.to_string(),
            width,
            height,
        });
    }
    if pixels > MAX_IMAGE_PIXELS {
        return Err(VisionError::TooLarge {
            name: name.to_string(),
            width,
            height,
            limit: MAX_IMAGE_PIXELS,
        });
    }
    Ok(())
}

/// JPEG through libjpeg-turbo's decoder (islow IDCT, fancy upsampling), Pillow's, so the pixels
/// are the ones HF sees; the EXIF orientation comes from the APP1 marker.
fn decode_jpeg(bytes: &[u8], name: &str) -> Result<RgbImage, VisionError> {
    let corrupt = |problem: String| VisionError::Decode {
        name: name.to_string(),
        source: image::ImageError::Decoding(image::error::DecodingError::new(
            ImageFormat::Jpeg.into(),
            problem,
        )),
    };
    // libjpeg fills a truncated scan with grey and only warns; Pillow refuses such files.
    let tail = &bytes[bytes.len().saturating_sub(4096)..];
    if !tail.windows(2).any(|w| w == [0xFF, 0xD9]) {
        return Err(corrupt(
            "no end-of-image marker: the file is truncated".into(),
        ));
    }
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(
        || -> Result<RgbImage, VisionError> {
            let decompress = mozjpeg::Decompress::with_markers(&[mozjpeg::Marker::APP(1)])
                .from_mem(bytes)
                .map_err(|e| corrupt(e.to_string()))?;
            let (width, height) = (decompress.width() as u32, decompress.height() as u32);
            check_size(name, width, height)?;
            let orientation = decompress
                .markers()
                .filter_map(|marker| marker.data.strip_prefix(b"Exif\0\0"))
                .find_map(Orientation::from_exif_chunk)
                .unwrap_or(Orientation::NoTransforms);
            let mut started = decompress.rgb().map_err(|e| corrupt(e.to_string()))?;
            let pixels: Vec<[u8; 3]> = started
                .read_scanlines()
                .map_err(|e| corrupt(e.to_string()))?;
            started.finish().map_err(|e| corrupt(e.to_string()))?;
            let raw = pixels.into_iter().flatten().collect();
            let image = RgbImage::from_raw(width, height, raw)
                .ok_or_else(|| corrupt("fewer pixels than the header declares".into()))?;
            let mut image = DynamicImage::ImageRgb8(image);
            image.apply_orientation(orientation);
            Ok(image.to_rgb8())
        },
    ));
    decoded.unwrap_or_else(|_| Err(corrupt("libjpeg rejected the data".into())))
}

/// Pillow's `alpha_composite` onto opaque white, in its integer arithmetic (7 fractional bits).
fn composite_on_white(image: &RgbaImage) -> RgbImage {
    RgbImage::from_fn(image.width(), image.height(), |x, y| {
        let [r, g, b, a] = image.get_pixel(x, y).0;
        if a == 0 {
            return image::Rgb([255, 255, 255]);
        }
        let (a, precision) = (u32::from(a), 7);
        // With an opaque white destination Pillow's coefficients reduce to a·128 and (255-a)·128.
        let blend = |c: u8| {
            let tmp = u32::from(c) * (a << precision) + 255 * ((255 - a) << precision);
            let tmp = tmp + (0x80 << precision);
            ((((tmp >> 8) + tmp) >> 8) >> precision) as u8
        };
        image::Rgb([blend(r), blend(g), blend(b)])
    })
}

/// The image processor of a vision-language bundle, built from the manifest's settings.
///
/// Use [`ImageProcessor::preprocess`] on what [`decode`] returns; the result is the `pixel_values`
/// row `[3, H, W]` the vision graph takes.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    config: ImageProcessorConfig,
}

impl ImageProcessor {
    /// Check that every step of `config` is one this runtime reproduces.
    pub fn new(config: &ImageProcessorConfig) -> Result<Self, VisionError> {
        let channels = |values: &[f32]| values.len() == 3;
        if config.do_normalize
            && !(channels(&config.image_mean)
                && channels(&config.image_std)
                && config.image_std.iter().all(|&s| s != 0.0))
        {
            return Err(VisionError::Unsupported(
                "image_mean and image_std must have 3 entries, std non-zero".into(),
            ));
        }
        if config.do_resize && config.size.shortest_edge.is_none() && config.size.fixed().is_none()
        {
            return Err(VisionError::Unsupported(format!(
                "resize size {:?} (need shortest_edge or height and width)",
                config.size
            )));
        }
        Ok(Self {
            config: config.clone(),
        })
    }

    /// Pad, resize, crop, rescale and normalise one RGB image to `[3, H, W]`.
    pub fn preprocess(&self, image: &RgbImage) -> Array3<f32> {
        let c = &self.config;
        let mut image = image.clone();
        if c.do_pad {
            // HF fills with int(mean * 255) per channel.
            let fill =
                [0, 1, 2].map(|ch| (c.image_mean.get(ch).copied().unwrap_or(0.0) * 255.0) as u8);
            image = pad_to_square(&image, fill);
        }
        if c.do_resize {
            let (height, width) = resize_target(image.height(), image.width(), &c.size);
            image = resample(&image, width, height, c.resample);
        }
        if c.do_center_crop {
            if let Some((height, width)) = c.crop_size.as_ref().and_then(ImageSize::fixed) {
                image = center_crop(&image, height, width);
            }
        }
        let (width, height) = image.dimensions();
        Array3::from_shape_fn((3, height as usize, width as usize), |(ch, y, x)| {
            let value = image.get_pixel(x as u32, y as u32).0[ch];
            // HF rescales in float64, then works in float32.
            let mut v = if c.do_rescale {
                (f64::from(value) * c.rescale_factor) as f32
            } else {
                f32::from(value)
            };
            if c.do_normalize {
                v = (v - c.image_mean[ch]) / c.image_std[ch];
            }
            v
        })
    }
}

/// LLaVA's `pad_to_square`: centre the image on a square of the longer side filled with `fill`.
fn pad_to_square(image: &RgbImage, fill: [u8; 3]) -> RgbImage {
    let (width, height) = image.dimensions();
    let side = width.max(height);
    let mut out = RgbImage::from_pixel(side, side, image::Rgb(fill));
    let (left, top) = ((side - width) / 2, (side - height) / 2);
    image::imageops::replace(&mut out, image, i64::from(left), i64::from(top));
    out
}

/// `(height, width)` after HF's resize: the shorter edge to `shortest_edge` keeping the aspect
/// ratio (the longer edge truncated, as `int()` does), or a fixed size.
fn resize_target(height: u32, width: u32, size: &ImageSize) -> (u32, u32) {
    if let Some(fixed) = size.fixed() {
        return fixed;
    }
    let short_target = size.shortest_edge.unwrap_or(height.min(width));
    let (short, long) = (width.min(height), width.max(height));
    let long_target = (f64::from(short_target) * f64::from(long) / f64::from(short)) as u32;
    if width <= height {
        (long_target, short_target)
    } else {
        (short_target, long_target)
    }
}

/// HF's `center_crop`: crop around the centre, zero-padding where the image is smaller.
fn center_crop(image: &RgbImage, height: u32, width: u32) -> RgbImage {
    let (in_w, in_h) = (i64::from(image.width()), i64::from(image.height()));
    let (out_w, out_h) = (i64::from(width), i64::from(height));
    // Python floor division; negative where the crop is larger than the image.
    let top = (in_h - out_h).div_euclid(2);
    let left = (in_w - out_w).div_euclid(2);
    let (pad_h, pad_w) = ((out_h - in_h).max(0), (out_w - in_w).max(0));
    let (top_pad, left_pad) = ((pad_h + 1) / 2, (pad_w + 1) / 2);
    let (canvas_h, canvas_w) = (in_h.max(out_h), in_w.max(out_w));
    let (top, left) = ((top + top_pad).max(0), (left + left_pad).max(0));
    let bottom = (top + out_h).min(canvas_h);
    let right = (left + out_w).min(canvas_w);
    RgbImage::from_fn((right - left) as u32, (bottom - top) as u32, |x, y| {
        let (sx, sy) = (i64::from(x) + left - left_pad, i64::from(y) + top - top_pad);
        if (0..in_w).contains(&sx) && (0..in_h).contains(&sy) {
            *image.get_pixel(sx as u32, sy as u32)
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}

/// Pillow's fixed-point precision for 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

impl Resample {
    fn support(self) -> f64 {
        match self {
            Resample::Bilinear => 1.0,
            Resample::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Resample::Bilinear if x < 1.0 => 1.0 - x,
            Resample::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Resample::Bilinear => 0.0,
        }
    }
}

/// For each output index, the first input index and the fixed-point weights of the inputs it reads.
struct Taps {
    first: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for resizing `in_size` to `out_size`.
fn taps(in_size: u32, out_size: u32, filter: Resample) -> Taps {
    let scale = f64::from(in_size) / f64::from(out_size);
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    let mut first = Vec::with_capacity(out_size as usize);
    let mut weights = Vec::with_capacity(out_size as usize);
    for out in 0..out_size {
        let center = (f64::from(out) + 0.5) * scale;
        // C's (int) cast truncates toward zero, as `as` does.
        let lo = ((center - support + 0.5) as i64).max(0);
        let hi = ((center + support + 0.5) as i64).min(i64::from(in_size));
        let raw: Vec<f64> = (lo..hi)
            .map(|x| filter.weight((x as f64 - center + 0.5) / filter_scale))
            .collect();
        let total: f64 = raw.iter().sum();
        let unit = f64::from(1u32 << PRECISION_BITS);
        weights.push(
            raw.iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    if w < 0.0 {
                        (-0.5 + w * unit) as i32
                    } else {
                        (0.5 + w * unit) as i32
                    }
                })
                .collect(),
        );
        first.push(lo as usize);
    }
    Taps { first, weights }
}

fn clip8(sum: i64) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's two-pass resize (horizontal, then vertical), skipping a pass whose size is unchanged.
fn resample(image: &RgbImage, width: u32, height: u32, filter: Resample) -> RgbImage {
    let mut current = image.clone();
    if width != current.width() {
        current = resample_pass(&current, width, filter, true);
    }
    if height != current.height() {
        current = resample_pass(&current, height, filter, false);
    }
    current
}

/// One separable pass: resize along x (`horizontal`) or y to `size`, in 8-bit fixed point.
fn resample_pass(source: &RgbImage, size: u32, filter: Resample, horizontal: bool) -> RgbImage {
    let (width, height) = source.dimensions();
    let taps = taps(if horizontal { width } else { height }, size, filter);
    let (out_width, out_height) = if horizontal {
        (size, height)
    } else {
        (width, size)
    };
    RgbImage::from_fn(out_width, out_height, |x, y| {
        let along = if horizontal { x } else { y } as usize;
        let (first, weights) = (taps.first[along], &taps.weights[along]);
        let mut sums = [1i64 << (PRECISION_BITS - 1); 3];
        for (i, &w) in weights.iter().enumerate() {
            let tap = (first + i) as u32;
            let pixel = if horizontal {
                source.get_pixel(tap, y)
            } else {
                source.get_pixel(x, tap)
            };
            for (sum, &value) in sums.iter_mut().zip(&pixel.0) {
                *sum += i64::from(value) * i64::from(w);
            }
        }
        image::Rgb(sums.map(clip8))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_resize_keeps_aspect_and_truncates() {
        let size = ImageSize {
            shortest_edge: Some(336),
            ..Default::default()
        };
        assert_eq!(resize_target(480, 640, &size), (336, 448));
        assert_eq!(resize_target(512, 333, &size), (516, 336));
    }

    #[test]
    fn taps_sum_to_one_in_fixed_point() {
        for (from, to) in [(640, 336), (100, 336), (7, 3)] {
            let taps = taps(from, to, Resample::Bicubic);
            for weights in &taps.weights {
                let total: i32 = weights.iter().sum();
                assert!((total - (1 << PRECISION_BITS)).abs() <= weights.len() as i32);
            }
        }
    }

    #[test]
    fn constant_image_stays_constant_through_resize() {
        let image = RgbImage::from_pixel(13, 7, image::Rgb([10, 128, 250]));
        let out = resample(&image, 5, 11, Resample::Bicubic);
        assert!(out.pixels().all(|p| p.0 == [10, 128, 250]));
    }

    #[test]
    fn crop_larger_than_image_pads_with_zeros() {
        let image = RgbImage::from_pixel(2, 2, image::Rgb([9, 9, 9]));
        let out = center_crop(&image, 4, 4);
        assert_eq!(out.dimensions(), (4, 4));
        assert_eq!(out.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(out.get_pixel(1, 1).0, [9, 9, 9]);
        assert_eq!(out.get_pixel(2, 2).0, [9, 9, 9]);
    }

    #[test]
    fn transparent_pixels_become_white_and_opaque_ones_stay() {
        let mut image = RgbaImage::new(2, 1);
        image.put_pixel(0, 0, image::Rgba([0, 0, 0, 0]));
        image.put_pixel(1, 0, image::Rgba([12, 34, 56, 255]));
        let out = composite_on_white(&image);
        assert_eq!(out.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(out.get_pixel(1, 0).0, [12, 34, 56]);
    }

    #[test]
    fn garbage_bytes_are_an_unsupported_format() {
        let err = decode(b"definitely not an image", "junk.bin").unwrap_err();
        assert!(
            matches!(err, VisionError::UnsupportedFormat { .. }),
            "{err}"
        );
    }
}
