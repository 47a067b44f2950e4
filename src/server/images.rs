//! Images in requests: `data:image/...;base64,` URLs decoded and embedded on a blocking thread.

use std::sync::{Arc, Mutex};

use super::error::ApiError;
use crate::chain::Prompt;
use crate::vision::{self, VisionEncoder, VisionError};

/// The bytes of a `data:image/...;base64,...` URL, decoded to RGB.
fn decode_data_url(url: &str, index: usize) -> Result<image::RgbImage, ApiError> {
    use base64::Engine;
    let name = format!("image_url[{index}]");
    let payload = url
        .strip_prefix("data:")
        .and_then(|rest| rest.split_once(";base64,"))
        .map(|(_, payload)| payload)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "{name}: only data:image/...;base64, URLs are accepted (the server fetches nothing)"
            ))
        })?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| ApiError::bad_request(format!("{name}: invalid base64: {e}")))?;
    vision::decode(&bytes, &name).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// `ids` with the embeddings of the images at `urls` spliced over their placeholders. Decoding
/// and the vision encoder run on a blocking thread, so the async workers keep serving.
pub(crate) async fn with_images(
    encoder: Option<Arc<Mutex<VisionEncoder>>>,
    ids: Vec<u32>,
    urls: Vec<String>,
) -> Result<Prompt, ApiError> {
    let Some(encoder) = encoder else {
        return match urls.is_empty() {
            true => Ok(ids.into()),
            false => Err(ApiError::bad_request(
                VisionError::TextOnlyBundle.to_string(),
            )),
        };
    };
    tokio::task::spawn_blocking(move || {
        let images = urls
            .iter()
            .enumerate()
            .map(|(index, url)| decode_data_url(url, index))
            .collect::<Result<Vec<_>, _>>()?;
        let mut encoder = encoder
            .lock()
            .map_err(|_| ApiError::internal("vision encoder lock poisoned"))?;
        let embeds = encoder
            .embed(&images)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        encoder
            .prompt(&ids, embeds)
            .map_err(|e| ApiError::bad_request(e.to_string()))
    })
    .await
    .map_err(|e| ApiError::internal(format!("vision encoder task failed: {e}")))?
}
