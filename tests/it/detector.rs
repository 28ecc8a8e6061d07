//! The memory-bank detector on the GPU kernels and on the CPU path: the same bank, scores and threshold,
//! and outliers above the threshold.

use anomaly_detector::{Compute, DetectorConfig, MemoryBank};
use anomaly_kernels::GpuKernels;

use crate::common::{Rng, wgpu_device};

#[test]
fn gpu_and_cpu_fits_agree_and_flag_outliers() {
    wgpu_device();
    let mut rng = Rng::new(21);
    let (images, dim) = (120, 64);
    // Half the columns vary a lot, half barely: the kept columns must be the first half.
    let features: Vec<f32> = (0..images * dim)
        .map(|i| if i % dim < dim / 2 { 2.0 * rng.normal() } else { 0.01 * rng.normal() })
        .collect();
    let config = DetectorConfig { k: 5, features: dim / 2 };
    let cpu = MemoryBank::fit(&features, dim, config, &Compute::Cpu).unwrap();
    let gpu = MemoryBank::fit(&features, dim, config, &Compute::Gpu(GpuKernels::shared().unwrap())).unwrap();
    assert_eq!(cpu.columns, (0..dim as u32 / 2).collect::<Vec<_>>());
    assert_eq!(gpu.columns, cpu.columns);
    assert_eq!(gpu.rows, cpu.rows);
    for (g, c) in gpu.train_scores.iter().zip(&cpu.train_scores) {
        assert!((g - c).abs() <= 1e-4 * c.max(1.0), "{g} vs {c}");
    }
    assert!((gpu.threshold - cpu.threshold).abs() <= 1e-4 * cpu.threshold);

    let mut outlier: Vec<f32> = features[..dim].to_vec();
    outlier.iter_mut().take(dim / 2).for_each(|v| *v += 12.0);
    let typical: Vec<f32> = (0..dim).map(|c| if c < dim / 2 { 0.5 * rng.normal() } else { 0.0 }).collect();
    let queries = [outlier, typical].concat();
    let gpu_kernels = Compute::Gpu(GpuKernels::shared().unwrap());
    for (name, compute) in [("cpu", &Compute::Cpu), ("gpu", &gpu_kernels)] {
        let scores = cpu.score(&queries, compute).unwrap();
        assert!(scores[0] > cpu.threshold, "{name}: outlier {} vs threshold {}", scores[0], cpu.threshold);
        assert!(scores[1] < cpu.threshold, "{name}: typical {} vs threshold {}", scores[1], cpu.threshold);
    }
}
