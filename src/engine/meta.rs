//! Metadata that `scripts/export_model.py` embeds in a TorchScript file (an extra file in
//! the zip archive, `extra/saliency_audit.json`).

use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::Path;

/// Name of the extra file inside the TorchScript archive.
pub const META_FILE: &str = "saliency_audit.json";

/// What the export script records about a model. Every field is optional: a TorchScript file
/// made by other means that follows the contract works without it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ModelMeta {
    /// Architecture or factory the model was built from.
    #[serde(default)]
    pub architecture: Option<String>,
    /// Path of the Grad-CAM layer in the eager model (`layer4`, `features.28`).
    #[serde(default)]
    pub layer: Option<String>,
    /// Whether the activation is the layer's input rather than its output.
    #[serde(default)]
    pub layer_input: bool,
    /// Model input height and width.
    #[serde(default)]
    pub input_size: Option<[i64; 2]>,
    /// Number of input channels.
    #[serde(default)]
    pub channels: Option<i64>,
    /// Per-channel normalisation mean (0..1 scale).
    #[serde(default)]
    pub mean: Option<Vec<f32>>,
    /// Per-channel normalisation standard deviation (0..1 scale).
    #[serde(default)]
    pub std: Option<Vec<f32>>,
    /// Class names, index = class id.
    #[serde(default)]
    pub class_names: Option<Vec<String>>,
    /// Number of classes.
    #[serde(default)]
    pub num_classes: Option<i64>,
    /// Preprocessing resize (shorter side) the model was trained with.
    #[serde(default)]
    pub resize: Option<u32>,
    /// How many BatchNorm layers the export folded into the convolution before them.
    #[serde(default)]
    pub folded_batchnorm: Option<u32>,
}

/// Checks that `path` is a TorchScript archive (`torch.jit.save`'s zip holds the model's code
/// under `code/`), before libtorch is asked to load it: a job's defaults come from the
/// metadata such a file carries, and without this a state_dict would be taken for a model
/// without metadata and reported as missing preprocessing settings.
pub fn check_torchscript(path: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let export = "a state_dict or a torch.save checkpoint is not TorchScript: export the model with \
                  scripts/export_model.py";
    let file = std::fs::File::open(path).with_context(|| format!("cannot open model {}", path.display()))?;
    let Ok(zip) = zip::ZipArchive::new(file) else {
        anyhow::bail!("it is not a TorchScript file (not a zip archive, as torch.jit.save writes); {export}");
    };
    let has_code = zip.file_names().any(|n| n.starts_with("code/") || n.contains("/code/"));
    anyhow::ensure!(has_code, "it is not a TorchScript file (its archive holds no code/); {export}");
    Ok(())
}

/// Reads the embedded metadata, `Ok(None)` when the file carries none.
pub fn read_meta(path: &Path) -> anyhow::Result<Option<ModelMeta>> {
    use anyhow::Context;
    let file = std::fs::File::open(path).with_context(|| format!("cannot open model {}", path.display()))?;
    let mut zip = match zip::ZipArchive::new(file) {
        Ok(z) => z,
        // Not a zip: not a TorchScript file; the loader reports that with the contract.
        Err(_) => return Ok(None),
    };
    let suffix = format!("/extra/{META_FILE}");
    let name = (0..zip.len()).filter_map(|i| zip.name_for_index(i).map(str::to_owned)).find(|n| n.ends_with(&suffix));
    let Some(name) = name else { return Ok(None) };
    let mut text = String::new();
    zip.by_name(&name)?.read_to_string(&mut text)?;
    let meta: ModelMeta = serde_json::from_str(&text)
        .with_context(|| format!("{}: embedded {META_FILE} is not valid metadata", path.display()))?;
    Ok(Some(meta))
}
