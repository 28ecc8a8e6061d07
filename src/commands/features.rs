use std::collections::HashMap;
use std::path::PathBuf;

use anomaly_data::Dataset;
use anyhow::{Context, Result};
use safetensors::{Dtype, tensor::TensorView};

use anomaly_fs::write_atomic;
use anomaly_method::image_progress;

use crate::args::BackboneArgs;
use crate::output::{note, outln};

/// `anomaly features`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: BackboneArgs,
    /// An MVTec AD category, a folder of images, or one image file.
    #[arg(long, value_name = "PATH")]
    data: PathBuf,
    /// Output file (safetensors): `pooled` [images, dim], `tap.<name>` per tap, image paths in the metadata.
    #[arg(long, value_name = "FILE.safetensors")]
    out: PathBuf,
    /// Intermediate feature maps to save too, comma-separated (e.g. layer2,layer3 or block4,block10).
    #[arg(long, value_delimiter = ',')]
    taps: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    anomaly_fs::check_file_output(&args.out)?;
    let dataset = Dataset::open(&args.data)?;
    anomaly_eval::note_skipped(&dataset.skipped);
    let paths: Vec<PathBuf> = dataset.samples.iter().map(|s| s.path.clone()).collect();
    let extractor = args.model.extractor()?;
    note!("{} on {}: {} images", args.model.backbone, extractor.device().describe(), paths.len());
    let taps: Vec<&str> = args.taps.iter().map(String::as_str).collect();

    let progress = image_progress(paths.len(), "features");
    let mut pooled = Vec::new();
    let mut maps: Vec<(String, [usize; 4], Vec<f32>)> = Vec::new();
    extractor.run(
        paths.clone(),
        &taps,
        args.model.run.batch_size,
        args.model.run.images.limits(),
        &progress,
        |_, batch_pooled, batch_maps| {
            pooled.extend(batch_pooled);
            for map in batch_maps {
                match maps.iter_mut().find(|(name, _, _)| *name == map.name) {
                    Some((_, shape, values)) => {
                        shape[0] += map.shape[0];
                        values.extend(map.values);
                    }
                    None => maps.push((map.name, map.shape, map.values)),
                }
            }
            Ok(())
        },
    )?;
    progress.finish_and_clear();

    let dim = pooled.len() / paths.len();
    let mut tensors = vec![("pooled".to_string(), vec![paths.len(), dim], &pooled)];
    for (name, shape, values) in &maps {
        tensors.push((format!("tap.{name}"), shape.to_vec(), values));
    }
    let views = tensors
        .iter()
        .map(|(name, shape, values)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(values))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let path_list: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let metadata = HashMap::from([
        ("backbone".to_string(), args.model.backbone.to_string()),
        ("device".to_string(), extractor.device().describe()),
        ("preprocess".to_string(), serde_json::to_string(&extractor.preprocess())?),
        ("paths".to_string(), serde_json::to_string(&path_list)?),
    ]);
    let bytes = safetensors::serialize(views, Some(metadata)).context("encoding features")?;
    write_atomic(&args.out, &bytes)?;
    outln!("{}: {} images × {dim} features{}", args.out.display(), paths.len(), if maps.is_empty() { "" } else { " + taps" })?;
    Ok(())
}
